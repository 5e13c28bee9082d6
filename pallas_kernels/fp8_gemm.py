"""DeepGEMM-style FP8 GEMMs for Hopper (Mosaic GPU): dense, grouped contiguous, grouped masked.

D = A·Bᵀ with e4m3 operands, both K-major, and fine-grained fp32 scales: A carries one scale
per 1x128 tile (per row, per 128 of K), B one per 128x128 block. As in DeepSeek-V3's recipe,
each 128-wide K block is multiplied on the tensor cores into a fresh fp32 wgmma accumulator,
then scaled by sa[row, kb]·sb[col block, kb] and added to an fp32 register accumulator, so
partial sums are promoted to fp32 every 128 of K.

Letters: M rows of A (tokens), N rows of B (output features), K the contracted dim,
G groups (experts), KB = K/128 scale blocks, NB = N/128.

The kernel: one CTA per (block_m x block_n) output tile; a TMA pipeline of
`max_concurrent_steps` stages over K streams the A tile [block_m, 128], the B tile
[block_n, 128] (fed to wgmma as a transposed view, so both operands stay K-major, the layout
fp8 wgmma requires) and the A scales [block_m] (A's scales are transposed to [KB, M] by the
wrapper so a tile's scales are one contiguous TMA box, as DeepGEMM does) and B's scales, one
row per step (all of B's scales for that K block; the wrapper transposes them to [KB, NB]).
The epilogue writes the tile through SMEM with a TMA store. The dense and contiguous grids are
linear and launch tiles in bands of `grid_tile_m` M tiles walked along N (snaking), so that the
CTAs resident at one time share A and B tiles in L2 (DeepGEMM groups its blocks the same way).
block_m 128 is warp specialized as in DeepGEMM: two compute warpgroups (64 rows each, sharing
the B stage) and one producer warpgroup issuing the TMA loads; block_m 64 (small M) is one
warpgroup that does both.
Split-K (fp8_gemm_nt only, `TuningConfig.split_k`; chosen by default when the output tiles fill
less than half the SMs): the grid gains a K axis, each CTA walks K/split_k and writes its fp32
partial tile, and the partials are summed in fp32 after the kernel. Every 128-wide K block is
still promoted to fp32 on its own, so the numerics are the recipe's (the sum order differs).

Shapes outside the kernel's constraints: K must be a multiple of 128 (the scale granularity;
ValueError otherwise). As in DeepGEMM, B's scales have ceil(N/128) rows, so any N works: N a
multiple of 64 runs natively (block_n 64 when N is not a multiple of 128, e.g. 2112), other N
pad B with zero rows up to block_n and slice the output. M pads to a multiple of block_m.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int


SCALE_BLOCK = 128  # K (and B's N) granularity of the scales; also the pipeline's K step
FP8 = jnp.float8_e4m3fn
NUM_SMS = 132      # H100/H200 SXM
MIN_SPLIT_STEPS = 8  # K steps a split-K CTA keeps at least (to fill its TMA pipeline)


# --- 1. tuning ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TuningConfig:
    block_m: int = 128               # 64: one warpgroup computes and loads; 128: two compute
                                     # warpgroups of 64 rows + a TMA producer warpgroup
    block_n: int = 128               # 16, 32, 64 or 128: a divisor of 128, so one B scale per K
                                     # step; the narrow ones give small-M GEMMs more CTAs
    max_concurrent_steps: int = 4    # TMA pipeline depth over K
    split_k: int = 1                 # fp8_gemm_nt only: CTAs per output tile, each over K/split_k
                                     # (fp32 partials summed after the kernel), for small M x N
    grid_tile_m: int = 16            # launch order: bands of this many M tiles, walked along N
                                     # (snaking), so a wave of CTAs shares A and B tiles in L2;
                                     # 1 is row by row (the order before, L2 holds one A tile row)

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"{self.block_m=} must be 64 or 128 (64 rows per compute "
                             "warpgroup: a 128-row accumulator would need 256 registers/thread)")
        if self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"{self.block_n=} must be 16, 32, 64 or 128 (a divisor of 128: one B scale "
                             "per K step)")
        if self.max_concurrent_steps < 1:
            raise ValueError(f"{self.max_concurrent_steps=} must be >= 1")
        if self.split_k < 1:
            raise ValueError(f"{self.split_k=} must be >= 1")
        if self.grid_tile_m < 1:
            raise ValueError(f"{self.grid_tile_m=} must be >= 1")

    @property
    def warp_specialized(self) -> bool:
        return self.block_m == 128


def _config_for(m: int, n: int) -> TuningConfig:
    """Heuristic, partly measured (see below). Small M (decode): 64-row tiles, one warpgroup per
    CTA, block_n 64 so more CTAs stream B, a deep pipeline (~115 KB SMEM, 2 CTAs per SM).
    Otherwise 128x128 tiles: two compute warpgroups share each B tile (half the SMEM traffic
    per FLOP of a 64-row tile) fed by a producer warpgroup (~162 KB SMEM with a bf16 out).
    N not a multiple of 128 takes block_n 64 (no padding when N % 64 == 0)."""
    if m <= 128:
        return TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6)
    # Measured on an H200 (BENCHMARKS.md, 2026-11-29): 128x128 tiles with 3 stages ran at
    # 828 TFLOP/s at M=4096, N=7168, K=16384; 4 stages was not measured (time ran out).
    return TuningConfig(block_n=64 if n % 128 else 128, max_concurrent_steps=3)


def _dense_config(m: int, n: int, k: int) -> TuningConfig:
    """`_config_for`, plus split-K where the output tiles fill less than half the SMs (DeepGEMM's
    M=64 x N=2112 is 33 tiles of 64 x 64 on 132 SMs, each walking all of K alone): the largest
    split that divides K/128, keeps the CTAs within one wave and leaves each CTA at least
    MIN_SPLIT_STEPS K steps. Unmeasured on a GPU as yet; the suite times it beside split_k=1."""
    config = _config_for(m, n)
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    kb = k // SCALE_BLOCK
    if 2 * tiles > NUM_SMS:
        return config
    split = max(d for d in range(1, NUM_SMS // tiles + 1)
                if kb % d == 0 and (d == 1 or kb // d >= MIN_SPLIT_STEPS))
    return dataclasses.replace(config, split_k=split)


def _pad_n(b, sb, block_n: int):
    """B [.., N, K] -> [.., Np, K] with zero rows (Np a multiple of block_n); sb gets zero rows
    up to ceil(Np/128). Zero rows of B only feed output columns that are sliced off."""
    n = b.shape[-2]
    n_pad = -(-n // block_n) * block_n
    if n_pad == n:
        return b, sb
    widths = [(0, 0)] * b.ndim
    widths[-2] = (0, n_pad - n)
    sb_widths = [(0, 0)] * sb.ndim
    sb_widths[-2] = (0, -(-n_pad // SCALE_BLOCK) - sb.shape[-2])
    return jnp.pad(b, widths), jnp.pad(sb, sb_widths)


# --- 2. kernel ---------------------------------------------------------------------------

def _swizzled() -> tuple:
    """SMEM layout of an fp8 [rows, 128] K step: 128 bytes per row, 128-byte swizzle."""
    return (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))


def _tile_kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem, mi, ni, *, k: int,
                 config: TuningConfig, k0=0):
    """One [block_m, block_n] output tile over k of K, from K block k0 on.

    a_gmem [M, K] e4m3, b_gmem [N, K] e4m3, sa_gmem [KB, M] f32 (transposed A scales),
    sb_gmem [KB, NBp] f32 (transposed B scales, NB padded to a multiple of 32 for TMA),
    o_gmem [M, N]; mi, ni: the tile's block indices; k0: the first K block (split-K).
    """
    bm, bn = config.block_m, config.block_n
    wg_rows = 64                                                     # rows per compute warpgroup
    in_specs = [
        plgpu.BlockSpec((bm, SCALE_BLOCK), lambda kb: (mi, k0 + kb), transforms=_swizzled()),
        plgpu.BlockSpec((bn, SCALE_BLOCK), lambda kb: (ni, k0 + kb), transforms=_swizzled()),
        plgpu.BlockSpec((1, bm), lambda kb: (k0 + kb, mi)),
        plgpu.BlockSpec((1, sb_gmem.shape[1]), lambda kb: (k0 + kb, 0)),  # B scales, this K block
    ]

    def k_step(rows, idx, a_smem, b_smem, sa_smem, sb_smem, acc):
        """acc [64, bn] += (A[rows]·Bᵀ over one 128-wide K block) · sa · sb, in fp32."""
        del idx

        def mma(part_ref):  # fresh fp32 accumulator for this K block
            plgpu.wgmma(part_ref, a_smem.at[rows], plgpu.transpose_ref(b_smem, (1, 0)))
            return part_ref[...]

        part = pl.run_scoped(mma, plgpu.ACC((wg_rows, bn), jnp.float32))   # [64, bn]
        scale = sa_smem[0, rows] * sb_smem[0, ni * bn // SCALE_BLOCK]       # [64]
        return acc + part * lax.broadcast_in_dim(scale, (wg_rows, bn), [0])

    def store(acc, o_smem, wg):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        rows = pl.ds(mi * bm + wg * wg_rows, wg_rows)
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    acc0 = jnp.zeros((wg_rows, bn), jnp.float32)
    if not config.warp_specialized:  # one warpgroup issues the TMA loads and the wgmmas
        acc = plgpu.emit_pipeline(
            functools.partial(k_step, slice(None)),
            grid=(k // SCALE_BLOCK,), in_specs=in_specs,
            max_concurrent_steps=config.max_concurrent_steps, init_carry=acc0,
        )(a_gmem, b_gmem, sa_gmem, sb_gmem)
        pl.run_scoped(lambda o_smem: store(acc, o_smem, 0),
                      plgpu.SMEM((wg_rows, bn), o_gmem.dtype))
        return

    # Warp specialized: warpgroups 0 and 1 compute rows [0, 64) and [64, 128) of the tile
    # from the same SMEM stages, warpgroup 2 only issues TMA loads.
    def scope(o_smem):                                               # [2, 64, bn]
        wg = lax.axis_index("wg")

        def compute(run_pipeline):
            store(run_pipeline(acc0), o_smem.at[wg], wg)

        plgpu.emit_pipeline_warp_specialized(
            lambda *args: k_step(pl.ds(wg * wg_rows, wg_rows), *args),
            grid=(k // SCALE_BLOCK,), in_specs=in_specs, memory_registers=40,
            wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=config.max_concurrent_steps, compute_context=compute,
        )(a_gmem, b_gmem, sa_gmem, sb_gmem)

    pl.run_scoped(scope, plgpu.SMEM((2, wg_rows, bn), o_gmem.dtype), collective_axes="wg")


def _tile_index(config: TuningConfig, m_tiles: int, n_tiles: int):
    """(mi, ni) of this CTA's output tile from its linear grid index, in bands of
    config.grid_tile_m M tiles walked along N (jax's planar_snake; DeepGEMM groups 16 blocks):
    with M=4096, N=7168 a wave of 132 CTAs then reads ~16 A and ~9 B tile rows, not 3 and 56."""
    return plgpu.planar_snake(lax.axis_index("t"), (m_tiles, n_tiles), 0, config.grid_tile_m)


def _dense_kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem, *, k, config, m_tiles, n_tiles):
    """o_gmem [split_k, M, N]: split s sums K blocks [s, s + 1) * KB / split_k."""
    (mi, ni), split = _tile_index(config, m_tiles, n_tiles), lax.axis_index("k")
    k_split = k // config.split_k
    _tile_kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem.at[split], mi, ni, k=k_split,
                 config=config, k0=split * (k_split // SCALE_BLOCK))


def _no_split(config: TuningConfig, what: str):
    if config.split_k != 1:
        raise ValueError(f"{what} takes split_k=1 (split-K is fp8_gemm_nt's), got {config.split_k=}")


def _contiguous_kernel(idx_gmem, a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem, *, k, config,
                       m_tiles, n_tiles):
    """idx_gmem [M/block_m] int32: each tile's group, -1 for a tile to skip."""
    mi, ni = _tile_index(config, m_tiles, n_tiles)
    group = idx_gmem[mi]

    @pl.when(group >= 0)  # padding tiles (-1) are skipped; the wrapper zeroes their rows
    def _():
        _tile_kernel(a_gmem, b_gmem.at[group], sa_gmem, sb_gmem.at[group], o_gmem, mi, ni,
                     k=k, config=config)


def _masked_kernel(mask_gmem, a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem, *, k, config):
    """mask_gmem [G] int32: valid rows per group; tiles past them are skipped.

    The grid's fastest axis is m: the M tiles of one (group, N tile) launch together and read
    their B tile once from HBM (the order before, groups fastest, streamed all of B once per
    M tile: 117 MB each time at G=4, N=4096, K=7168, more than L2 holds)."""
    g, mi, ni = lax.axis_index("g"), lax.axis_index("m"), lax.axis_index("n")

    @pl.when(mi * config.block_m < mask_gmem[g])
    def _():
        _tile_kernel(a_gmem.at[g], b_gmem.at[g], sa_gmem.at[g], sb_gmem.at[g], o_gmem.at[g],
                     mi, ni, k=k, config=config)


# --- 3. jitted wrappers ------------------------------------------------------------------

def _interpret_params(interpret):
    if not interpret:
        return None
    # Interpret-only, and imported only then: the shim touches jax internals that a compiled
    # run on the GPU machine (another jax version) must not depend on.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from pallas_kernels import _interpret_shim
    _interpret_shim.install()
    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def _launch(body, out_shape, out_dtype, grid, grid_names, config, interpret, *args):
    threads = dict(num_threads=3, thread_name="wg") if config.warp_specialized else {}
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=grid,
        grid_names=grid_names,
        **threads,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )(*args)


def _check_operands(a, sa, b, sb, *, a_lead: tuple, b_lead: tuple, out_dtype):
    """Shapes/dtypes as in DeepGEMM; K and N multiples of 128. Returns (m, n, k)."""
    if a.dtype != FP8 or b.dtype != FP8:
        raise ValueError(f"a and b must be {jnp.dtype(FP8).name}, got {a.dtype=} {b.dtype=}")
    if sa.dtype != jnp.float32 or sb.dtype != jnp.float32:
        raise ValueError(f"scales must be float32, got {sa.dtype=} {sb.dtype=}")
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"{out_dtype=} must be bfloat16 or float32")
    *_, m, k = a.shape
    *_, n, k2 = b.shape
    if a.ndim != len(a_lead) + 2 or b.ndim != len(b_lead) + 2:
        raise ValueError(f"bad operand ranks: {a.shape=} {b.shape=}")
    if k != k2:
        raise ValueError(f"contracting dims differ: {a.shape=} {b.shape=}")
    if k % SCALE_BLOCK:
        raise ValueError(f"{k=} must be a multiple of {SCALE_BLOCK} (the scale block)")
    kb, nb = k // SCALE_BLOCK, -(-n // SCALE_BLOCK)
    if sa.shape != (*a.shape[:-1], kb):
        raise ValueError(f"{sa.shape=} must be {(*a.shape[:-1], kb)} for {a.shape=}")
    if sb.shape != (*b.shape[:-2], nb, kb):
        raise ValueError(f"{sb.shape=} must be {(*b.shape[:-2], nb, kb)} for {b.shape=}")
    return m, n, k


def _scales_for_tma(sb: Float[Array, "... NB KB"]) -> Float[Array, "... KB NBp"]:
    """B scales as one contiguous row per K block, padded to 128 bytes.

    The pipeline keeps one such row per stage back to back in SMEM, and a TMA destination must
    be 128-byte aligned: a 16-byte pad (enough for the GMEM stride) faulted on the H200 with
    CUDA_ERROR_MISALIGNED_ADDRESS (N = 2112: 17 scales padded to 20, 80 bytes a stage).
    """
    if sb.shape[-2] > 256:
        raise ValueError(f"N/128 = {sb.shape[-2]} must be <= 256 (one TMA box of B scales)")
    return _pad_rows(jnp.swapaxes(sb, -1, -2), sb.ndim - 1, 32)


def _pad_rows(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "config"))
def fp8_gemm_nt(
    a_sa: tuple[Float[Array, "M K"], Float[Array, "M KB"]],
    b_sb: tuple[Float[Array, "N K"], Float[Array, "NB KB"]],
    out_dtype=jnp.bfloat16,
    interpret=False,
    config: TuningConfig | None = None,
) -> Float[Array, "M N"]:
    """D[m, n] = Σ_k A[m, k]·sa[m, k//128]·B[n, k]·sb[n//128, k//128] (the Mosaic GPU kernel).

    a e4m3 [M, K], sa f32 [M, K/128], b e4m3 [N, K], sb f32 [ceil(N/128), K/128].
    interpret: True (or an InterpretGPUParams) runs the kernel in the GPU interpreter on CPU.
    """
    (a, sa), (b, sb) = a_sa, b_sb
    m, n, k = _check_operands(a, sa, b, sb, a_lead=(), b_lead=(), out_dtype=out_dtype)
    config = config or _dense_config(m, n, k)
    splits = config.split_k
    if (k // SCALE_BLOCK) % splits:
        raise ValueError(f"{config.split_k=} must divide K/128 = {k // SCALE_BLOCK}")
    a_p = _pad_rows(a, 0, config.block_m)                         # [Mp, K]
    sa_t = _pad_rows(sa, 0, config.block_m).T                     # [KB, Mp]
    b_p, sb_p = _pad_n(b, sb, config.block_n)                     # [Np, K], [ceil(Np/128), KB]
    sb_p = _scales_for_tma(sb_p)                                  # [KB, NBp]
    m_tiles, n_tiles = a_p.shape[0] // config.block_m, b_p.shape[0] // config.block_n
    body = functools.partial(_dense_kernel, k=k, config=config, m_tiles=m_tiles, n_tiles=n_tiles)
    out = _launch(body, (splits, a_p.shape[0], b_p.shape[0]),
                  out_dtype if splits == 1 else jnp.float32, (m_tiles * n_tiles, splits),
                  ("t", "k"), config, interpret, a_p, b_p, sa_t, sb_p)
    # Split-K: the fp32 partials (each promoted per 128 of K in the kernel) summed in fp32.
    return (out[0] if splits == 1 else out.sum(0).astype(out_dtype))[:m, :n]


def m_grouped_fp8_gemm_nt_contiguous(
    a_sa: tuple[Float[Array, "M K"], Float[Array, "M KB"]],
    b_sb: tuple[Float[Array, "G N K"], Float[Array, "G NB KB"]],
    m_indices: Int[Array, "M"],
    out_dtype=jnp.bfloat16,
    interpret=False,
    config: TuningConfig | None = None,
) -> Float[Array, "M N"]:
    """D[r] = A[r]·B[m_indices[r]]ᵀ (scaled) for MoE prefill/training.

    Rows of one group are contiguous and each group starts on a multiple of block_m (64;
    DeepGEMM's 128 alignment satisfies it); rows with m_indices < 0 are padding (as DeepGEMM
    pads each group up to the alignment) and give 0. Rows of a tile that mixes two groups, or
    names a group >= G, come out NaN (never silently wrong); with concrete m_indices that is
    a ValueError instead.
    """
    (a, sa), (b, sb) = a_sa, b_sb
    m, n, k = _check_operands(a, sa, b, sb, a_lead=(), b_lead=("G",), out_dtype=out_dtype)
    if m_indices.shape != (m,):
        raise ValueError(f"{m_indices.shape=} must be {(m,)}")
    config = config or _config_for(m, n)
    _no_split(config, "m_grouped_fp8_gemm_nt_contiguous")
    try:  # concrete indices are checked here; traced ones give NaN rows instead
        concrete = np.asarray(m_indices)
    except jax.errors.TracerArrayConversionError:
        concrete = None
    if concrete is not None:
        idx = _pad_rows(jnp.asarray(concrete, jnp.int32), 0, config.block_m, value=-1)
        bad = _misaligned_rows(idx, config.block_m, b.shape[0])
        if bool(bad.any()):
            raise ValueError(f"m_indices must be constant over each {config.block_m=}-row tile"
                             f" and < G={b.shape[0]} (first bad row {int(jnp.argmax(bad))})")
    return _contiguous_impl(a, sa, b, sb, m_indices, out_dtype=out_dtype,
                            interpret=interpret, config=config)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "config"))
def _contiguous_impl(a, sa, b, sb, m_indices, *, out_dtype, interpret, config):
    m, k = a.shape
    groups, n, _ = b.shape
    bm = config.block_m
    idx = _pad_rows(m_indices.astype(jnp.int32), 0, bm, value=-1)  # [Mp]
    bad = _misaligned_rows(idx, bm, groups)                        # [Mp] bool
    a_p = _pad_rows(a, 0, bm)
    sa_t = _pad_rows(sa, 0, bm).T                                  # [KB, Mp]
    b_p, sb_p = _pad_n(b, sb, config.block_n)                      # [G, Np, K]
    sb_p = _scales_for_tma(sb_p)                                   # [G, KB, NBp]
    mp, n_pad = a_p.shape[0], b_p.shape[1]
    m_tiles, n_tiles = mp // bm, n_pad // config.block_n
    body = functools.partial(_contiguous_kernel, k=k, config=config, m_tiles=m_tiles,
                             n_tiles=n_tiles)
    tile_idx = jnp.where(bad.reshape(-1, bm).any(1), -1, _tile_groups(idx, bm))  # [Mp/bm]
    out = _launch(body, (mp, n_pad), out_dtype, (m_tiles * n_tiles,), ("t",), config,
                  interpret, tile_idx, a_p, b_p, sa_t, sb_p)
    out = jnp.where((idx >= 0)[:, None], out[:, :n], 0)
    return jnp.where(bad[:, None], jnp.nan, out).astype(out_dtype)[:m]


def _tile_groups(idx: Int[Array, "Mp"], bm: int) -> Array:
    """The group of each block_m-row tile: its rows' one non-negative index (-1 if none)."""
    return idx.reshape(-1, bm).max(axis=1)                         # [Mp/bm]


def _misaligned_rows(idx: Int[Array, "Mp"], bm: int, groups: int) -> Array:
    """Rows of tiles that mix two groups or name a group >= G (padding rows, < 0, mix freely)."""
    tiles = idx.reshape(-1, bm)                                    # [Mp/bm, bm]
    group = _tile_groups(idx, bm)[:, None]
    mixed = ((tiles >= 0) & (tiles != group)).any(1, keepdims=True) | (group >= groups)
    return jnp.broadcast_to(mixed, tiles.shape).reshape(-1)


@functools.partial(jax.jit, static_argnames=("expected_m", "out_dtype", "interpret", "config"))
def m_grouped_fp8_gemm_nt_masked(
    a_sa: tuple[Float[Array, "G Mmax K"], Float[Array, "G Mmax KB"]],
    b_sb: tuple[Float[Array, "G N K"], Float[Array, "G NB KB"]],
    masked_m: Int[Array, "G"],
    expected_m: int,
    out_dtype=jnp.bfloat16,
    interpret=False,
    config: TuningConfig | None = None,
) -> Float[Array, "G Mmax N"]:
    """D[g, r] = A[g, r]·B[g]ᵀ (scaled) for r < masked_m[g], 0 beyond (MoE decode).

    expected_m: a hint of the typical masked_m, used to pick the tile.
    """
    (a, sa), (b, sb) = a_sa, b_sb
    m_max, n, k = _check_operands(a, sa, b, sb, a_lead=("G",), b_lead=("G",),
                                  out_dtype=out_dtype)
    groups = a.shape[0]
    if b.shape[0] != groups or masked_m.shape != (groups,):
        raise ValueError(f"groups differ: {a.shape=} {b.shape=} {masked_m.shape=}")
    if expected_m < 0:
        raise ValueError(f"{expected_m=} must be >= 0")
    config = config or _config_for(expected_m, n)
    _no_split(config, "m_grouped_fp8_gemm_nt_masked")
    bm = config.block_m
    a_p = _pad_rows(a, 1, bm)                                      # [G, Mp, K]
    sa_t = jnp.swapaxes(_pad_rows(sa, 1, bm), 1, 2)                # [G, KB, Mp]
    b_p, sb_p = _pad_n(b, sb, config.block_n)                      # [G, Np, K]
    sb_p = _scales_for_tma(sb_p)                                   # [G, KB, NBp]
    mp, n_pad = a_p.shape[1], b_p.shape[1]
    valid = jnp.clip(masked_m.astype(jnp.int32), 0, m_max)         # [G]
    body = functools.partial(_masked_kernel, k=k, config=config)
    out = _launch(body, (groups, mp, n_pad), out_dtype,
                  (mp // bm, n_pad // config.block_n, groups), ("m", "n", "g"), config,
                  interpret, valid, a_p, b_p, sa_t, sb_p)
    rows = jnp.arange(m_max)[None, :, None]                        # [1, Mmax, 1]
    out = out[:, :m_max, :n]
    return jnp.where(rows < valid[:, None, None], out, 0).astype(out_dtype)


# --- dispatch: the kernel on Hopper, the reference elsewhere ------------------------------

def on_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def fp8_gemm_nt_auto(a_sa, b_sb, out_dtype=jnp.bfloat16):
    if on_hopper():
        return fp8_gemm_nt(a_sa, b_sb, out_dtype=out_dtype)
    return fp8_gemm_nt_reference(a_sa, b_sb, out_dtype=out_dtype)


def m_grouped_fp8_gemm_nt_contiguous_auto(a_sa, b_sb, m_indices, out_dtype=jnp.bfloat16):
    if on_hopper():
        return m_grouped_fp8_gemm_nt_contiguous(a_sa, b_sb, m_indices, out_dtype=out_dtype)
    return m_grouped_fp8_gemm_nt_contiguous_reference(a_sa, b_sb, m_indices, out_dtype=out_dtype)


def m_grouped_fp8_gemm_nt_masked_auto(a_sa, b_sb, masked_m, expected_m, out_dtype=jnp.bfloat16):
    if on_hopper():
        return m_grouped_fp8_gemm_nt_masked(a_sa, b_sb, masked_m, expected_m,
                                            out_dtype=out_dtype)
    return m_grouped_fp8_gemm_nt_masked_reference(a_sa, b_sb, masked_m, expected_m,
                                                  out_dtype=out_dtype)


# --- 5. references (plain jnp; the model's FP8 path on CPU) -------------------------------

def dequantize_rows(x: Float[Array, "... R K"], s: Float[Array, "... R KB"]) -> Array:
    """x·s with one scale per 1x128 tile -> f32."""
    return x.astype(jnp.float32) * jnp.repeat(s, SCALE_BLOCK, axis=-1)


def dequantize_blocks(x: Float[Array, "... N K"], s: Float[Array, "... NB KB"]) -> Array:
    """x·s with one scale per 128x128 block (ceil(N/128) block rows) -> f32."""
    s = jnp.repeat(jnp.repeat(s, SCALE_BLOCK, axis=-2), SCALE_BLOCK, axis=-1)
    return x.astype(jnp.float32) * s[..., : x.shape[-2], :]


_HI = lax.Precision.HIGHEST


def fp8_gemm_nt_reference(a_sa, b_sb, out_dtype=jnp.bfloat16) -> Float[Array, "M N"]:
    (a, sa), (b, sb) = a_sa, b_sb
    a32, b32 = dequantize_rows(a, sa), dequantize_blocks(b, sb)
    return jnp.einsum("mk,nk->mn", a32, b32, precision=_HI).astype(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous_reference(a_sa, b_sb, m_indices,
                                               out_dtype=jnp.bfloat16) -> Float[Array, "M N"]:
    (a, sa), (b, sb) = a_sa, b_sb
    a32, b32 = dequantize_rows(a, sa), dequantize_blocks(b, sb)    # [M, K], [G, N, K]

    def one_group(out, g_b):
        g, bg = g_b
        return jnp.where((m_indices == g)[:, None],
                         jnp.einsum("mk,nk->mn", a32, bg, precision=_HI), out), None

    out0 = jnp.zeros((a.shape[0], b.shape[1]), jnp.float32)
    out, _ = lax.scan(one_group, out0, (jnp.arange(b.shape[0]), b32))
    return out.astype(out_dtype)


def m_grouped_fp8_gemm_nt_masked_reference(a_sa, b_sb, masked_m, expected_m=None,
                                           out_dtype=jnp.bfloat16) -> Float[Array, "G Mmax N"]:
    del expected_m
    (a, sa), (b, sb) = a_sa, b_sb
    a32, b32 = dequantize_rows(a, sa), dequantize_blocks(b, sb)    # [G, Mmax, K], [G, N, K]
    out = jnp.einsum("gmk,gnk->gmn", a32, b32, precision=_HI)
    rows = jnp.arange(a.shape[1])[None, :, None]
    return jnp.where(rows < masked_m[:, None, None], out, 0).astype(out_dtype)
