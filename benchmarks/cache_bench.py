"""The serving engine's decode speed by paged-cache storage, on this machine: output tokens/s.

One model with DeepSeek-V3's latent widths (512 + 64, so decode goes through FlashMLA's interface:
the kernel on a GPU, its reference elsewhere), tiny otherwise, serves the same greedy requests
with each cache storage, over a small and a large block pool (the pool holds every layer's
blocks; serving sizes it to the memory it has, not to the batch). Storages:

  float32           4 bytes a value
  bfloat16          what the engine uses for bf16: on CPU stored as uint16 bits (CacheSpec.bf16_bits)
  bfloat16, as bf16 the same cache stored as bfloat16 (what a GPU engine does); on CPU XLA compiles
                    its scatter as a float32 round trip of the whole pool
  fp8               FlashMLA's 656-byte token layout

Each engine runs once to compile, then the storages take turns (`--repeat` rounds); medians count.
The ratio is tokens/s over float32's at the same pool.

    python -m benchmarks.cache_bench [--pools 256 2048] [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from flax import nnx

import model
from benchmarks.report import publish, table
from serving import Engine, EngineConfig, SamplingParams
from serving import cache as paged

LAYERS, BATCH, PROMPT, NEW = 4, 4, 40, 64


def _engine(net, pool: int, storage: str) -> Engine:
    dtype = "bfloat16" if storage.startswith("bfloat16") else storage
    engine = Engine(net, EngineConfig(num_blocks=pool // LAYERS, cache_dtype=dtype, decode_steps=8))
    if storage == "bfloat16, as bf16":             # the storage a GPU engine keeps, forced here
        engine.spec = dataclasses.replace(engine.spec, bf16_bits=False)
        engine.kv = paged.init_cache(engine.spec)
        engine._build(net)
    return engine


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", type=int, nargs="+", default=[256, 2048], help="cache blocks, all layers")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cfg = model.ModelConfig.preset("tiny", num_layers=LAYERS, kv_lora_rank=512, qk_rope_head_dim=64, d_model=128,
                                   mtp_depth=0, max_seq_len=512)
    net = model.Transformer(cfg, rngs=nnx.Rngs(1))
    prompts = [[int(t) for t in np.random.default_rng(i).integers(0, cfg.vocab_size, PROMPT)] for i in range(BATCH)]
    requests = [(prompt, SamplingParams(max_tokens=NEW)) for prompt in prompts]
    storages = ["float32", "bfloat16", "bfloat16, as bf16", "fp8"]
    rows = []
    for pool in args.pools:
        engines = {s: _engine(net, pool, s) for s in storages}
        outputs = {s: e.run(requests) for s, e in engines.items()}      # compile
        times = {s: [] for s in storages}
        for _ in range(args.repeat):
            for s, e in engines.items():
                start = time.perf_counter()
                outputs[s] = e.run(requests)
                times[s].append(time.perf_counter() - start)
        tokens = {s: sum(len(c.token_ids) for c in out) for s, out in outputs.items()}
        rate = {s: tokens[s] / float(np.median(times[s])) for s in storages}
        for s in storages:
            e = engines[s]
            rows.append([pool, s, str(e.kv.dtype), f"{e.spec.bytes_per_token}", f"{rate[s]:.0f}",
                         f"{rate[s] / rate['float32']:.2f}"])
            print(rows[-1], flush=True)
    body = (f"A {LAYERS}-layer model with V3's latent widths (512 + 64; d_model 128), {BATCH} requests of "
            f"{PROMPT} prompt tokens, {NEW} greedy tokens each, 8 decode steps a call; median of {args.repeat}.\n\n"
            + table(["pool (blocks, all layers)", "cache", "stored as", "bytes/token", "tokens/s", "x float32"], rows))
    publish("Serving decode by cache storage", body, write=not args.no_write)
    return rows


if __name__ == "__main__":
    main()
