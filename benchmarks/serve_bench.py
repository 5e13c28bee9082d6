"""The serving engine vs Hugging Face transformers `generate` on CPU: output tokens/s, same weights.

For each completion length (`--new`: short completions, where prefill weighs more, and longer
ones, where decode dominates) and batch size, the same random prompts go through the serving
engine (paged latent cache, continuous batching, greedy; one engine, and `DataParallelEngine`
with one replica per core) and through transformers' DeepseekV3ForCausalLM.generate (greedy, its
dynamic KV cache), both in float32, in one process. Each engine is built once and serves every
run, as a live server does (its construction, like transformers' model load, is not timed). Each
side runs once to warm up (our step functions compile there); then the sides take turns
(orcinus, transformers at 1 torch thread, transformers at one per core, `--repeat` rounds), each
running twice in its turn and timed the second time, so every timed run starts warm and a noisy
neighbour on a shared machine slows both sides alike; each side's median counts. transformers'
faster thread setting counts (on a loaded machine torch's spinning OpenMP threads can be 10x
slower than one thread).
Ratios > 1 mean orcinus is faster.

    python -m benchmarks.serve_bench [--batches 1 16] [--prompt 32] [--new 64 192] [--no-write]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np
import torch
import transformers

import model
from benchmarks.hf_compare import tiny_pair
from benchmarks.report import publish, table
from serving import EngineConfig, SamplingParams, make_engine


def _medians(fns: dict, repeat: int) -> dict:
    """{name: (median seconds, last result)}: `repeat` rounds in which each side in turn runs twice,
    untimed then timed, so every timed run starts warm (compiled, its caches and threads hot) as in
    steady serving, and machine noise spreads over both sides alike."""
    results = {name: fn() for name, fn in fns.items()}                # warm-up (compilation)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(times[name])), results[name]) for name in fns}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, nargs="+", default=[64, 192])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--price-per-hour", type=float, default=2.0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cfg, ours, theirs = tiny_pair()
    theirs.eval()
    load = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (max(args.batches), args.prompt)).astype(np.int32)
    rows, last_stats = [], None
    cores = os.cpu_count() or 1
    for new in args.new:                                           # a row set per completion length
        params = SamplingParams(max_tokens=new)
        for b in args.batches:
            ours_fns, engines = {}, {}
            for replicas in sorted({1, min(b, cores)}):                # one engine; one replica per core
                running = -(-b // replicas)
                config = EngineConfig(max_running=running, num_blocks=running * -(-(args.prompt + new) // 64),
                                      replicas=replicas)
                engines[replicas] = make_engine(ours, config)          # a live engine serves every run

                def run_ours(b=b, engine=engines[replicas]):
                    return engine.run([(list(r), params) for r in prompts[:b]])
                ours_fns[replicas] = run_ours

            def run_theirs(b=b, threads=1):
                torch.set_num_threads(threads)
                ids = torch.as_tensor(prompts[:b], dtype=torch.long)
                with torch.no_grad():
                    out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False)
                return out[:, args.prompt:].numpy()

            theirs_fns = {n: functools.partial(run_theirs, threads=n) for n in sorted({1, cores})}
            timed = _medians({**{("ours", r): fn for r, fn in ours_fns.items()}, **theirs_fns}, args.repeat)
            threads = min((k for k in timed if not isinstance(k, tuple)), key=lambda k: timed[k][0])
            t_theirs, theirs_ids = timed[threads]
            tokens = b * new
            for replicas in ours_fns:
                t_ours, done = timed[("ours", replicas)]
                agree = float(np.mean(np.array([c.token_ids for c in done]) == theirs_ids))
                stats = engines[replicas].stats.summary(args.price_per_hour)
                rows.append([b, f"{b} x ({args.prompt}+{new})", replicas, tokens / t_ours, tokens / t_theirs,
                             threads, t_theirs / t_ours,
                             1e3 * stats["ttft_p50_s"], 1e3 * stats["tpot_p50_s"], f"{agree:.0%}"])
                last_stats = stats
    body = (f"`tiny` preset ({model.param_count(ours):,} parameters, no MTP), float32, same weights, greedy; "
            f"transformers {transformers.__version__}, torch {torch.__version__}. "
            "orcinus: serving.make_engine (paged latent cache, continuous batching, default EngineConfig but "
            "max_running = batch / replicas): one engine, and one data-parallel replica per core (each its own "
            "cache and batch, stepping concurrently), each built once and serving every run (TTFT/TPOT are its "
            "medians over them); transformers: `generate` with its KV cache. Timed after "
            "one warm-up run "
            f"(compilation excluded), median of {args.repeat} runs taken in turns with transformers' (each "
            "timed run right after an untimed one of the same side); "
            "transformers at its faster torch thread count. "
            f"1-minute load average at the start: {load:.2f} on {os.cpu_count()} cores.\n\n"
            + table(["batch", "shape", "orcinus replicas", "orcinus tok/s", "transformers tok/s", "torch threads",
                     "orcinus / transformers",
                     "orcinus TTFT p50 ms", "orcinus TPOT p50 ms", "greedy tokens identical"], rows)
            + f"\n\nCost at ${args.price_per_hour:.2f}/accelerator-hour (this CPU as the accelerator, "
            f"{args.batches[-1]} x ({args.prompt}+{args.new[-1]}), one replica per core): "
            f"${last_stats['usd_per_m_input_tokens']:.3f} per M input tokens, "
            f"${last_stats['usd_per_m_output_tokens']:.3f} per M output tokens.")
    publish("Serving engine vs transformers generate on CPU", body, write=not args.no_write)


if __name__ == "__main__":
    main()
