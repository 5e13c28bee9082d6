"""Corpus preparation: text (files, globs, JSONL fields) -> tokenized ArrayRecord shards + manifest.

One record is one document: its token ids framed BOS ... EOS, as little-endian uint16 when the
vocabulary fits in 65,536 ids (half the bytes to store and read) and int32 otherwise.
`manifest.json` beside the shards names the tokenizer, the token dtype, the shards (records,
tokens, bytes, sha256) and the totals; `open_corpus` checks it before anything is read.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from storage.corpus import ByteTokenizer

MANIFEST = "manifest.json"
FORMAT = "orcinus.corpus/1"
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}       # name -> on-disk dtype
_BOS_NAMES = ("<|begin▁of▁sentence|>", "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_NAMES = ("<|end▁of▁sentence|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")


class CorpusError(ValueError):
    """A prepared corpus is missing, incomplete or corrupt; the message names the file and the fix."""


# ---- tokenizers ---------------------------------------------------------------------------------

class HFTokenizer:
    """A Hugging Face `tokenizer.json` (via `tokenizers`), with BOS/EOS found by name or given."""

    def __init__(self, path: str | os.PathLike, bos: str | None = None, eos: str | None = None):
        from tokenizers import Tokenizer
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist; pass a Hugging Face tokenizer.json")
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(bos, _BOS_NAMES, "bos")
        self.eos_id = self._special(eos, _EOS_NAMES, "eos")

    def _special(self, name: str | None, candidates: Sequence[str], what: str) -> int:
        for cand in ([name] if name else candidates):
            i = self._tok.token_to_id(cand)
            if i is not None:
                return i
        raise ValueError(f"{self.path}: no {what} token among {[name] if name else list(candidates)}; "
                         f"name it with {what}=...")

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str | os.PathLike = "byte") -> Tokenizer:
    """'byte' -> the built-in byte tokenizer; a path -> that Hugging Face tokenizer.json."""
    return ByteTokenizer() if str(spec) == "byte" else HFTokenizer(spec)


def tokenizer_info(tok: Tokenizer) -> dict:
    if isinstance(tok, ByteTokenizer):
        return dict(kind="byte", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return dict(kind="huggingface", file=tok.path.name, sha256=sha256_file(tok.path),
                vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)


# ---- inputs -------------------------------------------------------------------------------------

def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files and globs (sorted within each glob), in the order given; a pattern matching nothing is an error."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in map(str, inputs):
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        matches = [m for m in matches if not Path(m).is_dir()]
        if not matches or not Path(matches[0]).exists():
            raise FileNotFoundError(f"input {item!r} matches no file; check the path or glob")
        files += map(Path, matches)
    return files


def iter_documents(path: Path, jsonl_field: str = "text") -> Iterator[str]:
    """A .jsonl/.json-lines file yields one document per line (its `jsonl_field`); any other file is one."""
    if path.suffix not in (".jsonl", ".ndjson"):
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or drop the line") from None
            if not isinstance(record, dict) or jsonl_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {jsonl_field!r}; pass jsonl_field= naming the text field")
            yield str(record[jsonl_field])


def stdlib_sources() -> list[Path]:
    """The embedded corpus's inputs: *.py directly under the installed stdlib, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def token_dtype(vocab_size: int, name: Literal["uint16", "int32"] | None = None) -> np.dtype:
    """The on-disk token dtype: `name`'s, or the smallest that holds `vocab_size` ids."""
    if name is None:
        name = "uint16" if vocab_size <= 1 << 16 else "int32"
    if name not in TOKEN_DTYPES:
        raise ValueError(f"dtype={name!r} must be one of {list(TOKEN_DTYPES)} (or None: chosen from the vocabulary)")
    if name == "uint16" and vocab_size > 1 << 16:
        raise ValueError(f"dtype='uint16' cannot hold a vocabulary of {vocab_size:,} ids; use 'int32'")
    return TOKEN_DTYPES[name]


# ---- writing ------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Rolls to a new `shard-NNNNN.array_record` when the current one holds `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, shard_tokens: int, compression: str, dtype: np.dtype):
        self.out_dir, self.shard_tokens, self.dtype = out_dir, shard_tokens, dtype
        self.options = f"group_size:1,{compression}"
        self.shards: list[dict] = []
        self._writer = None

    def write(self, ids: np.ndarray):
        if self._writer is None or self.shards[-1]["num_tokens"] >= self.shard_tokens:
            self._roll()
        self._writer.write(ids.astype(self.dtype).tobytes())
        self.shards[-1]["num_records"] += 1
        self.shards[-1]["num_tokens"] += int(ids.size)

    def _roll(self):
        self._close_current()
        name = f"shard-{len(self.shards):05d}.array_record"
        self._writer = array_record_module.ArrayRecordWriter(str(self.out_dir / name), self.options)
        self.shards.append(dict(path=name, num_records=0, num_tokens=0))

    def _close_current(self):
        if self._writer is not None:
            self._writer.close()
            shard = self.shards[-1]
            path = self.out_dir / shard["path"]
            shard.update(bytes=path.stat().st_size, sha256=sha256_file(path))
            self._writer = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def prepare_corpus(inputs, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | Tokenizer = "byte",
                   jsonl_field: str = "text", shard_tokens: int = 16 << 20, max_tokens: int | None = None,
                   compression: str = "zstd:3", dtype: Literal["uint16", "int32"] | None = None,
                   progress: bool = True, name: str = "corpus") -> dict:
    """Tokenize `inputs` (files / globs / JSONL) into ArrayRecord shards under `out_dir`; return the manifest.

    Each document is BOS + tokens + EOS. `max_tokens` stops after the input file that reaches it.
    The manifest is written last, so a directory without one is an interrupted preparation.
    `compression`: an ArrayRecord option, "zstd:<level>", "snappy" or "uncompressed" (one record per
    chunk either way, for random access).
    `dtype`: the tokens' on-disk type; None: uint16 when the vocabulary has at most 65,536 ids, else int32.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    dtype = token_dtype(tok.vocab_size, dtype)
    files = expand_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / MANIFEST, *out.glob("shard-*.array_record")]:
        stale.unlink(missing_ok=True)
    writer, num_docs, num_tokens = _ShardWriter(out, shard_tokens, compression, dtype), 0, 0
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
               desc=f"prepare {name}", disable=not progress)
    try:
        for path in files:
            for text in iter_documents(path, jsonl_field):
                ids = np.asarray(tok.encode(text) + [tok.eos_id], np.int64)
                writer.write(ids)
                num_docs, num_tokens = num_docs + 1, num_tokens + ids.size
            bar.update(path.stat().st_size)
            bar.set_postfix(docs=num_docs, tokens=num_tokens, refresh=False)
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    finally:
        shards = writer.close()
        bar.close()
    if not num_docs:
        raise ValueError(f"inputs {[str(f) for f in files]} hold no documents")
    manifest = dict(format=FORMAT, name=name, tokenizer=tokenizer_info(tok), dtype=dtype.str,
                    compression=compression,
                    num_documents=num_docs, num_tokens=int(num_tokens), shards=shards,
                    checksum=hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest())
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def prepare_embedded_corpus(out_dir: str | os.PathLike, *, max_tokens: int = 8 << 20,
                            shard_tokens: int = 16 << 20, compression: str = "zstd:3",
                            dtype: Literal["uint16", "int32"] | None = None, progress: bool = True) -> dict:
    """The embedded default corpus (stdlib sources, byte tokenizer) through `prepare_corpus`.

    Deterministic for a Python version: same files, same order, same shards, same checksum.
    """
    return prepare_corpus(stdlib_sources(), out_dir, tokenizer="byte", shard_tokens=shard_tokens,
                          max_tokens=max_tokens, compression=compression, dtype=dtype, progress=progress,
                          name="python-stdlib")


# ---- reading back -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Corpus:
    """A checked, prepared corpus: its directory, manifest and shard paths."""

    root: Path
    manifest: dict

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s["path"] for s in self.manifest["shards"]]

    @property
    def num_documents(self) -> int:
        return self.manifest["num_documents"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    @property
    def dtype(self) -> np.dtype:
        """The tokens' on-disk dtype (little-endian uint16 or int32)."""
        return np.dtype(self.manifest["dtype"])


def _fix(root: Path) -> str:
    return f"re-run prepare_corpus(..., out_dir={str(root)!r}) (or `python -m storage.prepare`) to rebuild it"


def open_corpus(root: str | os.PathLike, *, verify_checksums: bool = False) -> Corpus:
    """Read and check a prepared corpus: manifest present and complete, every shard present with
    the size and record count the manifest states (catches truncation); with `verify_checksums`,
    every shard's sha256 too (reads all bytes)."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise CorpusError(f"{mpath} is missing: {root} is not a prepared corpus, or its preparation was "
                          f"interrupted; {_fix(root)}")
    try:
        manifest = json.loads(mpath.read_text())
        assert manifest["format"] == FORMAT and manifest["shards"]
        assert np.dtype(manifest["dtype"]) in TOKEN_DTYPES.values()
    except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
        raise CorpusError(f"{mpath} is not an {FORMAT} manifest; {_fix(root)}") from None
    for shard in manifest["shards"]:
        _check_shard(root, shard, verify_checksums)
    return Corpus(root, manifest)


def _check_shard(root: Path, shard: dict, verify_checksum: bool):
    path = root / shard["path"]
    if not path.is_file():
        raise CorpusError(f"shard {path} named in the manifest is missing; {_fix(root)}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CorpusError(f"shard {path} is {size} bytes but the manifest says {shard['bytes']}: it is "
                          f"truncated or was replaced; {_fix(root)}")
    try:
        reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
        n = reader.num_records()
        reader.close()
    except RuntimeError as e:
        raise CorpusError(f"shard {path} cannot be opened ({e}): it is corrupt; {_fix(root)}") from None
    if n != shard["num_records"]:
        raise CorpusError(f"shard {path} holds {n} records but the manifest says {shard['num_records']}: "
                          f"it is truncated or corrupt; {_fix(root)}")
    if verify_checksum and sha256_file(path) != shard["sha256"]:
        raise CorpusError(f"shard {path} fails its sha256 checksum: it is corrupt; {_fix(root)}")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Tokenize text into ArrayRecord shards (or the embedded corpus).")
    p.add_argument("out_dir")
    p.add_argument("inputs", nargs="*", help="files or globs; none = the embedded stdlib corpus")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a Hugging Face tokenizer.json")
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--shard-tokens", type=int, default=16 << 20)
    p.add_argument("--dtype", choices=list(TOKEN_DTYPES), default=None,
                   help="on-disk token dtype (default: uint16 when the vocabulary fits, else int32)")
    args = p.parse_args(argv)
    if args.inputs:
        m = prepare_corpus(args.inputs, args.out_dir, tokenizer=args.tokenizer, jsonl_field=args.jsonl_field,
                           shard_tokens=args.shard_tokens, dtype=args.dtype)
    else:
        m = prepare_embedded_corpus(args.out_dir, shard_tokens=args.shard_tokens, dtype=args.dtype)
    print(f"{args.out_dir}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, "
          f"{len(m['shards'])} shards, checksum {m['checksum'][:16]}")


if __name__ == "__main__":
    main()
