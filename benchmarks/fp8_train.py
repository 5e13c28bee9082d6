"""FP8 vs full-precision training of the `tiny` preset: same seed, same batches, loss gap after N steps.

DeepSeek reports an FP8/BF16 loss gap under 0.25% at scale. On CPU the FP8 GEMMs run as their jnp
references (quantise, dequantise, fp32 matmul), so this measures numerics, not speed.

    python -m benchmarks.fp8_train [--steps 150] [--no-write]
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import model
import train
from benchmarks.report import publish, table
from storage.corpus import embedded_corpus


def run(cfg: model.ModelConfig, batches: list, lr: float) -> tuple[list[float], float]:
    m = model.Transformer(cfg, rngs=nnx.Rngs(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, len(batches) // 10, len(batches), lr * 0.1)
    opt = nnx.Optimizer(m, optax.chain(optax.clip_by_global_norm(1.0),
                                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1)), wrt=nnx.Param)
    losses, start = [], time.perf_counter()
    for batch in batches:
        losses.append(float(train.train_step(m, opt, batch, 0.3, 1e-3)["main"]))
    return losses, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    corpus = embedded_corpus()
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(np.stack([corpus[s:s + args.seq + 1] for s in
                                     rng.integers(0, len(corpus) - args.seq - 1, args.batch)]))
               for _ in range(args.steps)]
    cfg = model.ModelConfig.preset("tiny")
    full, t_full = run(cfg, batches, 3e-3)
    fp8, t_fp8 = run(cfg.replace(fp8=True), batches, 3e-3)
    tail = max(args.steps // 10, 1)
    f_end, q_end = float(np.mean(full[-tail:])), float(np.mean(fp8[-tail:]))
    rows = [["float32", f"{full[0]:.4f}", f"{f_end:.4f}", "-", f"{t_full:.0f}"],
            ["fp8 (e4m3, 1x128 / 128x128)", f"{fp8[0]:.4f}", f"{q_end:.4f}", f"{(q_end - f_end) / f_end:+.2%}",
             f"{t_fp8:.0f}"]]
    body = (f"`tiny` preset, {args.steps} steps of {args.batch}x{args.seq} tokens, same seed and batches; loss = "
            f"main-head cross-entropy, mean of the last {tail} steps. FP8 covers every linear layer: the MLA projections, the "
            f"dense and shared-expert FFNs and the routed experts (grouped GEMMs); the attention core, embedding, head "
            f"and router stay full precision. Wall times are CPU references of the FP8 GEMMs, not FP8 speed.\n\n"
            + table(["precision", "loss at step 1", "final loss", "gap vs float32", "wall s (CPU)"], rows))
    publish("FP8 vs full-precision training (tiny)", body, write=not args.no_write)


if __name__ == "__main__":
    main()
