"""FP8 vs bfloat16 and float32 training of the `tiny` preset: same seed, same batches, loss gaps after N steps.

DeepSeek reports an FP8/BF16 loss gap under 0.25% at scale. The bfloat16 runs compute in bfloat16 over
float32 master weights (train.py --precision bf16 / fp8); FP8 runs once with float32 and once with
bfloat16 activations around its GEMMs. On CPU the FP8 GEMMs run as their jnp references
(quantise, dequantise, fp32 matmul), so this measures numerics, not speed.

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
    f32, bf16 = "float32", "bfloat16 (float32 master weights)"
    runs = {f32: cfg, bf16: cfg.replace(dtype="bfloat16"), "fp8 (e4m3, 1x128 / 128x128)": cfg.replace(fp8=True),
            "fp8 + bfloat16 (train.py --precision fp8)": cfg.replace(fp8=True, dtype="bfloat16")}
    results = {name: run(run_cfg, batches, 3e-3) for name, run_cfg in runs.items()}
    tail = max(args.steps // 10, 1)
    final = {name: float(np.mean(losses[-tail:])) for name, (losses, _) in results.items()}

    def gap(name, ref):
        return "-" if name == ref else f"{(final[name] - final[ref]) / final[ref]:+.2%}"
    rows = [[name, f"{losses[0]:.4f}", f"{final[name]:.4f}", gap(name, f32), gap(name, bf16), f"{wall:.0f}"]
            for name, (losses, wall) in results.items()]
    body = (f"`tiny` preset, {args.steps} steps of {args.batch}x{args.seq} tokens, same seed and batches; loss = "
            f"main-head cross-entropy, mean of the last {tail} steps. bfloat16: compute dtype bfloat16 over float32 "
            f"master weights and AdamW state (train.py --precision bf16; RMSNorm, attention softmax, router and loss "
            f"in float32). FP8 covers every linear layer: the MLA projections, the dense and shared-expert FFNs and "
            f"the routed experts (grouped GEMMs); the attention core, embedding, head and router stay full precision. "
            f"fp8 keeps float32 activations around the FP8 GEMMs; fp8 + bfloat16 (V3's setting: FP8 GEMMs inside a "
            f"bfloat16 model) computes the rest as the bfloat16 run does. One seed. Wall times are CPU references of "
            f"the FP8 GEMMs (and XLA:CPU's bfloat16), not their speed.\n\n"
            + table(["precision", "loss at step 1", "final loss", "gap vs float32", "gap vs bfloat16", "wall s (CPU)"],
                    rows))
    publish("FP8 vs full-precision training (tiny)", body, write=not args.no_write)


if __name__ == "__main__":
    main()
