"""Launch the processes of a multi-process CPU run (jax.distributed over gloo) from a test."""

import os
import subprocess
import sys
from pathlib import Path

import portpicker
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_processes(worker: str, num_processes: int = 2, timeout: float = 300) -> list[str]:
    """Runs `tests/<worker> PORT PROCESS_ID` once per process; returns each one's output.

    Each process sets its own CPU device count, so the 8-device flags of this test process are
    not passed on. Fails the test (with the output's tail) if a process fails or times out.
    """
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / worker), str(port), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{worker}: the {num_processes}-process run timed out after {timeout} s")
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return outputs
