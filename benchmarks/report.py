"""Shared by every benchmark: a markdown table, printed and appended to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    import jax
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "none"
    return (f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {devices[0].platform} "
            f"({len(devices)} x {kind})")


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(title: str, body: str, *, write: bool = True) -> str:
    """Print `body` under a dated heading and append it to BENCHMARKS.md."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv[0] else "(interactive)"
    text = (f"\n## {title}\n\n{datetime.date.today().isoformat()} · {machine()} · `{command}`\n\n{body}\n")
    print(text)
    if write:
        if not BENCHMARKS_MD.exists():
            BENCHMARKS_MD.write_text("# Benchmarks\n\nEvery entry: date, machine, the command that produced it.\n")
        with open(BENCHMARKS_MD, "a") as f:
            f.write(text)
    return text
