"""FP8 (e4m3) quantisers of the DeepSeek-V3 recipe, as Mosaic GPU kernels with jnp references.

per_token_cast_to_fp8: one scale per 1x128 tile (activations), x [M, K] -> (e4m3 [M, K],
f32 [M, K/128]). per_block_cast_to_fp8: one scale per 128x128 block (weights), w [N, K] ->
(e4m3 [N, K], f32 [ceil(N/128), K/128]; a last partial block is padded with zeros as
DeepGEMM does). scale = max(amax, 1e-4)/448 and q = x/scale, so that
x ≈ q·scale; with ue8m0=True the scale is rounded up to a power of two (UE8M0).

Kernel: one CTA per [block_rows, 128] tile: TMA load to SMEM, amax per row (per token) or over
the tile (per block), cast, TMA store of the e4m3 tile and of the tile's scales. Scales leave
the kernel transposed, [K/128, rows] (a contiguous TMA box per tile), and the wrapper
transposes them back; per_block writes its block scale once per row and keeps every 128th.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float


BLOCK = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


# --- 1. tuning ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TuningConfig:
    block_rows: int = 128  # rows per CTA for per-token casts (per-block casts use 128);
                           # H200: 0.136 ms vs 0.144 ms with 64 at 4096x7168 (BENCHMARKS.md)


# --- 2. kernel ---------------------------------------------------------------------------

def _ue8m0(scale: Array) -> Array:
    """Rounds positive normal f32 scales up to a power of two (exponent-only, UE8M0)."""
    bits = lax.bitcast_convert_type(scale, jnp.int32)
    return lax.bitcast_convert_type((bits + 0x7FFFFF) & 0x7F800000, jnp.float32)


def _scales(amax: Array, ue8m0: bool) -> Array:
    scale = jnp.maximum(amax, AMAX_FLOOR) / FP8_MAX
    return _ue8m0(scale) if ue8m0 else scale


def _cast_kernel(x_gmem, y_gmem, s_gmem, *, rows: int, per_block: bool, ue8m0: bool):
    """x_gmem [M, K] -> y_gmem [M, K] e4m3, s_gmem [K/128, M] f32 (one [rows, 128] tile)."""
    ri, kb = lax.axis_index("r"), lax.axis_index("k")
    row_slice, col_slice = pl.ds(ri * rows, rows), pl.ds(kb * BLOCK, BLOCK)

    def scope(x_smem, y_smem, s_smem, barrier):
        plgpu.copy_gmem_to_smem(x_gmem.at[row_slice, col_slice], x_smem, barrier)
        plgpu.barrier_wait(barrier)
        # The layout hint lets layout inference place the row reduction.
        x = plgpu.layout_cast(x_smem[...], plgpu.Layout.WGMMA).astype(jnp.float32)  # [rows, 128]
        amax = jnp.max(jnp.abs(x), axis=1)                        # [rows]
        if per_block:
            amax = jnp.broadcast_to(jnp.max(amax), (rows,))
        scale = _scales(amax, ue8m0)                              # [rows]
        y_smem[...] = (x / lax.broadcast_in_dim(scale, (rows, BLOCK), [0])).astype(FP8)
        s_smem[0, :] = scale
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[row_slice, col_slice])
        plgpu.copy_smem_to_gmem(s_smem, s_gmem.at[pl.ds(kb, 1), row_slice])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scope,
        plgpu.SMEM((rows, BLOCK), x_gmem.dtype),
        plgpu.SMEM((rows, BLOCK), FP8),
        plgpu.SMEM((1, rows), jnp.float32),
        plgpu.Barrier(num_arrivals=1),
    )


# --- 3. jitted wrappers ------------------------------------------------------------------

def _cast(x, *, rows: int, per_block: bool, ue8m0: bool, interpret):
    m, k = x.shape
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{x.dtype=} must be bfloat16 or float32")
    if k % BLOCK:
        raise ValueError(f"{k=} must be a multiple of {BLOCK}")
    pad = -m % rows
    x_p = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    mp = x_p.shape[0]
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        from pallas_kernels import _interpret_shim  # interpret-only: jax internals
        _interpret_shim.install()  # the interpreter needs layout_cast on CPU
        params = interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()
    y, s_t = plgpu.kernel(
        functools.partial(_cast_kernel, rows=rows, per_block=per_block, ue8m0=ue8m0),
        out_type=(jax.ShapeDtypeStruct((mp, k), FP8),
                  jax.ShapeDtypeStruct((k // BLOCK, mp), jnp.float32)),
        grid=(mp // rows, k // BLOCK),
        grid_names=("r", "k"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=params,
    )(x_p)
    return y[:m], s_t[:, :m].T                                    # [M, K], [M, K/128]


@functools.partial(jax.jit, static_argnames=("ue8m0", "interpret", "config"))
def per_token_cast_to_fp8(
    x: Float[Array, "M K"], ue8m0: bool = False, interpret=False,
    config: TuningConfig = TuningConfig(),
) -> tuple[Float[Array, "M K"], Float[Array, "M KB"]]:
    """x [M, K] -> (e4m3 [M, K], scales f32 [M, K/128]), one scale per 1x128 tile."""
    return _cast(x, rows=config.block_rows, per_block=False, ue8m0=ue8m0, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("ue8m0", "interpret"))
def per_block_cast_to_fp8(
    w: Float[Array, "N K"], ue8m0: bool = False, interpret=False,
) -> tuple[Float[Array, "N K"], Float[Array, "NB KB"]]:
    """w [N, K] -> (e4m3 [N, K], scales f32 [ceil(N/128), K/128]), one per 128x128 block."""
    y, s_rows = _cast(w, rows=BLOCK, per_block=True, ue8m0=ue8m0, interpret=interpret)
    return y, s_rows[::BLOCK]                                     # [N, K], [NB, K/128]


# --- 5. references -----------------------------------------------------------------------

def per_token_cast_to_fp8_reference(x: Float[Array, "M K"], ue8m0: bool = False):
    m, k = x.shape
    xb = x.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK)      # [M, KB, 128]
    scale = _scales(jnp.max(jnp.abs(xb), axis=2), ue8m0)          # [M, KB]
    return (xb / scale[..., None]).astype(FP8).reshape(m, k), scale


def per_block_cast_to_fp8_reference(w: Float[Array, "N K"], ue8m0: bool = False):
    n, k = w.shape
    w = jnp.pad(w.astype(jnp.float32), ((0, -n % BLOCK), (0, 0)))  # zero rows: amax unchanged
    wb = w.reshape(-1, BLOCK, k // BLOCK, BLOCK)                   # [NB, 128, KB, 128]
    scale = _scales(jnp.max(jnp.abs(wb), axis=(1, 3)), ue8m0)     # [NB, KB]
    return (wb / scale[:, None, :, None]).astype(FP8).reshape(-1, k)[:n], scale
