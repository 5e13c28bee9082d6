"""The training setup shared by the two-process worker and the single-process reference."""

import contextlib

import jax
import numpy as np
import optax
from flax import nnx

import model
import sharding
import train

STEPS = 3
CFG = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2)


def global_tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 33)).astype(np.int32)


def make_state(mesh=None):
    m = model.Transformer(CFG, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1))
    if mesh is None:
        return m, nnx.Optimizer(m, tx, wrt=nnx.Param)
    m = sharding.shard_model(m, mesh)
    return m, sharding.shard_model(nnx.Optimizer(m, tx, wrt=nnx.Param), mesh)


def run_steps(m, opt, batch_fn, mesh=None) -> list[float]:
    losses = []
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for _ in range(STEPS):
            metrics = train.train_step(m, opt, batch_fn(), 0.3, 1e-3)
            losses.append(float(metrics["loss"]))
    return losses
