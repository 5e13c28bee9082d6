"""Rotary position embedding on interleaved pairs, with YaRN frequency scaling.

DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ... of the 64-d rope slice. YaRN blends
interpolated and extrapolated frequencies with a linear ramp over the correction range and
scales cos/sin by the attention factor (see ANCHORS.md, model).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from model.config import ModelConfig, YarnConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, theta: float, yarn: YarnConfig | None) -> np.ndarray:
    """Inverse frequencies [dim/2], float32."""
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    if yarn is None:
        return extrapolation.astype(np.float32)
    interpolation = 1.0 / (yarn.factor * pos_freqs)
    low = math.floor(_correction_dim(yarn.beta_fast, dim, theta, yarn.original_max_position))
    high = math.ceil(_correction_dim(yarn.beta_slow, dim, theta, yarn.original_max_position))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_extrapolated = 1.0 - ramp
    return (interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated).astype(np.float32)


def rope_tables(positions: Int[Array, "B T"], cfg: ModelConfig) -> tuple[Float[Array, "B T R2"], Float[Array, "B T R2"]]:
    """cos and sin [B, T, R/2] (float32), attention factor applied."""
    inv_freq = jnp.asarray(inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = cfg.rope_scaling.attention_factor if cfg.rope_scaling else 1.0
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: Float[Array, "B T *H R"], cos: Float[Array, "B T R2"], sin: Float[Array, "B T R2"]):
    """Rotate interleaved pairs; x may carry a head axis between T and R."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:]).astype(x.dtype)
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:]).astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.reshape(x.shape)
