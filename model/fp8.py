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
from jaxtyping import Array, Float, Int

from model.common import silu_grad
from pallas_kernels import fp8_gemm, fp8_quant

BLOCK = 128


def _pad_axis(x: Array, axis: int) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % BLOCK)
    return jnp.pad(x, pad)


def _tiles(x: Float[Array, "R C"]):
    """1x128 tiles along C (the contracted axis)."""
    x = _pad_axis(x, 1)
    return fp8_quant.per_token_cast_to_fp8(x) if fp8_gemm.on_hopper() else fp8_quant.per_token_cast_to_fp8_reference(x)


def _blocks(w: Float[Array, "R C"]):
    """128x128 blocks; C is the contracted axis."""
    w = _pad_axis(w, 1)
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


# ---- routed experts: grouped FP8 GEMMs in DeepGEMM's contiguous layout --------------------------------
#
# Rows xs [Mp, D] hold each expert's token copies contiguously, every expert's run starting on a
# multiple of 128 (DeepGEMM's M alignment) and padded with zero rows; tile_group [Mp / 128] names the
# expert of each 128-row tile (-1: padding only). Fprop and Dgrad are m-grouped GEMMs (the Pallas
# contiguous kernel on Hopper; elsewhere the same quantised operands, dequantised, through a loop
# over tiles that reads each tile's expert weights in place). Wgrad is k-grouped (a sum over each
# expert's rows): its operands are quantised as in the dense recipe (xᵀ in 1x128 tiles along tokens,
# dyᵀ in 128x128 blocks; tiles never straddle experts since runs are 128-aligned) and accumulated
# per tile in float32 by XLA (there is no k-grouped kernel yet).

def tile_groups(run_rows: Int[Array, " G"], rows: int) -> Int[Array, " T"]:
    """The expert of each 128-row tile of a contiguous layout of `rows` rows whose runs (one per expert,
    in expert order from row 0, each a multiple of 128 long) have lengths run_rows; -1 past the last run."""
    tile_start = jnp.arange(rows // BLOCK) * BLOCK
    group = jnp.searchsorted(jnp.cumsum(run_rows), tile_start, side="right").astype(jnp.int32)
    return jnp.where(group < run_rows.shape[0], group, -1)


def grouped_nt(x: Float[Array, "Mp K"], w: Float[Array, "G N K"], tile_group: Array, out_dtype) -> Array:
    """out[r] = x[r]·w[e(r)]ᵀ with FP8 operands (x in 1x128 tiles, w in 128x128 blocks), fp32 accumulation;
    padding tiles give 0."""
    n = w.shape[1]
    a_q, a_s = _tiles(x)
    b_q, b_s = jax.vmap(_blocks)(_pad_axis(w, 1))                                   # per-expert 128x128 blocks
    if fp8_gemm.on_hopper():
        rows = jnp.repeat(tile_group, BLOCK)
        out = fp8_gemm.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), rows, out_dtype=out_dtype)
        return out[:, :n]
    a32 = fp8_gemm.dequantize_rows(a_q, a_s)
    b32 = jax.vmap(fp8_gemm.dequantize_blocks)(b_q, b_s)                            # [G, Np, Kp]

    def tile(a_g):                                                                 # one 128-row tile
        a, g = a_g
        return jnp.where(g >= 0, jnp.dot(a, b32[jnp.maximum(g, 0)].T, preferred_element_type=jnp.float32), 0)
    out = jax.lax.map(tile, (a32.reshape(-1, BLOCK, a32.shape[1]), tile_group))     # [T, 128, Np]
    return out.reshape(-1, out.shape[2])[:, :n].astype(out_dtype)


def grouped_wgrad(x: Float[Array, "Mp K"], dy: Float[Array, "Mp N"], tile_group: Array,
                  num_groups: int) -> Float[Array, "G K N"]:
    """dW[e] = Σ over expert e's rows of x[r]ᵀ·dy[r] (float32) with the dense recipe's Wgrad quantisation."""
    k, n = x.shape[1], dy.shape[1]
    xt = _pad_axis(x.reshape(-1, BLOCK, k), 2)                                      # [T, 128, Kp]
    dyt = _pad_axis(dy.reshape(-1, BLOCK, n), 2)                                    # [T, 128, Np]
    cast_t = fp8_quant.per_token_cast_to_fp8_reference
    cast_b = fp8_quant.per_block_cast_to_fp8_reference

    def tile(dw, t):
        a = fp8_gemm.dequantize_rows(*cast_t(xt[t].T))                               # [Kp, 128]: 1x128 along tokens
        b = fp8_gemm.dequantize_blocks(*cast_b(dyt[t].T))                            # [Np, 128]: 128x128 blocks
        g = tile_group[t]
        part = jnp.where(g >= 0, jnp.dot(a, b.T, preferred_element_type=jnp.float32), 0)
        return dw.at[jnp.maximum(g, 0)].add(part[:k, :n]), None

    dw, _ = jax.lax.scan(tile, jnp.zeros((num_groups, k, n), jnp.float32), jnp.arange(xt.shape[0]))
    return dw


@jax.custom_vjp
def grouped_swiglu(xs: Float[Array, "Mp D"], tile_group: Array, w_gate, w_up, w_down) -> Float[Array, "Mp D"]:
    """SwiGLU experts over the contiguous layout; gate, up and down are three FP8 linears (all three
    GEMMs of each in FP8), quantised exactly as `fp8_matmul` quantises a dense linear."""
    return _swiglu_fwd(xs, tile_group, w_gate, w_up, w_down)[0]


def _swiglu_fwd(xs, tile_group, w_gate, w_up, w_down):
    t = lambda w: jnp.swapaxes(w, 1, 2)  # noqa: E731   [G, K, N] -> [G, N, K]
    a = grouped_nt(xs, t(w_gate), tile_group, jnp.float32)                          # [Mp, F]
    b = grouped_nt(xs, t(w_up), tile_group, jnp.float32)
    h = (jax.nn.silu(a) * b).astype(xs.dtype)
    y = grouped_nt(h, t(w_down), tile_group, xs.dtype)                              # [Mp, D]
    return y, (xs, tile_group, w_gate, w_up, w_down, a, b, h)


def _swiglu_bwd(res, dy):
    xs, tile_group, w_gate, w_up, w_down, a, b, h = res
    G = w_down.shape[0]
    dh = grouped_nt(dy, w_down, tile_group, jnp.float32)                            # Dgrad [Mp, F]
    s = jax.nn.silu(a)
    da = (dh * b * silu_grad(a)).astype(xs.dtype)
    db = (dh * s).astype(xs.dtype)
    dx = (grouped_nt(da, w_gate, tile_group, jnp.float32)
          + grouped_nt(db, w_up, tile_group, jnp.float32)).astype(xs.dtype)         # Dgrad [Mp, D]
    cast = lambda g, w: g.astype(w.dtype)  # noqa: E731
    return (dx, None, cast(grouped_wgrad(xs, da, tile_group, G), w_gate),            # Wgrad [G, D, F]
            cast(grouped_wgrad(xs, db, tile_group, G), w_up), cast(grouped_wgrad(h, dy, tile_group, G), w_down))


grouped_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def batched_swiglu(x: Float[Array, "G T D"], w_gate, w_up, w_down) -> Float[Array, "G T D"]:
    """`grouped_swiglu` with expert g on the T rows x[g] (one fixed-size run per expert, the low-latency
    EP layout); each run is padded with zero rows to a multiple of 128, and a zero row gives a zero output."""
    G, T, D = x.shape
    xs = _pad_axis(x, 1)                                                           # [G, Tp, D]
    Tp = xs.shape[1]
    tile_group = tile_groups(jnp.full((G,), Tp), G * Tp)
    return grouped_swiglu(xs.reshape(G * Tp, D), tile_group, w_gate, w_up, w_down).reshape(G, Tp, D)[:, :T]
