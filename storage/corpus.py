"""The embedded default corpus and the built-in byte-level tokenizer.

The corpus is the installed Python standard library's own source (*.py directly under the
stdlib directory, sorted by name): on every machine without a download, and deterministic for a
given Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; then BOS and EOS. Needs a vocabulary of at least 258."""

    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def embedded_corpus(max_bytes: int = 8 << 20) -> np.ndarray:
    """Token ids (int32) of the stdlib sources, each file framed by BOS ... EOS."""
    tok = ByteTokenizer()
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(root.glob("*.py")):
        ids += tok.encode(path.read_text(encoding="utf-8", errors="replace")) + [tok.eos_id]
        if len(ids) >= max_bytes:
            break
    if not ids:
        raise FileNotFoundError(f"no Python sources under {root}; pass a corpus explicitly")
    return np.asarray(ids[:max_bytes], np.int32)
