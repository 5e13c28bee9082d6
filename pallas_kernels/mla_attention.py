"""MLA attention for training and prefill (Mosaic GPU, Hopper): FlashAttention-3 style forward
and FlashAttention-2 style backward kernels, with a plain-jnp reference behind the same call.

In training and prefill MLA is ordinary multi-head attention with a wider query/key head than
value head: q, k [B, T, H, Dqk] (V3: 128 nope + 64 rope = 192) and v [B, T, H, Dv] (V3: 128).
Head dims are read from the shapes (multiples of 64), not fixed.

Letter legend (in names and comments):
  B batch   T sequence   H heads   Dqk q/k head dim   Dv v head dim
  C 64-wide column chunks of a head dim (Dqk / 64 or Dv / 64)

Forward kernel, grid (T / 128, H, B): one CTA per 128 query rows of one head, three
warpgroups. Warpgroup 2 is the TMA producer: it streams the K, V (and key segment id) tiles of
the CTA's kv range through a ring of `num_slots` SMEM slots, refilling a slot as soon as both
consumers released it (K and V are released separately, so K of step i+slots loads while PV of
step i runs). Warpgroups 0 and 1 each own 64 query rows: S = Q K^T with wgmma (Q as three
64 x 64 chunks, K^T as a transposed SMEM view), online softmax in fp32 registers (base-2, the
scale folded into one multiply), O += P V with P in bf16 straight from registers as the wgmma
LHS. A schedule barrier staggers the two warpgroups (FA3's ping-pong): one's softmax runs while
the other's matmuls occupy the tensor cores. Each CTA loops only over the kv tiles that some
row of it may see (computed from the causal structure and the segment ids by the wrapper), so
fully masked tiles are skipped; with causal masking alone, the tiles below the diagonal run
without building a mask at all. Out is normalised and written in bf16 through Q's SMEM, with
the log2-domain log-sum-exp (`lse2 = log2 sum_j 2^(s_ij * scale * log2 e)`) kept for backward.

Backward, given D = rowsum(dO * O) (jnp, fused by XLA):
  dQ kernel, grid (T / 128, H, B): like the forward (two consumer warpgroups of 64 query rows,
    a producer streaming K, V); P = 2^(S' - lse2), dP = dO V^T, dS = P (dP - D), dQ += dS K.
  dK/dV kernel, grid (T / 128, H, B) over kv rows: the producer streams Q, dO, lse2, D (and
    query segment ids) tiles; per q tile S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
    dS^T = P^T (dP^T - D), dK += dS^T Q. No atomics: each kernel owns its outputs.

Known costs of this first version (not yet measured on a GPU):
- the matmuls that accumulate across steps (O, dQ, dK, dV) do so in place, in 64-column
  chunks (`pl.run_state` over `plgpu.ACC.init`; the interpreter runs it through
  pallas_kernels/_interpret_shim.py), but the dK/dV kernel still holds dK and dV (160 fp32
  registers a thread) plus S^T and dP^T: ptxas spills there, 88 bytes of stores at V3's shapes
  with the consumers' 240 registers (benchmarks/ptxas.py; forward and dQ spill nothing);
- the backward kernels use no ping-pong schedule barrier;
- masked steps (diagonal tiles, or every step with segment ids) build the mask from iotas and
  segment ids each step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

ROWS = 64            # rows per consumer warpgroup (one wgmma M tile)
CHUNK = 64           # head-dim chunk: one 128-byte swizzle row of bf16
CONSUMERS = 2        # consumer warpgroups per CTA
CTA_ROWS = ROWS * CONSUMERS
LOG2E = math.log2(math.e)
# Registers a thread (setmaxnreg) after the warpgroups split: the TMA producer hands its share to the
# two consumers, 24 + 2 x 240 = 504 per thread slot (x 128 = 64,512 of the SM's 65,536), FA3's
# split. ptxas at the GPU suite's shapes (python -m benchmarks.ptxas, 2026-11-30) spilled less
# with it than with 40 / 232: the dK/dV kernel 300 -> 188 bytes of spill stores; the
# forward and dQ kernels spill nothing either way.
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240


# ----------------------------------------------------------------------------- 1. tuning


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static kernel parameters (hashable: part of the jit cache key)."""

    block_kv: int = 128          # forward: kv rows per pipeline step (64 or 128)
    num_slots: int = 2           # forward: kv tiles in flight (SMEM ring)
    bwd_block: int = 64          # backward: rows of the streamed operand per step
    bwd_slots: int = 2           # backward: streamed tiles in flight

    def __post_init__(self):
        if self.block_kv not in (64, 128):
            raise ValueError(f"{self.block_kv=} must be 64 or 128")
        if self.bwd_block != 64:
            raise ValueError(f"{self.bwd_block=} must be 64 (one wgmma tile)")
        for name in ("num_slots", "bwd_slots"):
            if not 1 <= getattr(self, name) <= 3:
                raise ValueError(f"{name}={getattr(self, name)} must be 1, 2 or 3")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need at trace time (one hashable bundle)."""

    causal: bool
    segments: bool
    scale: float          # softmax scale (natural)
    interpret: bool
    config: TuningConfig

    @property
    def scale_log2(self) -> float:
        return self.scale * LOG2E


def _wgmma_iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _mask(st, s, q_pos, kv_pos, q_seg, kv_seg):
    """-inf where query q_pos may not see key kv_pos (causal, different segments)."""
    valid = None
    if st.causal:
        valid = q_pos >= kv_pos
    if st.segments:
        same = q_seg == kv_seg
        valid = same if valid is None else valid & same
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _row_vector(ref):
    """A [64] SMEM vector as a per-row value of a WGMMA tile."""
    return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA.reduce(1))


def _col_vector(ref):
    """A [64] SMEM vector as a per-column value of a WGMMA tile."""
    return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA.reduce(0))


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _matmul(shape, issue):
    """A fresh fp32 accumulator of `shape`, filled by `issue(acc_ref)` (wgmma calls)."""

    def body(acc_ref):
        issue(acc_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate(accs, lhs, tile):
    """accs (fp32 [64, 64] chunks) + lhs @ tile, chunk c of the product into accs[c], in place:
    lhs [64, rows] in registers, tile an SMEM ref [rows, C * 64]. The C wgmmas issue back to back
    and are awaited once, when run_state returns."""
    def issue(acc_refs):
        for c, acc in enumerate(acc_refs):
            plgpu.wgmma(acc, lhs, tile.at[:, pl.ds(c * CHUNK, CHUNK)])              # [rows, 64]

    return pl.run_state(issue)(tuple(plgpu.ACC.init(a) for a in accs))


def _load_chunks(gmem, b, t0, h, smem, bars, first_bar):
    """TMA rows [t0, t0 + 64) of head h, as 64-wide chunks, into smem [C, 64, 64]; chunk c
    completes on bars[first_bar + c] (the interpreter cannot slice barrier arrays)."""
    for c in range(smem.shape[0]):
        plgpu.copy_gmem_to_smem(gmem.at[b, pl.ds(t0, ROWS), h, pl.ds(c * CHUNK, CHUNK)],
                                smem.at[c], bars.at[first_bar + c])


def _wait_all(bars, first_bar, n):
    for c in range(n):
        plgpu.barrier_wait(bars.at[first_bar + c])


def _store_chunks(tiles, smem, gmem, b, t0, h):
    """Write fp32 [64, 64] tiles as bf16 through smem [C, 64, 64] into gmem rows [t0, t0+64)."""
    for c, x in enumerate(tiles):
        smem.at[c][...] = x.astype(smem.dtype)
    plgpu.commit_smem()
    for c in range(len(tiles)):
        plgpu.copy_smem_to_gmem(smem.at[c],
                                gmem.at[b, pl.ds(t0, ROWS), h, pl.ds(c * CHUNK, CHUNK)])


def _stream(steps, slots, fetch, consumed_bars):
    """Producer side of a ring: fetch(i, slot) for i < steps, refilling a slot once released.

    Every phase of every consumed barrier is observed (refill, then drain), so the ring is
    idle when the scope closes. `consumed_bars` is a list of barrier arrays, waited in order,
    each before the part of `fetch` it guards: fetch(i, slot, part).
    """
    for i in range(slots):
        for part in range(len(consumed_bars)):
            pl.when(i < steps)(functools.partial(fetch, i, i, part))

    @pl.loop(slots, jnp.maximum(steps, slots))
    def _refill(i):
        slot = lax.rem(i, jnp.int32(slots))
        for part, bars in enumerate(consumed_bars):
            plgpu.barrier_wait(bars.at[slot])
            fetch(i, slot, part)

    @pl.loop(jnp.maximum(steps - slots, 0), steps)
    def _drain(i):
        slot = lax.rem(i, jnp.int32(slots))
        for bars in consumed_bars:
            plgpu.barrier_wait(bars.at[slot])


# ----------------------------------------------------------------------------- 2. kernels


def _fwd_kernel(st, d_qk, d_v, ranges_gmem, q_gmem, k_gmem, v_gmem, seg_gmem, o_gmem,
                lse_gmem):
    """One CTA: 128 query rows of one head against the kv tiles in its range.

    ranges_gmem int32 [B, T / 128, 2]   first, end kv tile (of block_kv) the CTA may see
    q_gmem      bf16  [B, T, H, Dqk]     k_gmem bf16 [B, T, H, Dqk]   v_gmem bf16 [B, T, H, Dv]
    seg_gmem    int32 [B, T]            (read only with segment ids)
    o_gmem      bf16  [B, T, H, Dv]      lse_gmem f32 [B, H, T] (log2 domain)
    """
    cfg = st.config
    bk, slots = cfg.block_kv, cfg.num_slots
    cq, cv = d_qk // CHUNK, d_v // CHUNK
    qi, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    lo, hi = ranges_gmem[b, qi, 0], ranges_gmem[b, qi, 1]
    steps = hi - lo
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def scoped(q_smem, qseg_smem, lse_smem, k_smem, v_smem, kseg_smem, q_bars, qseg_bars,
               k_bars, v_bars, kseg_bars, k_consumed, v_consumed, schedule):
        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

            def fetch(i, slot, part):
                rows = pl.ds((lo + i) * bk, bk)
                if part == 0:
                    plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, h], k_smem.at[slot],
                                            k_bars.at[slot])
                    if st.segments:
                        plgpu.copy_gmem_to_smem(seg_gmem.at[b, rows], kseg_smem.at[slot],
                                                kseg_bars.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, h], v_smem.at[slot],
                                            v_bars.at[slot])

            _stream(steps, slots, fetch, [k_consumed, v_consumed])

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            t0 = qi * CTA_ROWS + wg * ROWS
            my_q = q_smem.at[wg]                                         # [Cq, 64, 64]
            _load_chunks(q_gmem, b, t0, h, my_q, q_bars, wg * cq)
            if st.segments:
                plgpu.copy_gmem_to_smem(seg_gmem.at[b, pl.ds(t0, ROWS)], qseg_smem.at[wg],
                                        qseg_bars.at[wg])
                plgpu.barrier_wait(qseg_bars.at[wg])
            _wait_all(q_bars, wg * cq, cq)
            q_seg = _row_vector(qseg_smem.at[wg]) if st.segments else None
            o, m_i, l_i = _fwd_consume(st, cq, cv, wg, t0, lo, hi, my_q, q_seg, k_smem,
                                       v_smem, kseg_smem, k_bars, v_bars, kseg_bars,
                                       k_consumed, v_consumed, schedule)
            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            o = [x / _rows(l_safe, x.shape) for x in o]
            _store_chunks(o, my_q, o_gmem, b, t0, h)          # Q's SMEM holds the output
            lse_smem.at[wg][...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[b, h, pl.ds(t0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((CONSUMERS, cq, ROWS, CHUNK), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.float32),
        plgpu.SMEM((slots, bk, d_qk), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, bk, d_v), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, bk), jnp.int32),
        plgpu.Barrier(num_barriers=CONSUMERS * cq),
        plgpu.Barrier(num_barriers=CONSUMERS),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=1),
        collective_axes="wg",
    )


def _fwd_consume(st, cq, cv, wg, t0, lo, hi, q_smem, q_seg, k_smem, v_smem, kseg_smem,
                 k_bars, v_bars, kseg_bars, k_consumed, v_consumed, schedule):
    """Online softmax over kv tiles [lo, hi): returns (O chunks [Cv x [64, 64]], m, l)."""
    bk, slots = st.config.block_kv, st.config.num_slots
    shape = (ROWS, bk)
    q_pos = _wgmma_iota(shape, 0) + t0
    col = _wgmma_iota(shape, 1)

    def sync():                       # both consumer warpgroups meet (ping-pong schedule)
        plgpu.barrier_arrive(schedule.at[0])
        plgpu.barrier_wait(schedule.at[0])

    def step(kv, carry, masked):
        o, m_i, l_i = carry
        slot = lax.rem(kv - lo, jnp.int32(slots))
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc):
            for c in range(cq):
                k_chunk = k_smem.at[slot, :, pl.ds(c * CHUNK, CHUNK)]         # [bk, 64]
                plgpu.wgmma(acc, q_smem.at[c], plgpu.transpose_ref(k_chunk, (1, 0)))
            sync()                    # the other warpgroup's softmax overlaps this matmul

        s = _matmul(shape, qk) * st.scale_log2                              # [64, bk]
        if masked:
            kv_seg = None
            if st.segments:
                plgpu.barrier_wait(kseg_bars.at[slot])
                kv_seg = _cols(_col_vector(kseg_smem.at[slot]), shape)
            s = _mask(st, s, q_pos, col + kv * bk, _rows(q_seg, shape) if st.segments else None,
                      kv_seg)
        plgpu.barrier_arrive(k_consumed.at[slot])
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)        # a row masked so far stays 0
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s - _rows(m_use, shape))
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(jnp.bfloat16)
        plgpu.barrier_arrive(schedule.at[0])                    # softmax done
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_wait(schedule.at[0])                      # tensor cores are ours
        o = _accumulate(tuple(o_c * _rows(alpha, o_c.shape) for o_c in o), p16, v_smem.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        return o, m_new, l_i

    carry = (tuple(_zeros((ROWS, CHUNK)) for _ in range(cv)),
             plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                               plgpu.Layout.WGMMA.reduce(1)),
             plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    pl.when(wg == 1)(sync)
    if st.causal and not st.segments:
        # Tiles wholly at or below the CTA's first row need no mask (FA3's fast path).
        full = jnp.clip(lax.div(lax.axis_index("q") * CTA_ROWS + 1, jnp.int32(bk)), lo, hi)
        carry = lax.fori_loop(lo, full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(full, hi, functools.partial(step, masked=True), carry)
    else:
        masked = st.causal or st.segments
        carry = lax.fori_loop(lo, hi, functools.partial(step, masked=masked), carry)
    pl.when(wg == 0)(sync)
    return carry


def _dq_kernel(st, d_qk, d_v, ranges_gmem, q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem,
               delta_gmem, seg_gmem, dq_gmem):
    """One CTA: dQ for 128 query rows of one head (kv tiles of bwd_block streamed).

    lse_gmem, delta_gmem f32 [B, H, T]; dq_gmem bf16 [B, T, H, Dqk]; the rest as forward.
    """
    bk, slots = st.config.bwd_block, st.config.bwd_slots
    cq, cv = d_qk // CHUNK, d_v // CHUNK
    qi, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    lo, hi = ranges_gmem[b, qi, 0], ranges_gmem[b, qi, 1]
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def scoped(q_smem, do_smem, vec_smem, qseg_smem, k_smem, v_smem, kseg_smem, q_bars,
               do_bars, vec_bars, qseg_bars, k_bars, v_bars, kseg_bars, consumed):
        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

            def fetch(i, slot, part):
                rows = pl.ds((lo + i) * bk, bk)
                plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, h], k_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, h], v_smem.at[slot], v_bars.at[slot])
                if st.segments:
                    plgpu.copy_gmem_to_smem(seg_gmem.at[b, rows], kseg_smem.at[slot],
                                            kseg_bars.at[slot])

            _stream(hi - lo, slots, fetch, [consumed])

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            t0 = qi * CTA_ROWS + wg * ROWS
            my_q, my_do, my_vec = q_smem.at[wg], do_smem.at[wg], vec_smem.at[wg]
            _load_chunks(q_gmem, b, t0, h, my_q, q_bars, wg * cq)
            _load_chunks(do_gmem, b, t0, h, my_do, do_bars, wg * cv)
            for j, src in enumerate((lse_gmem, delta_gmem)):    # vec_smem rows: lse2, D
                plgpu.copy_gmem_to_smem(src.at[b, h, pl.ds(t0, ROWS)], my_vec.at[j],
                                        vec_bars.at[wg * 2 + j])
            if st.segments:
                plgpu.copy_gmem_to_smem(seg_gmem.at[b, pl.ds(t0, ROWS)], qseg_smem.at[wg],
                                        qseg_bars.at[wg])
                plgpu.barrier_wait(qseg_bars.at[wg])
            _wait_all(q_bars, wg * cq, cq)
            _wait_all(do_bars, wg * cv, cv)
            _wait_all(vec_bars, wg * 2, 2)
            lse = _row_vector(my_vec.at[0])
            delta = _row_vector(my_vec.at[1])
            q_seg = _row_vector(qseg_smem.at[wg]) if st.segments else None
            dq = _dq_consume(st, cq, cv, t0, lo, hi, my_q, my_do, lse, delta, q_seg, k_smem,
                             v_smem, kseg_smem, k_bars, v_bars, kseg_bars, consumed)
            _store_chunks([x * st.scale for x in dq], my_q, dq_gmem, b, t0, h)
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((CONSUMERS, cq, ROWS, CHUNK), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((CONSUMERS, cv, ROWS, CHUNK), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((CONSUMERS, 2, ROWS), jnp.float32),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),
        plgpu.SMEM((slots, bk, d_qk), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, bk, d_v), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, bk), jnp.int32),
        plgpu.Barrier(num_barriers=CONSUMERS * cq),
        plgpu.Barrier(num_barriers=CONSUMERS * cv),
        plgpu.Barrier(num_barriers=CONSUMERS * 2),
        plgpu.Barrier(num_barriers=CONSUMERS),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        collective_axes="wg",
    )


def _dq_consume(st, cq, cv, t0, lo, hi, q_smem, do_smem, lse, delta, q_seg, k_smem, v_smem,
                kseg_smem, k_bars, v_bars, kseg_bars, consumed):
    """dQ (unscaled) over kv tiles [lo, hi) as Cq chunks of [64, 64]."""
    bk, slots = st.config.bwd_block, st.config.bwd_slots
    shape = (ROWS, bk)
    q_pos = _wgmma_iota(shape, 0) + t0
    col = _wgmma_iota(shape, 1)
    masked = st.causal or st.segments

    def step(kv, dq):
        slot = lax.rem(kv - lo, jnp.int32(slots))
        plgpu.barrier_wait(k_bars.at[slot])

        def qk(acc):
            for c in range(cq):
                k_chunk = k_smem.at[slot, :, pl.ds(c * CHUNK, CHUNK)]
                plgpu.wgmma(acc, q_smem.at[c], plgpu.transpose_ref(k_chunk, (1, 0)))

        s = _matmul(shape, qk) * st.scale_log2                           # [64, bk]
        if masked:
            kv_seg = None
            if st.segments:
                plgpu.barrier_wait(kseg_bars.at[slot])
                kv_seg = _cols(_col_vector(kseg_smem.at[slot]), shape)
            s = _mask(st, s, q_pos, col + kv * bk,
                      _rows(q_seg, shape) if st.segments else None, kv_seg)
        p = jnp.exp2(s - _rows(lse, shape))
        plgpu.barrier_wait(v_bars.at[slot])

        def do_vt(acc):
            for c in range(cv):
                v_chunk = v_smem.at[slot, :, pl.ds(c * CHUNK, CHUNK)]
                plgpu.wgmma(acc, do_smem.at[c], plgpu.transpose_ref(v_chunk, (1, 0)))

        dp = _matmul(shape, do_vt)                                       # [64, bk]
        ds16 = (p * (dp - _rows(delta, shape))).astype(jnp.bfloat16)
        dq = _accumulate(dq, ds16, k_smem.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return dq

    return lax.fori_loop(lo, hi, step, tuple(_zeros((ROWS, CHUNK)) for _ in range(cq)))


def _dkv_kernel(st, d_qk, d_v, ranges_gmem, q_gmem, k_gmem, v_gmem, do_gmem, lse_gmem,
                delta_gmem, seg_gmem, dk_gmem, dv_gmem):
    """One CTA: dK, dV for 128 kv rows of one head (q tiles of bwd_block streamed).

    ranges_gmem int32 [B, T / 128, 2]: first, end q tile that may see the CTA's keys.
    """
    bq, slots = st.config.bwd_block, st.config.bwd_slots
    cq, cv = d_qk // CHUNK, d_v // CHUNK
    ki, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
    wg = lax.axis_index("wg")
    lo, hi = ranges_gmem[b, ki, 0], ranges_gmem[b, ki, 1]
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def scoped(k_smem, v_smem, kseg_smem, q_ring, do_ring, vec_ring, qseg_ring, k_bars, v_bars,
               kseg_bars, q_bars, do_bars, vec_bars, qseg_bars, consumed):

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

            def fetch(i, slot, part):
                rows = pl.ds((lo + i) * bq, bq)
                plgpu.copy_gmem_to_smem(q_gmem.at[b, rows, h], q_ring.at[slot], q_bars.at[slot])
                plgpu.copy_gmem_to_smem(do_gmem.at[b, rows, h], do_ring.at[slot],
                                        do_bars.at[slot])
                for j, src in enumerate((lse_gmem, delta_gmem)):  # vec_ring rows: lse2, D
                    plgpu.copy_gmem_to_smem(src.at[b, h, rows], vec_ring.at[slot, j],
                                            vec_bars.at[slot * 2 + j])
                if st.segments:
                    plgpu.copy_gmem_to_smem(seg_gmem.at[b, rows], qseg_ring.at[slot],
                                            qseg_bars.at[slot])

            _stream(hi - lo, slots, fetch, [consumed])

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            t0 = ki * CTA_ROWS + wg * ROWS
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            _load_chunks(k_gmem, b, t0, h, my_k, k_bars, wg * cq)
            _load_chunks(v_gmem, b, t0, h, my_v, v_bars, wg * cv)
            if st.segments:
                plgpu.copy_gmem_to_smem(seg_gmem.at[b, pl.ds(t0, ROWS)], kseg_smem.at[wg],
                                        kseg_bars.at[wg])
                plgpu.barrier_wait(kseg_bars.at[wg])
            _wait_all(k_bars, wg * cq, cq)
            _wait_all(v_bars, wg * cv, cv)
            kv_seg = _row_vector(kseg_smem.at[wg]) if st.segments else None
            dk, dv = _dkv_consume(st, cq, cv, t0, lo, hi, my_k, my_v, kv_seg, q_ring, do_ring,
                                  vec_ring, qseg_ring, q_bars, do_bars, vec_bars, qseg_bars,
                                  consumed)
            _store_chunks([x * st.scale for x in dk], my_k, dk_gmem, b, t0, h)
            _store_chunks(dv, my_v, dv_gmem, b, t0, h)
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((CONSUMERS, cq, ROWS, CHUNK), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((CONSUMERS, cv, ROWS, CHUNK), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((CONSUMERS, ROWS), jnp.int32),
        plgpu.SMEM((slots, bq, d_qk), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, bq, d_v), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((slots, 2, bq), jnp.float32),
        plgpu.SMEM((slots, bq), jnp.int32),
        plgpu.Barrier(num_barriers=CONSUMERS * cq),
        plgpu.Barrier(num_barriers=CONSUMERS * cv),
        plgpu.Barrier(num_barriers=CONSUMERS),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots * 2),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=slots),
        collective_axes="wg",
    )


def _dkv_consume(st, cq, cv, t0, lo, hi, k_smem, v_smem, kv_seg, q_ring, do_ring, vec_ring,
                 qseg_ring, q_bars, do_bars, vec_bars, qseg_bars, consumed):
    """(dK unscaled as Cq chunks, dV as Cv chunks) of [64, 64] over q tiles [lo, hi)."""
    bq, slots = st.config.bwd_block, st.config.bwd_slots
    shape = (ROWS, bq)                                    # rows: keys, columns: queries
    kv_pos = _wgmma_iota(shape, 0) + t0
    col = _wgmma_iota(shape, 1)
    masked = st.causal or st.segments

    def step(qt, carry):
        dk, dv = carry
        slot = lax.rem(qt - lo, jnp.int32(slots))
        plgpu.barrier_wait(q_bars.at[slot])
        for j in range(2):
            plgpu.barrier_wait(vec_bars.at[slot * 2 + j])

        def kq(acc):
            for c in range(cq):
                q_chunk = q_ring.at[slot, :, pl.ds(c * CHUNK, CHUNK)]            # [bq, 64]
                plgpu.wgmma(acc, k_smem.at[c], plgpu.transpose_ref(q_chunk, (1, 0)))

        s_t = _matmul(shape, kq) * st.scale_log2                          # [64 keys, bq]
        if masked:
            q_seg = None
            if st.segments:
                plgpu.barrier_wait(qseg_bars.at[slot])
                q_seg = _cols(_col_vector(qseg_ring.at[slot]), shape)
            s_t = _mask(st, s_t, col + qt * bq, kv_pos, q_seg,
                        _rows(kv_seg, shape) if st.segments else None)
        p_t = jnp.exp2(s_t - _cols(_col_vector(vec_ring.at[slot, 0]), shape))     # lse2
        p16 = p_t.astype(jnp.bfloat16)
        plgpu.barrier_wait(do_bars.at[slot])
        dv = _accumulate(dv, p16, do_ring.at[slot])

        def v_dot(acc):
            for c in range(cv):
                do_chunk = do_ring.at[slot, :, pl.ds(c * CHUNK, CHUNK)]
                plgpu.wgmma(acc, v_smem.at[c], plgpu.transpose_ref(do_chunk, (1, 0)))

        dp_t = _matmul(shape, v_dot)                                      # [64 keys, bq]
        # D read only now: a broadcast row held across dV's and dP's matmuls costs registers
        # this kernel does not have (ptxas: 188 -> 88 bytes of spill stores at V3's shapes).
        delta = _cols(_col_vector(vec_ring.at[slot, 1]), shape)
        ds16 = (p_t * (dp_t - delta)).astype(jnp.bfloat16)
        dk = _accumulate(dk, ds16, q_ring.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

    zeros = lambda n: tuple(_zeros((ROWS, CHUNK)) for _ in range(n))  # noqa: E731
    return lax.fori_loop(lo, hi, step, (zeros(cq), zeros(cv)))


# ----------------------------------------------------------------------------- 3. wrappers


def _check_inputs(q, k, v, segment_ids, *, kernel: bool, config: TuningConfig):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D], got {q.shape=} {k.shape=} {v.shape=}")
    batch, seq, heads, d_qk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape}, got {k.shape=}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [{batch}, {seq}, {heads}, Dv], got {v.shape=}")
    if segment_ids is not None and (segment_ids.shape != (batch, seq)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be integer [{batch}, {seq}], got "
                         f"{segment_ids.dtype} {segment_ids.shape}")
    if not kernel:
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != jnp.bfloat16:
            raise ValueError(f"the Pallas kernel takes bfloat16 {name}, got {x.dtype}")
    d_v = v.shape[3]
    for name, d in (("d_qk", d_qk), ("d_v", d_v)):
        if d % CHUNK or not CHUNK <= d <= 256:
            raise ValueError(f"{name}={d} must be a multiple of {CHUNK} in [64, 256]")
    for block in (CTA_ROWS, config.block_kv, config.bwd_block):
        if seq % block:
            raise ValueError(f"sequence length {seq=} must be a multiple of {block}")


def _tile_ranges(seg, causal, row_block, col_block, keys_as_rows):
    """[B, T / row_block, 2] int32: first and end column tile that a row tile may see.

    Rows are queries and columns keys, or the other way round with `keys_as_rows` (dK/dV).
    A tile pair is kept when any of its (query, key) pairs is allowed; a row tile with none
    gets the empty range [0, 0).
    """
    batch, seq = seg.shape
    pos = jnp.arange(seq)
    allowed = seg[:, :, None] == seg[:, None, :]                          # [B, Tq, Tk]
    if causal:
        allowed &= pos[:, None] >= pos[None, :]
    if keys_as_rows:
        allowed = allowed.transpose(0, 2, 1)
    tiles = allowed.reshape(batch, seq // row_block, row_block, seq // col_block, col_block)
    tiles = tiles.any(axis=(2, 4))                                        # [B, R, C]
    n_col = tiles.shape[2]
    seen = tiles.any(axis=2)
    first = jnp.where(seen, jnp.argmax(tiles, axis=2), 0)
    end = jnp.where(seen, n_col - jnp.argmax(tiles[..., ::-1], axis=2), 0)
    return jnp.stack([first, end], axis=-1).astype(jnp.int32)


def _kernel_call(st, body, grid_rows, heads, batch, out_type, *args):
    kwargs = {}
    if st.interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kwargs["interpret"] = InterpretGPUParams()
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(grid_rows, heads, batch), grid_names=("q", "h", "b"),
        num_threads=CONSUMERS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)
    return kernel(*args)


@functools.partial(jax.jit, static_argnames="st")
def _forward(q, k, v, seg, st):
    batch, seq, heads, d_qk = q.shape
    d_v = v.shape[3]
    ranges = _tile_ranges(seg, st.causal, CTA_ROWS, st.config.block_kv, keys_as_rows=False)
    out_type = (jax.ShapeDtypeStruct((batch, seq, heads, d_v), q.dtype),
                jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
    body = functools.partial(_fwd_kernel, st, d_qk, d_v)
    return _kernel_call(st, body, seq // CTA_ROWS, heads, batch, out_type, ranges, q, k, v, seg)


@functools.partial(jax.jit, static_argnames="st")
def _backward(q, k, v, seg, out, lse, do, st):
    batch, seq, heads, d_qk = q.shape
    d_v = v.shape[3]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    blk = st.config.bwd_block
    q_ranges = _tile_ranges(seg, st.causal, CTA_ROWS, blk, keys_as_rows=False)
    k_ranges = _tile_ranges(seg, st.causal, CTA_ROWS, blk, keys_as_rows=True)
    dq = _kernel_call(st, functools.partial(_dq_kernel, st, d_qk, d_v), seq // CTA_ROWS,
                      heads, batch, jax.ShapeDtypeStruct(q.shape, q.dtype),
                      q_ranges, q, k, v, do, lse, delta, seg)
    dk, dv = _kernel_call(st, functools.partial(_dkv_kernel, st, d_qk, d_v), seq // CTA_ROWS,
                          heads, batch, (jax.ShapeDtypeStruct(k.shape, k.dtype),
                                         jax.ShapeDtypeStruct(v.shape, v.dtype)),
                          k_ranges, q, k, v, do, lse, delta, seg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- 4. custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, st):
    return _forward(q, k, v, seg, st)[0]


def _attention_fwd(q, k, v, seg, st):
    out, lse = _forward(q, k, v, seg, st)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(st, res, do):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, do.astype(q.dtype), st)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def mla_attention(
    q: Float[Array, "B T H Dqk"],
    k: Float[Array, "B T H Dqk"],
    v: Float[Array, "B T H Dv"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "B T"] | None = None,
    softmax_scale: float | None = None,
    interpret: bool = False,
    implementation: Literal["pallas", "xla"] | None = None,
    config: TuningConfig = TuningConfig(),
) -> Float[Array, "B T H Dv"]:
    """Self-attention with separate q/k and v head dims: out [B, T, H, Dv] in q's dtype.

    `segment_ids` packs several sequences into one row: a query sees only keys of its own
    segment (and, with `causal`, only keys at or before it). `softmax_scale` defaults to
    Dqk ** -0.5. Differentiable in q, k, v.

    implementation: "pallas" runs the Mosaic GPU kernels (forward and backward; bf16, T a
    multiple of 128 and of the blocks, head dims multiples of 64 up to 256; `interpret` runs
    them in the GPU interpreter on CPU); "xla" runs `mla_attention_reference` (any float dtype;
    jax autodiff for the backward). None picks "pallas" on a GPU backend or when interpreting,
    "xla" otherwise.
    """
    if implementation not in (None, "pallas", "xla"):
        raise ValueError(f"{implementation=} must be None, 'pallas' or 'xla'")
    if implementation is None:
        implementation = "pallas" if interpret or jax.default_backend() == "gpu" else "xla"
    _check_inputs(q, k, v, segment_ids, kernel=implementation == "pallas", config=config)
    if softmax_scale is None:
        softmax_scale = q.shape[3] ** -0.5
    if implementation == "xla":
        return mla_attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                                       softmax_scale=softmax_scale)
    if interpret:
        _install_interpret_shims()     # here, outside any jit: a cached trace would skip it
    seg = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    st = _Static(causal=bool(causal), segments=segment_ids is not None,
                 scale=float(softmax_scale), interpret=bool(interpret), config=config)
    return _attention(q, k, v, seg, st)


def _install_interpret_shims():
    from pallas_kernels import _interpret_shim   # interpret-only: touches jax internals

    _interpret_shim.install()


# ----------------------------------------------------------------------------- 5. reference


def mla_attention_reference(
    q: Float[Array, "B T H Dqk"],
    k: Float[Array, "B T H Dqk"],
    v: Float[Array, "B T H Dv"],
    *,
    causal: bool = True,
    segment_ids: Int[Array, "B T"] | None = None,
    softmax_scale: float | None = None,
    compute_dtype=jnp.float32,
) -> Float[Array, "B T H Dv"]:
    """Plain jnp attention, computed in `compute_dtype` (float64 for ground truth under
    jax_enable_x64); out in q's dtype. A row with no visible key gives 0."""
    batch, seq, heads, d_qk = q.shape
    out_dtype = q.dtype
    if softmax_scale is None:
        softmax_scale = d_qk ** -0.5
    q, k, v = (x.astype(compute_dtype) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale               # [B, H, T, T]
    allowed = jnp.ones((batch, seq, seq), bool)
    if causal:
        allowed &= jnp.tril(jnp.ones((seq, seq), bool))[None]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))                   # [B, H, T, T]
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v)                             # [B, T, H, Dv]
    return out.astype(out_dtype)
