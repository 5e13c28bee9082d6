"""GPU-suite entries for the DeepGEMM-style FP8 GEMMs (pallas_kernels/fp8_gemm.py).

Shapes are DeepGEMM's published ones (ANCHORS.md): dense M 64/128/4096 x N 7168 x K 16384 and
M 64 x N 2112 x K 7168; grouped contiguous 4 groups x 8192 rows x N 4096 x K 7168; grouped
masked 4 groups x up to 256 rows at (N 4096, K 7168) and (N 7168, K 2048).
Each entry's args are (a, sa, b, sb, <grouping>, a_bf16, b_bf16): the FP8 operands and their
scales, then bf16 copies of the same values for the bf16 baseline (made once, not timed).

Baselines, timed in the same run:
  xla_fp8_dot  XLA's own fp8 dot: e4m3 operands, preferred_element_type f32, then one scale
               per row of A and per 128 columns of B's first K block (XLA has no per-128-K
               scaling; this is the throughput peer, not the same numerics).
  bf16_dot     jnp.dot of the bf16 copies, f32 accumulation, bf16 out.
Importing this module needs no GPU; make_inputs(dry=True) gives tiny shapes for the CPU dry run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.registry import KernelEntry, register
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as fq

FP8 = jnp.float8_e4m3fn


def calc_diff(x, y) -> float:
    """DeepGEMM's metric 1 - 2Σxy/Σ(x²+y²)."""
    x, y = jnp.asarray(x, jnp.float32).ravel(), jnp.asarray(y, jnp.float32).ravel()
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom else 0.0


@functools.partial(jax.jit, static_argnames=("lead", "m", "n", "k", "seed"))
def _operands(lead: tuple, m: int, n: int, k: int, seed: int):
    """Quantised random activations [*lead, m, k] and weights [*lead?, n, k] + bf16 copies."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (*lead, m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (*lead, n, k), jnp.bfloat16)
    cast_x, cast_w = fq.per_token_cast_to_fp8_reference, fq.per_block_cast_to_fp8_reference
    for _ in lead:
        cast_x, cast_w = jax.vmap(cast_x), jax.vmap(cast_w)
    (a, sa), (b, sb) = cast_x(x), cast_w(w)
    a16 = fg.dequantize_rows(a, sa).astype(jnp.bfloat16)
    b16 = fg.dequantize_blocks(b, sb).astype(jnp.bfloat16)
    return a, sa, b, sb, a16, b16


def _scale_cols(sb, n: int):  # [.., NB, KB] -> [.., 1, N]: B's first-K-block scale per column
    return jnp.repeat(sb[..., :, 0], fg.SCALE_BLOCK, axis=-1)[..., None, :n]


# --- dense ------------------------------------------------------------------------------

def _dense(m, n, k, config: fg.TuningConfig | None = None):
    def make_inputs(dry: bool):
        # Dry: a padded M, and an N that is not a multiple of 128 where the real one is not.
        mm, nn, kk = (min(m, 64) + 36, 192 if n % 128 else 128, 256) if dry else (m, n, k)
        return _operands((), mm, nn, kk, seed=0)

    def kernel(a, sa, b, sb, a16, b16, interpret=False):
        return fg.fp8_gemm_nt((a, sa), (b, sb), interpret=interpret, config=config)

    def reference(a, sa, b, sb, a16, b16):
        return fg.fp8_gemm_nt_reference((a, sa), (b, sb))

    @jax.jit
    def xla_fp8_dot(a, sa, b, sb, a16, b16):
        acc = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)      # [M, N]
        return (acc * sa[:, :1] * _scale_cols(sb, b.shape[0])[0]).astype(jnp.bfloat16)

    @jax.jit
    def bf16_dot(a, sa, b, sb, a16, b16):
        return jnp.einsum("mk,nk->mn", a16, b16, preferred_element_type=jnp.float32
                          ).astype(jnp.bfloat16)

    def flops(a, sa, b, sb, *_):
        return 2.0 * a.shape[0] * b.shape[0] * a.shape[1]

    def nbytes(a, sa, b, sb, *_):
        return float(a.size + b.size + 4 * (sa.size + sb.size) + 2 * a.shape[0] * b.shape[0])

    tag = "" if config is None else (f" block_m={config.block_m} block_n={config.block_n}"
                                     f" stages={config.max_concurrent_steps}"
                                     + (f" split_k={config.split_k}" if config.split_k > 1 else "")
                                     + (f" grid_tile_m={config.grid_tile_m}"
                                        if config.grid_tile_m != fg.TuningConfig.grid_tile_m else ""))
    register(KernelEntry(
        name=f"deep_gemm fp8_gemm_nt m={m} n={n} k={k}{tag}",
        make_inputs=make_inputs, kernel=kernel, reference=reference,
        error=calc_diff, tolerance=1e-5, flops=flops, bytes=nbytes,
        baselines={"xla_fp8_dot": xla_fp8_dot, "bf16_dot": bf16_dot} if config is None else {},
        bound="compute", peak="fp8",
        quick=config is None and (m, n, k) in ((128, 7168, 16384), (4096, 7168, 16384)),
    ))


# --- grouped contiguous -----------------------------------------------------------------

def _contiguous(groups, m_per_group, n, k):
    def make_inputs(dry: bool):
        g, mg, nn, kk = (2, 64, 128, 256) if dry else (groups, m_per_group, n, k)
        a, sa, b, sb, a16, b16 = _operands((g,), mg, nn, kk, seed=1)
        a, sa, a16 = (x.reshape(g * mg, -1) for x in (a, sa, a16))
        m_indices = jnp.repeat(jnp.arange(g, dtype=jnp.int32), mg)      # [G*Mg]
        return a, sa, b, sb, m_indices, a16, b16

    def kernel(a, sa, b, sb, m_indices, a16, b16, interpret=False):
        return fg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b, sb), m_indices,
                                                   interpret=interpret)

    def reference(a, sa, b, sb, m_indices, a16, b16):
        return fg.m_grouped_fp8_gemm_nt_contiguous_reference((a, sa), (b, sb), m_indices)

    # Equal groups: XLA's peers are batched dots over [G, M/G, K] x [G, N, K].
    @jax.jit
    def xla_fp8_dot(a, sa, b, sb, m_indices, a16, b16):
        g = b.shape[0]
        acc = jnp.einsum("gmk,gnk->gmn", a.reshape(g, -1, a.shape[1]), b,
                         preferred_element_type=jnp.float32)
        scaled = acc * sa[:, :1].reshape(g, -1, 1) * _scale_cols(sb, b.shape[1])
        return scaled.reshape(a.shape[0], -1).astype(jnp.bfloat16)

    @jax.jit
    def bf16_dot(a, sa, b, sb, m_indices, a16, b16):
        g = b16.shape[0]
        out = jnp.einsum("gmk,gnk->gmn", a16.reshape(g, -1, a16.shape[1]), b16,
                         preferred_element_type=jnp.float32)
        return out.reshape(a16.shape[0], -1).astype(jnp.bfloat16)

    def flops(a, sa, b, sb, *_):
        return 2.0 * a.shape[0] * b.shape[1] * a.shape[1]

    def nbytes(a, sa, b, sb, *_):
        return float(a.size + b.size + 4 * (sa.size + sb.size) + 2 * a.shape[0] * b.shape[1])

    register(KernelEntry(
        name=f"deep_gemm m_grouped_contiguous g={groups} m={m_per_group} n={n} k={k}",
        make_inputs=make_inputs, kernel=kernel, reference=reference,
        error=calc_diff, tolerance=1e-5, flops=flops, bytes=nbytes,
        baselines={"xla_fp8_dot": xla_fp8_dot, "bf16_dot": bf16_dot},
        bound="compute", peak="fp8", quick=True,
    ))


# --- grouped masked ---------------------------------------------------------------------

def _masked(groups, m_max, n, k, expected_m):
    def make_inputs(dry: bool):
        g, mm, nn, kk = (2, 64, 128, 256) if dry else (groups, m_max, n, k)
        a, sa, b, sb, a16, b16 = _operands((g,), mm, nn, kk, seed=2)
        # Uneven counts around expected_m, one group nearly empty: as decode sees them.
        frac = np.array([1.0, 0.75, 0.9, 0.05] * g)[:g]
        masked_m = jnp.asarray(np.maximum(1, (frac * mm).astype(np.int32)))  # [G]
        return a, sa, b, sb, masked_m, a16, b16

    def kernel(a, sa, b, sb, masked_m, a16, b16, interpret=False):
        return fg.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), masked_m,
                                               expected_m=expected_m, interpret=interpret)

    def reference(a, sa, b, sb, masked_m, a16, b16):
        return fg.m_grouped_fp8_gemm_nt_masked_reference((a, sa), (b, sb), masked_m, expected_m)

    @jax.jit
    def xla_fp8_dot(a, sa, b, sb, masked_m, a16, b16):
        acc = jnp.einsum("gmk,gnk->gmn", a, b, preferred_element_type=jnp.float32)
        return (acc * sa[..., :1] * _scale_cols(sb, b.shape[1])).astype(jnp.bfloat16)

    @jax.jit
    def bf16_dot(a, sa, b, sb, masked_m, a16, b16):
        return jnp.einsum("gmk,gnk->gmn", a16, b16, preferred_element_type=jnp.float32
                          ).astype(jnp.bfloat16)

    def flops(a, sa, b, sb, masked_m, *_):  # useful work: the valid rows only
        return 2.0 * float(jnp.sum(masked_m)) * b.shape[1] * a.shape[2]

    def nbytes(a, sa, b, sb, masked_m, *_):
        rows = float(jnp.sum(masked_m))
        return float(rows * (a.shape[2] + 4 * sa.shape[2]) + b.size + 4 * sb.size
                     + 2 * rows * b.shape[1])

    register(KernelEntry(
        name=f"deep_gemm m_grouped_masked g={groups} m_max={m_max} n={n} k={k}",
        make_inputs=make_inputs, kernel=kernel, reference=reference,
        error=calc_diff, tolerance=1e-5, flops=flops, bytes=nbytes,
        baselines={"xla_fp8_dot": xla_fp8_dot, "bf16_dot": bf16_dot},
        bound="compute", peak="fp8", quick=(n, k) == (4096, 7168),
    ))


for _m, _n, _k in ((64, 2112, 7168), (64, 7168, 16384), (128, 7168, 16384), (4096, 7168, 16384)):
    _dense(_m, _n, _k)
_contiguous(4, 8192, 4096, 7168)
_masked(4, 256, 4096, 7168, expected_m=192)
_masked(4, 256, 7168, 2048, expected_m=192)

# Split-K (the default at M=64 x N=2112: 4 splits; see fp8_gemm._dense_config) against the
# unsplit kernel it replaced, and at the other small-M shapes where the default does not split.
for _m, _n, _k, _config in (
        (64, 2112, 7168, fg.TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6)),
        (64, 2112, 7168, fg.TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6, split_k=8)),
        (64, 7168, 16384, fg.TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6, split_k=2)),
        (128, 7168, 16384, fg.TuningConfig(block_m=128, block_n=128, max_concurrent_steps=4, split_k=2))):
    _dense(_m, _n, _k, _config)

# Launch order: bands of 16 M tiles (the default) against row by row (the order before).
_dense(4096, 7168, 16384, fg.TuningConfig(block_m=128, block_n=128, max_concurrent_steps=3, grid_tile_m=1))

# Tuning sweep at the large dense shape and a decode shape (the defaults are a heuristic
# until a GPU run measures them): tile shape and pipeline depth.
# (The default at M=4096, 128 x 128 with 3 stages, ran at 828 TFLOP/s on 2026-11-29.)
for _m, _config in ((4096, fg.TuningConfig(block_m=128, block_n=128, max_concurrent_steps=5)),  # 6: over SMEM
                    (4096, fg.TuningConfig(block_m=64, block_n=128, max_concurrent_steps=4)),
                    (128, fg.TuningConfig(block_m=128, block_n=64, max_concurrent_steps=4)),
                    (128, fg.TuningConfig(block_m=64, block_n=128, max_concurrent_steps=4))):
    _dense(_m, 7168, 16384, _config)
# Small M: narrow N tiles for more CTAs (at block_n 64, M=64 x N=2112 is 33 CTAs on 132 SMs;
# DeepGEMM picks block_n so the tile count fills the SMs).
for _n, _k, _bn in ((2112, 7168, 16), (2112, 7168, 32), (7168, 16384, 32)):
    _dense(64, _n, _k, fg.TuningConfig(block_m=64, block_n=_bn, max_concurrent_steps=6))
