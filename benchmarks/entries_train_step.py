"""GPU-suite entry for the FP8 training step (issue: FP8 training), `small` preset on the H200.

One optimizer step (forward, backward, AdamW, the aux-loss-free bias update: train.train_step)
with `--precision fp8` (DeepGEMM kernels for every linear layer's three GEMMs) against the same
step with `--precision bf16` (XLA's bf16 dots) from the same weights and batch, timed in the
same run. "x XLA" in the suite's table is bf16 step time / FP8 step time. The check compares
the two steps' losses (FP8 rounding moves the loss by well under 1% at initialisation).
Importing this module needs no GPU (and no grain: train.py imports storage lazily).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import model
import train
from benchmarks.registry import KernelEntry, register

SEQ, BATCH = 2048, 4                      # 8192 tokens a step on the GPU
_GRAPHDEFS: dict = {}


def _config(dry: bool, fp8: bool) -> model.ModelConfig:
    if dry:
        cfg = model.ModelConfig.preset("tiny", d_model=128, num_layers=2, moe_ffn_dim=64, dense_ffn_dim=256,
                                       vocab_size=512)
    else:
        cfg = model.ModelConfig.preset("small")
    return cfg.replace(fp8=fp8, dtype="bfloat16")


@functools.cache
def _graphdef(dry: bool, fp8: bool):
    m = nnx.eval_shape(lambda: model.Transformer(_config(dry, fp8), rngs=nnx.Rngs(0)))
    opt = nnx.eval_shape(lambda: nnx.Optimizer(m, optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1),
                                               wrt=nnx.Param))
    return nnx.graphdef((m, opt))


def _make_inputs(dry: bool):
    """(model+optimizer state, batch): the same state serves both precisions (fp8 is static)."""
    m = model.Transformer(_config(dry, True), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    seq, batch = (32, 2) if dry else (SEQ, BATCH)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, m.cfg.vocab_size)
    return nnx.state((m, opt)), train.batch_from_tokens(tokens)


def _step(fp8: bool, dry: bool, state, batch):
    m, opt = nnx.merge(_graphdef(dry, fp8), state)
    metrics = train.train_step(m, opt, batch, mtp_weight=0.3, gamma=1e-3)
    return metrics["loss"], nnx.state((m, opt))     # the new state: the update is not dead code


def _dry(state) -> bool:
    """The dry (CPU) case is the only one under 50 M parameters (the `small` preset has 1.37 B)."""
    return sum(x.size for x in jax.tree.leaves(state)) < 50_000_000


def _kernel(state, batch, interpret=False):
    return _step(True, _dry(state), state, batch)


def _reference(state, batch):
    return _step(False, _dry(state), state, batch)


def _error(got, want):
    return float(abs(got[0] - want[0]) / abs(want[0]))


def _flops(state, batch):
    cfg = _config(_dry(state), True)
    tokens = batch["tokens"]
    return float(train.flops_per_token(cfg, tokens.shape[1]) * tokens.size)


def _bytes(state, batch):
    return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


register(KernelEntry(
    name=f"train_step fp8 vs bf16 small preset B={BATCH} T={SEQ}",
    make_inputs=_make_inputs, kernel=_kernel, reference=_reference, error=_error,
    tolerance=0.01, flops=_flops, bytes=_bytes, baselines={"bf16_step": jax.jit(_reference)},
    bound="compute", peak="bf16", quick=True,
    limit_s=300.0,       # two 1.4 B-parameter steps to compile, one with 93 Mosaic kernels
))
