"""RMSNorm (Zhang & Sennrich), computed in float32 as DeepSeek and HF do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from model.common import param
from model.config import ModelConfig


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, " D"], eps: float) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dim: int, axis: str, *, rngs: nnx.Rngs):
        self.eps = cfg.rms_eps
        self.weight = param(rngs, cfg, (dim,), (axis,), init="ones")

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
