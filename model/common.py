"""Parameter creation with logical axis names, and dtype helpers.

Every parameter carries its logical axes (``out_sharding`` metadata in Flax NNX); the rules
table in ``sharding.mesh`` maps them to mesh axes. Flax's eager sharding is off: the model is
built unsharded (or abstractly) and placed by ``sharding.shard_model``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig


class RouterBias(nnx.Variable):
    """The aux-loss-free routing bias: updated by the load rule, never by gradients."""


def param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str | None, ...],
          init: str = "normal", dtype: str | None = None) -> nnx.Param:
    if len(shape) != len(axes):
        raise ValueError(f"parameter shape {shape} and logical axes {axes} differ in rank")
    dt = jnp.dtype(dtype or cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dt)
    elif init == "zeros":
        value = jnp.zeros(shape, dt)
    else:
        value = (cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def cast(w, cfg: ModelConfig):
    """A parameter's value in the compute dtype."""
    return jnp.asarray(w[...] if isinstance(w, nnx.Variable) else w, compute_dtype(cfg))


def silu_grad(a: jax.Array) -> jax.Array:
    """d silu(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a))): the hand-written SwiGLU backward passes."""
    s = jax.nn.sigmoid(a)
    return s * (1 + a * (1 - s))
