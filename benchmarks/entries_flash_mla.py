"""GPU-suite entries for FlashMLA decode (pallas_kernels/flash_mla.py).

FlashMLA's benchmark shapes: b = 128 sequences of s_k cache tokens (4096 .. 32768), h_q = 128
query heads over one latent head, s_q = 1 (decode) and 2 (MTP, causal). The baseline is the
plain-jnp reference compiled by XLA. Importing this module needs no GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.registry import KernelEntry, register
from pallas_kernels import flash_mla as fm

H200_RIDGE = 990e12 / 4.8e12        # dense bf16 FLOP/s over HBM B/s: ~206 FLOP/byte
ENTRIES: list[KernelEntry] = []


def _make_inputs(batch, s_k, h_q, s_q, dry):
    """(q, k_cache, block_table, cache_seqlens); pages handed out in a shuffled order."""
    if dry:
        batch, h_q, seqlens = 2, 16 * s_q, np.array([100, 37])
    else:
        seqlens = np.full(batch, s_k)
    pages = -(-int(seqlens.max()) // fm.PAGE)
    rng = np.random.default_rng(0)
    table = rng.permutation(batch * pages).reshape(batch, pages).astype(np.int32)
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (batch, s_q, h_q, fm.D_QK), jnp.bfloat16)
    k_cache = jax.random.normal(kk, (batch * pages, fm.PAGE, 1, fm.D_QK), jnp.bfloat16)
    return q, k_cache, jnp.asarray(table), jnp.asarray(seqlens, jnp.int32)


def _kernel(q, k_cache, block_table, cache_seqlens, interpret=False, config=fm.TuningConfig()):
    # Interpreted (dry) runs simulate two SMs: one split a sequence, two CTAs (the splits and
    # their combine are tested in tests/test_flash_mla.py; this checks the entry's plumbing).
    if interpret:
        config = dataclasses.replace(config, num_sm_parts=2)
    return fm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                     causal=q.shape[1] > 1, interpret=interpret, config=config)


def _make_fp8_inputs(batch, s_k, h_q, s_q, dry):
    """As `_make_inputs`, with the cache in FlashMLA's 656-byte FP8 layout."""
    q, k_cache, table, seqlens = _make_inputs(batch, s_k, h_q, s_q, dry)
    return q, jax.jit(fm.quantize_kv_cache_fp8)(k_cache), table, seqlens


def _reference(q, k_cache, block_table, cache_seqlens):
    return _reference_jit(q, k_cache, block_table, cache_seqlens, causal=q.shape[1] > 1)


@functools.partial(jax.jit, static_argnames="causal")
def _reference_jit(q, k_cache, block_table, cache_seqlens, causal):
    return fm.flash_mla_reference(q, k_cache, block_table, cache_seqlens, causal=causal)


def _error(got, want):
    """Worst of FlashMLA's cosine diffs on out and on the finite lse entries."""
    diffs = []
    for x, y in zip(got, want):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        finite = np.isfinite(y)
        if not (np.isfinite(x) == finite).all():
            return float("inf")
        x, y = x[finite], y[finite]
        diffs.append(1.0 - 2.0 * (x * y).sum() / max((x * x + y * y).sum(), 1e-12))
    return float(max(diffs))


def _flops(q, k_cache, block_table, cache_seqlens):
    _, s_q, h_q, _ = q.shape
    tokens = float(np.asarray(cache_seqlens).sum())
    return 2.0 * tokens * s_q * h_q * (fm.D_QK + fm.D_V)


def _bytes(q, k_cache, block_table, cache_seqlens):
    batch, s_q, h_q, _ = q.shape
    tokens = float(np.asarray(cache_seqlens).sum())
    cache = tokens * k_cache.shape[2] * k_cache.shape[3] * k_cache.dtype.itemsize
    return cache + q.size * 2 + batch * s_q * h_q * (fm.D_V * 2 + 4)


def _bound(h_q: int, s_q: int, token_bytes: int = fm.D_QK * 2) -> str:
    """Which ceiling bounds a shape: FLOPs per cache byte against the H200's ridge."""
    intensity = 2 * h_q * s_q * (fm.D_QK + fm.D_V) / token_bytes
    return "memory" if intensity < H200_RIDGE else "compute"


for _s_q in (1, 2):
    for _s_k in (4096, 8192, 16384, 32768):
        ENTRIES.append(register(KernelEntry(
            name=f"flash_mla b=128 s_k={_s_k} h_q=128 s_q={_s_q}",
            make_inputs=functools.partial(_make_inputs, 128, _s_k, 128, _s_q),
            kernel=_kernel,
            reference=_reference,
            error=_error,
            tolerance=1e-5,
            flops=_flops,
            bytes=_bytes,
            baselines={"xla_reference": _reference},
            bound=_bound(128, _s_q),
            peak="bf16",
            quick=_s_k == 4096,
        )))


# The FP8 cache (656 bytes a token: dequantised by XLA, then the bf16 kernel) at one shape.
ENTRIES.append(register(KernelEntry(
    name="flash_mla fp8-cache b=128 s_k=8192 h_q=128 s_q=1",
    make_inputs=functools.partial(_make_fp8_inputs, 128, 8192, 128, 1),
    kernel=_kernel, reference=_reference, error=_error, tolerance=1e-5,
    flops=_flops, bytes=_bytes, baselines={"xla_reference": _reference},
    bound=_bound(128, 1, fm.FP8_TOKEN_BYTES), peak="bf16", quick=True,
)))


# The same FP8 shape with the kernel reading the 656-byte tokens itself (no baselines: beside
# the row above, which times XLA's dequantise-then-bf16-kernel path).
ENTRIES.append(register(KernelEntry(
    name="flash_mla fp8-cache b=128 s_k=8192 h_q=128 s_q=1 dequantize_in_kernel",
    make_inputs=functools.partial(_make_fp8_inputs, 128, 8192, 128, 1),
    kernel=functools.partial(_kernel, config=fm.TuningConfig(dequantize_in_kernel=True)),
    reference=_reference, error=_error, tolerance=1e-5, flops=_flops, bytes=_bytes,
    baselines={}, bound=_bound(128, 1, fm.FP8_TOKEN_BYTES), peak="bf16", quick=False,
)))


def _sweep(label: str, config: fm.TuningConfig, shapes) -> None:
    """Tuning-sweep entries (no baselines: the suite compares them with the default entries)."""
    for s_k, s_q in shapes:
        ENTRIES.append(register(KernelEntry(
            name=f"flash_mla b=128 s_k={s_k} h_q=128 s_q={s_q} {label}",
            make_inputs=functools.partial(_make_inputs, 128, s_k, 128, s_q),
            kernel=functools.partial(_kernel, config=config),
            reference=_reference, error=_error, tolerance=1e-5, flops=_flops, bytes=_bytes,
            baselines={}, bound=_bound(128, s_q), peak="bf16", quick=False,
        )))


# Page pairs (each consumer computes S for one page of two and P is shared: 1/1.53 of the MMA
# work), not yet timed. Dropped after the 2026-11-29 H200 run (BENCHMARKS.md): one page in flight
# (1.7x slower) and num_sm_parts 33/66 (no change beyond noise at b=128).
_sweep("pair_pages", fm.TuningConfig(pair_pages=True), itertools.product((4096, 32768), (1, 2)))
# FA3's ping-pong schedule for the default kernel (one warpgroup's softmax under the other's
# matmuls), not yet timed: A/B against the default entries at the same shapes.
_sweep("ping_pong", fm.TuningConfig(ping_pong=True), ((4096, 1), (32768, 2)))
# A/B: O += P V as timed on 2026-11-29 (a fresh accumulator per 64-column chunk, awaited and
# added in registers) against the default, which accumulates in place (pl.run_state).
_sweep("fresh accumulators", fm.TuningConfig(accumulate_in_place=False), ((8192, 1), (32768, 2)))
