"""Storage benchmarks: the Grain loader vs raw sequential reads, Orbax checkpoint GB/s, KV-tier reads.

  python benchmarks/storage_bench.py [--layers 4] [--quick]

Loader: the embedded corpus prepared to ArrayRecord (zstd and uncompressed), then (a) a raw
sequential read of the same shard files (8 MiB reads) and (b) the full pipeline (shuffle, pack to
T, batch) delivering int32 tokens, in the same run; both read from the page cache the preparation
just filled. Checkpoint: the `small` preset's parameter shapes (fewer layers by default, to fit
this machine's memory), random fp32 values, async save until finalized, and restore.
KV tier: V3-shaped latent blocks (61 layers x 64 tokens x (512 + 64) bf16 = 4.5 MB), random
prefixes read back. Prints a table and appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
from storage import (Checkpointer, CorpusSource, KVTier, LoaderConfig, make_loader, open_corpus,  # noqa: E402
                     prepare_embedded_corpus)

GB = 1e9
NOTE = ("Raw reads come from the page cache (memory-copy speed), so \"% of raw\" is a worst case; "
        "the loader is single-threaded Python packing on top of ArrayRecord random access. "
        "The checkpoint uses the `small` preset's shapes with fewer layers (memory of this host). "
        "This host is shared: rates vary up to ~2x between runs.")


def raw_read(paths, chunk=8 << 20) -> tuple[int, float]:
    start, total = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while block := f.read(chunk):
                total += len(block)
    return total, time.perf_counter() - start


def bench_loader(root: Path, compression: str, seq_len: int, batch: int, max_tokens: int) -> list[dict]:
    out = root / compression.replace(":", "")
    prepare_embedded_corpus(out, max_tokens=max_tokens, compression=compression, progress=False)
    corpus = open_corpus(out)
    file_bytes, raw_s = min((raw_read(corpus.shard_paths) for _ in range(3)), key=lambda r: r[1])
    source = CorpusSource(corpus)
    order = np.random.default_rng(0).permutation(len(source))
    start = time.perf_counter()
    records = sum(source[int(i)].size for i in order)                # random access, no pipeline
    records_s = time.perf_counter() - start
    cfg = LoaderConfig(seq_len=seq_len, batch_size=batch, seed=0, num_epochs=1)
    loader = make_loader(corpus, cfg)
    next(loader)                                               # start the threads
    start, tokens = time.perf_counter(), 0
    for b in loader:
        tokens += b["tokens"].size
    loader_s = time.perf_counter() - start
    frac = tokens / corpus.num_tokens                          # of the files the loader consumed
    rows = [dict(what=f"raw sequential read ({compression} shards)", size=f"{file_bytes / 1e6:.1f} MB",
                 rate=f"{file_bytes / raw_s / GB:.2f} GB/s (file)", note="")]
    rows.append(dict(what=f"ArrayRecord random-access read of every document ({compression})",
                     size=f"{records / 1e6:.2f} M tokens",
                     rate=f"{records / records_s / 1e6:.1f} M tok/s = {records * 4 / records_s / GB:.3f} GB/s (int32)",
                     note=f"file bytes {100 * (file_bytes / records_s) / (file_bytes / raw_s):.1f}% of raw"))
    rows.append(dict(what=f"Grain loader, T={seq_len} B={batch} ({compression})",
                     size=f"{tokens / 1e6:.2f} M tokens",
                     rate=f"{tokens / loader_s / 1e6:.2f} M tok/s = {tokens * 4 / loader_s / GB:.3f} GB/s (int32)",
                     note=f"file bytes {file_bytes * frac / loader_s / GB:.3f} GB/s = "
                          f"{100 * (file_bytes * frac / loader_s) / (file_bytes / raw_s):.1f}% of raw"))
    return rows


def bench_checkpoint(root: Path, layers: int, compression: bool) -> list[dict]:
    cfg = model.ModelConfig.preset("small", num_layers=layers)
    abstract = nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
    state = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype)
                         if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype), state)
    m = nnx.merge(graphdef, state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    ckpt = Checkpointer(root / f"ckpt-{compression}", max_to_keep=1, compression=compression)
    start = time.perf_counter()
    ckpt.save(1, m)
    blocking = time.perf_counter() - start
    ckpt.wait()
    save_s = time.perf_counter() - start
    nnx.update(m, jax.tree.map(jnp.zeros_like, nnx.state(m)))
    start = time.perf_counter()
    ckpt.restore(m)
    jax.block_until_ready(nnx.state(m))
    restore_s = time.perf_counter() - start
    ckpt.close()
    ok = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(m))))
    n = model.param_count(m)
    size = f"{nbytes / GB:.2f} GB ({n / 1e6:.0f} M params fp32)"
    zstd = "zstd" if compression else "no compression"
    return [dict(what=f"checkpoint save, small preset with {layers} layers, {zstd} (async, to finalize)", size=size,
                 rate=f"{nbytes / save_s / GB:.2f} GB/s", note=f"train loop blocked {blocking:.2f} s"),
            dict(what=f"checkpoint restore, {zstd} (same shardings)", size=size,
                 rate=f"{nbytes / restore_s / GB:.2f} GB/s", note="bit-exact" if ok else "MISMATCH")]


def bench_kv(root: Path, blocks: int, prefix_blocks: int, reads: int) -> list[dict]:
    cfg = model.ModelConfig.preset("deepseek-v3")
    tier = KVTier.for_model(root / "kv", cfg, capacity_blocks=blocks)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, cfg.vocab_size, 64 * prefix_blocks) for _ in range(blocks // prefix_blocks)]
    ckv = rng.normal(size=(cfg.num_layers, 64 * prefix_blocks, cfg.kv_lora_rank)).astype(tier.dtype)
    krope = rng.normal(size=(cfg.num_layers, 64 * prefix_blocks, cfg.qk_rope_head_dim)).astype(tier.dtype)
    start = time.perf_counter()
    for toks in prefixes:
        tier.put(toks, ckv, krope)
    write_s = time.perf_counter() - start
    start, got = time.perf_counter(), 0
    for i in rng.integers(0, len(prefixes), reads):
        c, _ = tier.get(prefixes[i])
        got += c.shape[1] // 64
    read_s = time.perf_counter() - start
    size = f"{tier.block_bytes / 1e6:.2f} MB/block"
    return [dict(what=f"KV tier write, V3 blocks ({blocks} blocks)", size=size,
                 rate=f"{blocks * tier.block_bytes / write_s / GB:.2f} GB/s", note=""),
            dict(what=f"KV tier read, {prefix_blocks}-block prefixes x {reads}", size=size,
                 rate=f"{got * tier.block_bytes / read_s / GB:.2f} GB/s", note=f"{got / read_s:.0f} blocks/s")]


def table(rows: list[dict]) -> str:
    lines = ["| measurement | size | rate | note |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['size']} | {r['rate']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="layers of the `small` preset to checkpoint (12 = full)")
    p.add_argument("--corpus-tokens", type=int, default=8 << 20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kv-blocks", type=int, default=64)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="storage_bench_"))
    rows = []
    try:
        for compression in ("zstd:3", "uncompressed"):
            rows += bench_loader(root, compression, args.seq_len, args.batch, args.corpus_tokens)
        for compression in (False, True):
            rows += bench_checkpoint(root, args.layers, compression)
        rows += bench_kv(root, args.kv_blocks, 8, 32)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    text = table(rows)
    print(text)
    if not args.no_write:
        command = " ".join(["python benchmarks/storage_bench.py", *sys.argv[1:]])
        header = (f"\n## Storage: loader vs raw read, checkpoint and KV-tier GB/s\n\n"
                  f"{datetime.date.today()} · {platform.machine()}, {os.cpu_count()} cores (load average "
                  f"{os.getloadavg()[0]:.1f}), jax {jax.__version__} on {jax.default_backend()}, local disk, "
                  f"page cache warm · `{command}`\n\n{NOTE}\n\n")
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
