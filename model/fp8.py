"""FP8 linear layers: the DeepSeek-V3 mixed-precision recipe (V3 report §3.3).

All three GEMMs of a linear layer run in e4m3 with fine-grained scales and FP32 promotion every
128 of K: Fprop y = x·W (x in 1x128 tiles, W in 128x128 blocks), Dgrad dx = dy·Wᵀ (dy in 1x128
tiles, W in blocks) and Wgrad dW = xᵀ·dy (xᵀ in 1x128 tiles along the token axis, dyᵀ in 128x128
blocks, the scale layout the dense kernel's B operand takes).
The DeepGEMM Pallas kernels run on Hopper, their jnp references elsewhere, behind one call.
Contracted dimensions are zero-padded to a multiple of 128 (padding leaves products unchanged).

Letters: M rows (tokens), K input features, N output features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import fp8_gemm, fp8_quant

BLOCK = 128


def _pad_cols(x: Array) -> Array:
    return jnp.pad(x, ((0, 0), (0, -x.shape[1] % BLOCK)))


def _tiles(x: Float[Array, "R C"]):
    """1x128 tiles along C (the contracted axis)."""
    x = _pad_cols(x)
    return fp8_quant.per_token_cast_to_fp8(x) if fp8_gemm.on_hopper() else fp8_quant.per_token_cast_to_fp8_reference(x)


def _blocks(w: Float[Array, "R C"]):
    """128x128 blocks; C is the contracted axis."""
    w = _pad_cols(w)
    return fp8_quant.per_block_cast_to_fp8(w) if fp8_gemm.on_hopper() else fp8_quant.per_block_cast_to_fp8_reference(w)


def _gemm_nt(a_sa, b_sb, out_dtype) -> Array:
    return fp8_gemm.fp8_gemm_nt_auto(a_sa, b_sb, out_dtype=out_dtype)


@jax.custom_vjp
def fp8_matmul(x: Float[Array, "M K"], w: Float[Array, "K N"]) -> Float[Array, "M N"]:
    return _gemm_nt(_tiles(x), _blocks(w.T), x.dtype)


def _fwd(x, w):
    return fp8_matmul(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    dx = _gemm_nt(_tiles(dy), _blocks(w), x.dtype)                          # Dgrad: [M, N]·[K, N]ᵀ
    # Wgrad [K, M]·[N, M]ᵀ: x in 1x128 tiles along tokens; dy in 128x128 blocks (the B operand of
    # the DeepGEMM dense kernel takes block scales)
    dw = _gemm_nt(_tiles(x.T), _blocks(dy.T), jnp.float32).astype(w.dtype)
    return dx, dw


fp8_matmul.defvjp(_fwd, _bwd)


def project(x: Float[Array, "... K"], w: Float[Array, "K ..."], contract: int = 1, *, fp8: bool) -> Array:
    """x's last `contract` axes times w's first `contract` axes (a linear layer, any head layout)."""
    lead, k_shape = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    if w.shape[:contract] != k_shape:
        raise ValueError(f"cannot contract x {x.shape} with w {w.shape} over {contract} axes")
    out_shape = w.shape[contract:]
    x2 = x.reshape(-1, math.prod(k_shape))
    w2 = w.reshape(x2.shape[1], -1)
    y = fp8_matmul(x2, w2) if fp8 else jnp.dot(x2, w2)
    return y.reshape(lead + out_shape)
