"""FlashMLA: multi-head latent attention decode over a paged latent cache (Mosaic GPU, Hopper).

Absorbed-MLA decode: every query head attends to one shared latent per token. A cache token
holds 576 values: the 512-d normalised latent (which is also V) and the 64-d roped key.

Letter legend for shapes (in names and comments):
  B   batch                     Sq  query positions per step (1, or 2 with MTP)
  Hq  query heads               Hkv latent heads (1 for MLA)     G  Hq // Hkv
  N   cache blocks (pages)      P   tokens per page (64)          M  max pages per sequence
  D   576 = Dv + rope           Dv  512                           S  KV splits per sequence
  R   query rows per latent head = Sq * G, padded to a multiple of 64 (Rp)

The kernel's grid is (m-tile of 64 query rows, split, batch * Hkv). Each CTA runs three
warpgroups: warpgroup 2 gathers the split's pages through the block table with TMA into a
ring of SMEM slots; warpgroups 0 and 1 both compute S = Q K^T for the tile (64 x 64 per page)
and the online softmax, then each multiplies P by its own half of V (256 of the 512 latent
dims, as four 64 x 64 f32 accumulators). Every split writes its partial output (normalised,
bf16) and its log-sum-exp; `_combine` merges the splits with lse weights in f32 (plain jnp,
fused by XLA). With one split per sequence (FlashMLA's b=128 benchmark shapes fill the SMs
without splitting) the partial is the output and the merge is skipped.

Known costs of this first version (not yet measured on a GPU):
- both consumer warpgroups compute the same S = Q K^T (FlashMLA shares P through SMEM
  instead): ~1.5x the tensor-core work, which matters when compute-bound (h_q = 128, s_q = 2).
  `TuningConfig(pair_pages=True)` shares it: pages go in pairs, warpgroup w computes S for
  page 2j + w, the row maxima and then each page's P (one 8 KiB SMEM tile, written in turn)
  pass between the warpgroups, and both multiply both pages' P by their V halves. It fits
  the SMEM budget (231,496 of 232,448 bytes) only with 1 KiB of reduction scratch instead of
  Pallas's default 2 KiB, and costs three barriers a pair. Page 2j's slot is handed back for
  refilling as soon as both warpgroups have multiplied its P, so page 2j + 2 loads during page
  2j + 1's PV (both slots hold the pair, so that is the only overlap). ptxas spills 384-444
  bytes in it (the default: 4-52; benchmarks/ptxas.py): about 36 local loads a pair step of
  some 1,050 instructions, loop invariants reloaded. Off until a GPU run measures it;
- both consumer warpgroups run softmax at the same time, while the tensor cores idle;
  `TuningConfig(ping_pong=True)` staggers them with a schedule barrier (FA3's ping-pong: one's
  softmax under the other's matmuls). ptxas: 32 bytes of spill stores at s_q = 2 (the default:
  44). Off until a GPU run times it;
- split partials are stored in bf16 through Q's SMEM (Q + 2 pages use 216 of 227 KiB, so there
  is no room for an f32 staging tile); FlashMLA keeps them in f32;
- the FP8 cache is dequantised to bf16 by XLA before the kernel (only the pages the block table
  names, or the pool if that is smaller), so it saves cache memory but not kernel bandwidth:
  656 bytes read, 1,152 written and 1,152 read again a token. `TuningConfig(
  dequantize_in_kernel=True)` has XLA only split those pages by field (latent e4m3, rope bf16,
  scales f32: 656 read and written), and the kernel reads the 656 bytes: six TMA copies a page
  into two FP8 slots, and each consumer dequantises its V half into one bf16 staging page that
  S and PV read. Q + 2 FP8 pages + the staging page: 218 of 227 KiB; two barriers a page.
  Reading FlashMLA's packed rows directly would need typed views of one buffer, which neither
  a Mosaic GPU copy nor XLA gives for free (`_split_fp8_pages`). Off until a GPU run times it
  against the XLA-dequantised path (the suite's fp8 entries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int, Shaped

PAGE = 64           # tokens per cache page (FlashMLA's block size)
D_QK = 576          # latent (512) + rope (64)
D_V = 512
D_ROPE = D_QK - D_V
FP8_TOKEN_BYTES = D_V + 4 * 4 + D_ROPE * 2   # 656: 512 e4m3, 4 f32 scales, 64 bf16 rope
FP8_TILE = 128      # one scale per 128 latent values
QUARTER = 64        # PV accumulator width (one 64-column chunk of Dv)
NUM_SMS = 132       # H100/H200 SXM
# Registers a thread (setmaxnreg) after the warpgroups split: the TMA producer hands its share to the
# two consumers, 24 + 2 x 240 = 504 per thread slot (x 128 = 64,512 of the SM's 65,536), FA3's
# split. ptxas at the GPU suite's shapes (python -m benchmarks.ptxas, 2026-11-30) spilled less
# with it than with 40 / 232: FlashMLA 84 -> 44 bytes of spill stores at s_q = 2, 56 -> 4 at s_q = 1.
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240


# ----------------------------------------------------------------------------- 1. tuning


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static kernel parameters (hashable: part of the jit cache key)."""

    block_m: int = 64           # query rows per CTA (one wgmma M tile)
    num_slots: int = 2          # pages in flight (SMEM ring)
    num_sm_parts: int = NUM_SMS  # CTAs the tile scheduler aims to fill
    # Warpgroup w computes S only for page 2j + w of each pair and both multiply both pages' P
    # (exchanged through one SMEM tile) by their V halves, as FlashMLA shares P: 1/1.53 of the
    # tensor-core work of both computing every S (the default), for three barriers a pair.
    pair_pages: bool = False
    # O += P V in place (pl.run_state over the four 64-column accumulators: one wait a page).
    # False: the form timed on 2026-11-29, a fresh accumulator per chunk, awaited and added in
    # registers; kept for the GPU suite's A/B until a GPU run has compared them.
    accumulate_in_place: bool = True
    # FA3's ping-pong for the default kernel: a schedule barrier staggers the two consumer
    # warpgroups so that one's softmax runs while the other's S and PV matmuls hold the tensor
    # cores (by default both compute S, then both run softmax, leaving the tensor cores idle).
    # Off until a GPU run has timed it (the suite's sweep entries).
    ping_pong: bool = False
    # FP8 caches only: XLA splits the table's pages by field (latent e4m3, rope, scales: 656
    # bytes a token read and written), the kernel reads them by TMA into two FP8 slots, and each
    # consumer warpgroup dequantises its V half of the page into one bf16 staging page, which S
    # and PV then read. False: XLA dequantises the pages to bf16 first and the bf16 kernel runs
    # (656 read, 1,152 written and read again). Off until a GPU run has timed it (the suite's
    # fp8 entries, side by side).
    dequantize_in_kernel: bool = False

    def __post_init__(self):
        if self.block_m != 64:
            raise ValueError(f"{self.block_m=} must be 64 (one wgmma tile per warpgroup)")
        if not 1 <= self.num_slots <= 2:
            raise ValueError(f"{self.num_slots=} must be 1 or 2 (SMEM holds Q and 2 pages)")
        if self.num_sm_parts < 1:
            raise ValueError(f"{self.num_sm_parts=} must be positive")
        if self.pair_pages and self.num_slots != 2:
            raise ValueError(f"pair_pages needs num_slots=2 (a pair of pages in flight), got {self.num_slots}")
        if self.pair_pages and self.ping_pong:
            raise ValueError("ping_pong staggers the default kernel's warpgroups; pair_pages has its own "
                             "exchange schedule: set one of them")
        if self.dequantize_in_kernel and (self.pair_pages or self.ping_pong):
            raise ValueError("dequantize_in_kernel runs the default schedule (SMEM holds Q, two FP8 "
                             "pages and one bf16 staging page): unset pair_pages and ping_pong")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernel body needs to know at trace time."""

    s_q: int
    heads_per_kv: int     # G
    rows: int             # R = s_q * G (unpadded)
    h_kv: int
    causal: bool
    scale_log2: float     # softmax_scale * log2(e)
    slots: int
    pairs: bool = False   # TuningConfig.pair_pages
    in_place: bool = True  # TuningConfig.accumulate_in_place
    ping_pong: bool = False  # TuningConfig.ping_pong
    fp8: bool = False        # an FP8 cache, dequantised in the kernel (TuningConfig.dequantize_in_kernel)


# ----------------------------------------------------------------------------- 2. kernel


def _kernel(st: _Static, sched_gmem, seqlens_gmem, table_gmem, q_gmem, *rest):
    """One CTA: 64 query rows x one split of one sequence's pages.

    sched_gmem   int32 [B, S, 2]      (first page, end page) of each split
    seqlens_gmem int32 [B]
    table_gmem   int32 [B, M]
    q_gmem       bf16  [B, Hkv, Rp / 64, D / 64, 64, 64]   Q in 64 x 64 chunks
    rest         k_gmem bf16 [N, P, Hkv, D], or with st.fp8 the FP8 cache's fields
                 (`_split_fp8_pages`): e4m3 [N, P, Hkv, 512], bf16 [N, P, Hkv, 64], f32
                 [N, P, Hkv, 4]; then
    o_gmem       bf16  [B, Hkv, S, Rp, Dv]   partial outputs (normalised within the split)
    lse_gmem     f32   [B, Hkv, S, Rp]       natural-log lse of each split (-inf if empty)
    """
    k_gmems, (o_gmem, lse_gmem) = rest[:-2], rest[-2:]
    m_idx = lax.axis_index("m")
    split = lax.axis_index("split")
    bh = lax.axis_index("bh")
    b = lax.div(bh, jnp.int32(st.h_kv))
    kvh = lax.rem(bh, jnp.int32(st.h_kv))
    wg = lax.axis_index("wg")
    first = sched_gmem[b, split, 0]
    steps = sched_gmem[b, split, 1] - first
    seqlen = seqlens_gmem[b]
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)

    def main_loop(q_smem, k_smem, *scratch):
        # Swizzled buffers first. With st.pairs: the shared P tile; vec_smem [3, 64] holds the
        # exchanged row statistics and then the lse row, and done_bar also the three exchange
        # barriers (the SMEM budget has no room for separate allocations). With st.fp8, k_smem
        # is (latent e4m3 [slots, Dv / 128, P, 128], rope bf16 [slots, P, 64], scales f32
        # [slots, P, 4], bf16 staging page [P, Dv]) and done_bar also the staging barriers.
        p_smem, scratch = (scratch[0], scratch[1:]) if st.pairs else (None, scratch)
        if st.fp8:
            k_smem, scratch = (k_smem, *scratch[:3]), scratch[3:]
        vec_smem, q_bar, k_bars, consumed_bars, done_bar = scratch
        lse_smem = vec_smem.at[2] if st.pairs else vec_smem
        # q_smem [D / 64, 64, 64] bf16 (Q in chunks); k_smem [slots, P, D] bf16.
        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
            plgpu.copy_gmem_to_smem(q_gmem.at[b, kvh, m_idx], q_smem, q_bar)

            def fetch(step, slot):
                page = table_gmem[b, first + step]
                if not st.fp8:
                    plgpu.copy_gmem_to_smem(k_gmems[0].at[page, :, kvh], k_smem.at[slot],
                                            k_bars.at[slot])
                    return
                # A token's latent (512 e4m3: four untiled copies of 128-byte rows, swizzled
                # by the TMA unit, which the packed 656-byte rows would also allow once a copy
                # can take typed views of one buffer), rope (64 bf16) and 4 f32 scales: six
                # copies on one barrier.
                (lat_gmem, rope_gmem, scale_gmem), (lat_smem, rope_smem, scale_smem, _) = k_gmems, k_smem
                for t in range(D_V // FP8_TILE):
                    plgpu.copy_gmem_to_smem(lat_gmem.at[page, :, kvh, pl.ds(t * FP8_TILE, FP8_TILE)],
                                            lat_smem.at[slot, t], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(rope_gmem.at[page, :, kvh], rope_smem.at[slot], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(scale_gmem.at[page, :, kvh], scale_smem.at[slot], k_bars.at[slot])

            for i in range(st.slots):
                pl.when(i < steps)(functools.partial(fetch, i, i))

            @pl.loop(st.slots, jnp.maximum(steps, st.slots))
            def _refill(step):
                slot = lax.rem(step, jnp.int32(st.slots))
                plgpu.barrier_wait(consumed_bars.at[slot])
                fetch(step, slot)

            # Observe the last phases too, so that the ring is idle when the scope closes.
            @pl.loop(jnp.maximum(steps - st.slots, 0), steps)
            def _drain(step):
                plgpu.barrier_wait(consumed_bars.at[lax.rem(step, jnp.int32(st.slots))])

        @pl.when(wg < 2)
        def _consumers():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            o_acc, m_i, l_i = _consume(st, wg, m_idx, first, steps, seqlen, q_smem, k_smem,
                                       q_bar, k_bars, consumed_bars, p_smem, vec_smem, done_bar)
            # Q's SMEM becomes the output tile: wait until both warpgroups are done with Q.
            plgpu.barrier_arrive(done_bar.at[0])
            plgpu.barrier_wait(done_bar.at[0])
            _write_back(wg, b, kvh, split, m_idx, o_acc, m_i, l_i, q_smem, lse_smem, o_gmem,
                        lse_gmem)

    if st.fp8:    # Q 72 + two FP8 pages 2 x 41 + the bf16 staging page 64 KiB: 218 of 227 KiB,
        # 221 with the lse row, the barriers and the reduction scratch
        pages = (plgpu.SMEM((st.slots, D_V // FP8_TILE, PAGE, FP8_TILE), jnp.float8_e4m3fn,
                            transforms=(swizzle,)),
                 plgpu.SMEM((st.slots, PAGE, D_ROPE), jnp.bfloat16, transforms=(tiling, swizzle)),
                 plgpu.SMEM((st.slots, PAGE, D_V // FP8_TILE), jnp.float32),
                 plgpu.SMEM((PAGE, D_V), jnp.bfloat16, transforms=(tiling, swizzle)))
    else:
        pages = (plgpu.SMEM((st.slots, PAGE, D_QK), jnp.bfloat16, transforms=(tiling, swizzle)),)
    pl.run_scoped(
        main_loop,
        plgpu.SMEM((D_QK // 64, 64, 64), jnp.bfloat16, transforms=(tiling, swizzle)),
        *pages,
        *([plgpu.SMEM((64, PAGE), jnp.bfloat16, transforms=(tiling, swizzle))] if st.pairs else []),
        plgpu.SMEM((3, 64) if st.pairs else (64,), jnp.float32),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=D_V // FP8_TILE + 2 if st.fp8 else 1, num_barriers=st.slots),
        plgpu.Barrier(num_arrivals=2, num_barriers=st.slots),
        plgpu.Barrier(num_arrivals=2, num_barriers=4 if st.pairs else 3 if st.fp8 else 2 if st.ping_pong else 1),
        collective_axes="wg",
    )


def _consume(st, wg, m_idx, first, steps, seqlen, q_smem, k_smem, q_bar, k_bars,
             consumed_bars, p_smem, stats_smem, x_bars):
    """Warpgroups 0/1: online softmax over the split's pages; returns this half's state.
    p_smem (None unless st.pairs) and stats_smem serve pages in pairs, x_bars pairs and ping-pong.

    st.pairs: pages go in pairs (2j, 2j + 1). Warpgroup w computes S for page 2j + w only; the
    row maxima pass through stats_smem (barrier x_bars[1]) so both use the same m; warpgroup 0
    then writes its P to p_smem (x_bars[2]), both multiply it by their V halves of page 2j and
    sync (x_bars[3]) before warpgroup 1 writes its P there (x_bars[2]) for page 2j + 1. Each
    sums l over its own pages; the sums are added, in one order, after the last page. Pairs
    take full pages only: the sequence's partial last page (whose stale tail rows must be zeroed
    in SMEM first) and an odd page left over run the unpaired step, their l counted by warpgroup
    0. Zeroing a tail inside the pair step cost 260 of its 644 bytes of register spills (ptxas,
    benchmarks/ptxas.py). A buffer is overwritten only after a barrier that both pass after
    reading it.

    st.ping_pong (default kernel only): x_bars[1] is the schedule barrier. Warpgroup 1 meets it
    once first, so each warpgroup issues its S matmuls, meets the other (whose softmax then runs
    under them), runs its own softmax, and meets again before its PV: the tensor cores alternate
    between the warpgroups instead of idling while both run softmax. Warpgroup 0 meets it once
    after its last page, so both pass it equally often (an empty split too).

    st.fp8: k_smem is (latent e4m3 slots, rope bf16 slots, scale slots, bf16 staging page). Each
    warpgroup dequantises its V half of the page into the staging page (stale rows as 0). They
    meet (x_bars[1]); S reads the staging page and the rope slot, PV the warpgroup's own half.
    After S the FP8 slot goes back to the producer and each warpgroup arrives at x_bars[2]; it
    waits there after its PV, so that neither overwrites its half for the next page while the
    other's S may still read it.
    """
    half = D_V // 2
    wgmma_layout = plgpu.Layout.WGMMA
    rows = plgpu.broadcasted_iota(jnp.int32, (64, PAGE), 0, layout=wgmma_layout)
    cols = plgpu.broadcasted_iota(jnp.int32, (64, PAGE), 1, layout=wgmma_layout)
    # Row r of the tile is query position (r // G) of head (r % G); with causal masking the
    # last query position sees the whole cache and each earlier one sees one token less.
    q_pos = lax.div(rows + m_idx * 64, jnp.int32(st.heads_per_kv))
    # (Padding rows past R get q_pos >= Sq; the clamp keeps them off the stale tail too.)
    limit = jnp.minimum(seqlen - (st.s_q - 1 - q_pos), seqlen) if st.causal else \
        jnp.broadcast_to(seqlen, rows.shape)

    plgpu.barrier_wait(q_bar.at[0])
    o_acc = tuple(plgpu.layout_cast(jnp.zeros((64, QUARTER), jnp.float32), wgmma_layout)
                  for _ in range(half // QUARTER))                      # 4 x [64, 64]
    m_i = plgpu.layout_cast(jnp.full((64,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1))
    l_i = plgpu.layout_cast(jnp.zeros((64,), jnp.float32), wgmma_layout.reduce(1))

    def sync(i):                        # both consumer warpgroups meet at x_bars[i]
        plgpu.barrier_arrive(x_bars.at[i])
        plgpu.barrier_wait(x_bars.at[i])

    def v_chunk(slot, c):
        """Columns c * 64 .. c * 64 + 63 of this warpgroup's V half ([P, 64] in SMEM)."""
        col = wg * half + c * QUARTER
        return k_smem[3].at[:, pl.ds(col, QUARTER)] if st.fp8 else k_smem.at[slot, :, pl.ds(col, QUARTER)]

    def k_chunk(slot, c):
        """Columns c * 64 .. c * 64 + 63 of the page's K ([P, 64] in SMEM)."""
        if not st.fp8:
            return k_smem.at[slot, :, pl.ds(c * 64, 64)]
        _, rope_smem, _, stage_smem = k_smem
        return rope_smem.at[slot] if c == D_V // 64 else stage_smem.at[:, pl.ds(c * 64, 64)]

    def scores(slot, page):
        """S for one page of the split, scaled to log2 units, -inf where masked."""
        def qk(acc_ref):
            # Q sits in SMEM as 9 chunks of 64 x 64 (so that each chunk can later stage a
            # contiguous piece of the output); S accumulates over the 9 chunks of D.
            for c in range(D_QK // 64):
                plgpu.wgmma(acc_ref, q_smem.at[c], plgpu.transpose_ref(k_chunk(slot, c), (1, 0)))
            if st.ping_pong:
                sync(1)                 # the other warpgroup's softmax runs under these matmuls
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((64, PAGE), jnp.float32))   # [64, P]
        return jnp.where(((first + page) * PAGE + cols) < limit, s * st.scale_log2, -jnp.inf)

    def softmax_step(s, s_max, m_i):
        """(m_new, alpha = the old state's rescale, P) for the new running maximum."""
        m_new = jnp.maximum(m_i, s_max)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)               # empty rows stay 0
        return m_new, jnp.exp2(m_i - m_use), jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))

    def zero_tail(slot, page):
        # The tail of the last page may hold garbage (NaN in FlashMLA's tests); P is 0 there
        # but 0 * NaN is NaN, so this warpgroup zeroes the stale rows of its V half first.
        n_valid = seqlen - (first + page) * PAGE

        @pl.when(n_valid < PAGE)
        def _():
            for c in range(half // 64):
                chunk = v_chunk(slot, c)                                # [P, 64]
                x = chunk[...]                                          # WGMMA layout
                chunk[...] = jnp.where(rows < n_valid, x, jnp.zeros_like(x))
            plgpu.commit_smem()

    def times_v(o_acc, slot, alpha, p_lhs):
        """o_acc (rescaled by alpha unless None) + P V_half of the page in `slot`, accumulated
        in place (run_state): the four 64-column wgmmas issue back to back and are awaited once,
        and no fresh accumulator is added in registers afterwards."""
        def pv(acc_refs):
            for c, acc_ref in enumerate(acc_refs):
                plgpu.wgmma(acc_ref, p_lhs, v_chunk(slot, c))

        if alpha is not None:
            o_acc = tuple(o_c * lax.broadcast_in_dim(alpha, o_c.shape, [0]) for o_c in o_acc)
        if st.in_place:
            return pl.run_state(pv)(tuple(plgpu.ACC.init(o_c) for o_c in o_acc))

        def piece(acc_ref, c):                                         # the 2026-11-29 form
            plgpu.wgmma(acc_ref, p_lhs, v_chunk(slot, c))
            return acc_ref[...]

        return tuple(o_c + pl.run_scoped(functools.partial(piece, c=c), plgpu.ACC((64, QUARTER), jnp.float32))
                     for c, o_c in enumerate(o_acc))

    def dequantize(slot, page):
        """This warpgroup's V half of the FP8 page -> the bf16 staging page, stale rows as 0 (the
        tail of a partial page may hold NaN codes or scales; P is 0 there, but 0 * NaN is NaN).
        Rounding as `dequantize_kv_cache_fp8`: e4m3 -> f32 exactly, times the scale in f32, one
        rounding to bf16."""
        lat_smem, _, scale_smem, stage_smem = k_smem
        row = plgpu.broadcasted_iota(jnp.int32, (PAGE,), 0, layout=wgmma_layout.reduce(1))
        valid = row < seqlen - (first + page) * PAGE                    # [P] bool
        for t in range(half // FP8_TILE):
            tile = wg * (half // FP8_TILE) + t
            # (the layout_cast right after the load makes it a WGMMA-layout load from the
            # swizzled rows; 32-bit loads as WGMMA_UPCAST_2X and a relayout spilled as much and
            # ran 38 more instructions a page)
            codes = plgpu.layout_cast(lat_smem.at[slot, tile][...], wgmma_layout)  # e4m3 [P, 128]
            scale = plgpu.layout_cast(scale_smem.at[slot][:, tile], wgmma_layout.reduce(1))
            x = codes.astype(jnp.float16).astype(jnp.float32)              # e4m3 -> f16 exactly
            x = x * lax.broadcast_in_dim(scale, x.shape, [0])
            x = jnp.where(lax.broadcast_in_dim(valid, x.shape, [0]), x, jnp.zeros_like(x))
            stage_smem.at[:, pl.ds(tile * FP8_TILE, FP8_TILE)][...] = x.astype(jnp.bfloat16)
        plgpu.commit_smem()                                             # read by wgmma next

    def page_step(step, carry):
        o_acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.int32(st.slots))
        plgpu.barrier_wait(k_bars.at[slot])
        if st.fp8:
            dequantize(slot, step)
            sync(1)                     # both halves staged
        s = scores(slot, step)
        if st.fp8:
            plgpu.barrier_arrive(consumed_bars.at[slot])               # the FP8 slot is read
            plgpu.barrier_arrive(x_bars.at[2])                          # S is done with the stage
        m_new, alpha, p = softmax_step(s, s.max(axis=1), m_i)
        row_sum = p.sum(axis=1)
        if st.pairs:                                                    # l is summed over both at the end
            row_sum = jnp.where(wg == 0, row_sum, jnp.zeros_like(row_sum))
        l_i = l_i * alpha + row_sum
        if not st.fp8:
            zero_tail(slot, step)
        p16 = p.astype(jnp.bfloat16)
        if st.ping_pong:
            sync(1)                     # softmax done; then the tensor cores are ours
        o_acc = times_v(o_acc, slot, alpha, p16)                        # P as the register LHS
        if st.fp8:
            plgpu.barrier_wait(x_bars.at[2])                            # the other's S is done too
        else:
            plgpu.barrier_arrive(consumed_bars.at[slot])
        return o_acc, m_new, l_i

    if not st.pairs:
        if st.ping_pong:
            pl.when(wg == 1)(lambda: sync(1))
        carry = lax.fori_loop(0, steps, page_step, (o_acc, m_i, l_i))
        if st.ping_pong:
            pl.when(wg == 0)(lambda: sync(1))
        return carry

    def pair_step(j, carry):
        o_acc, m_i, l_i = carry
        mine, slot_a, slot_b = 2 * j + wg, lax.rem(2 * j, st.slots), lax.rem(2 * j + 1, st.slots)
        my_slot = lax.rem(mine, st.slots)
        plgpu.barrier_wait(k_bars.at[my_slot])
        s = scores(my_slot, mine)
        stats_smem.at[wg][...] = s.max(axis=1)
        sync(1)
        s_max = jnp.maximum(_row_vector(stats_smem.at[0]), _row_vector(stats_smem.at[1]))
        m_new, alpha, p = softmax_step(s, s_max, m_i)
        l_i = l_i * alpha + p.sum(axis=1)
        plgpu.barrier_wait(k_bars.at[lax.rem(2 * j + 1 - wg, st.slots)])   # the other page
        for owner, slot, scale in ((0, slot_a, alpha), (1, slot_b, None)):
            @pl.when(wg == owner)
            def _():
                p_smem[...] = p.astype(jnp.bfloat16)
            plgpu.commit_smem()                                         # P is read by wgmma
            sync(2)
            o_acc = times_v(o_acc, slot, scale, p_smem)
            if owner == 0:
                sync(3)                                                 # both done with P of page 2j
                # ... and with page 2j's slot: the producer refills it (page 2j + 2) while page
                # 2j + 1's PV runs, rather than both slots only once the pair is done.
                plgpu.barrier_arrive(consumed_bars.at[slot_a])
        plgpu.barrier_arrive(consumed_bars.at[slot_b])
        return o_acc, m_new, l_i

    # 1 if the split ends mid-page (0 for an empty split: one past the last page also "ends"
    # past seqlen, and pairs = -1 would run the unpaired step on pages -2 and -1)
    partial = jnp.minimum(((first + steps) * PAGE > seqlen).astype(jnp.int32), steps)
    pairs = (steps - partial) // 2
    carry = lax.fori_loop(0, pairs, pair_step, (o_acc, m_i, l_i))
    o_acc, m_i, l_i = lax.fori_loop(2 * pairs, steps, page_step, carry)
    stats_smem.at[wg][...] = l_i                                        # l over both warpgroups' pages
    sync(1)
    return o_acc, m_i, _row_vector(stats_smem.at[0]) + _row_vector(stats_smem.at[1])


def _row_vector(ref):
    """A [64] SMEM vector as a per-row value of a WGMMA tile."""
    return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA.reduce(1))


def _write_back(wg, b, kvh, split, m_idx, o_acc, m_i, l_i, q_smem, lse_smem, o_gmem,
                lse_gmem):
    """Normalise this warpgroup's half and store it (via Q's SMEM chunks) with the lse."""
    per_wg = len(o_acc)
    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
    for c, o_c in enumerate(o_acc):                                    # [64, 64] each
        o = o_c / lax.broadcast_in_dim(l_safe, o_c.shape, [0])
        q_smem.at[wg * per_wg + c][...] = o.astype(jnp.bfloat16)

    @pl.when(wg == 0)
    def _():
        lse_smem[...] = (m_i + jnp.log2(l_i)) * math.log(2.0)        # -inf when empty

    plgpu.commit_smem()
    for c in range(per_wg):
        chunk = wg * per_wg + c
        plgpu.copy_smem_to_gmem(
            q_smem.at[chunk],
            o_gmem.at[b, kvh, split, pl.ds(m_idx * 64, 64), pl.ds(chunk * 64, 64)])

    @pl.when(wg == 0)
    def _():
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, kvh, split, pl.ds(m_idx * 64, 64)])

    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- 3. wrapper


def get_mla_metadata(
    cache_seqlens: Int[Array, "B"],
    num_q_heads_per_kv_head: int,
    num_kv_heads: int,
    num_sm_parts: int = NUM_SMS,
) -> tuple[Int[Array, "B S 2"], Int[Array, "B+1"]]:
    """Split-KV schedule: (tile_scheduler_metadata [B, S, 2], num_splits [B + 1]).

    `num_q_heads_per_kv_head` is s_q * h_q // h_kv, as in FlashMLA. The number of splits S is
    static (from the shapes): enough CTAs to fill `num_sm_parts` SMs given B, h_kv and the
    number of 64-row query tiles. Each sequence's pages are cut into S near-equal runs;
    metadata[b, s] = (first page, end page), and num_splits is the cumulative count of
    non-empty splits (FlashMLA's format).
    """
    if cache_seqlens.ndim != 1:
        raise ValueError(f"cache_seqlens must be [B], got {cache_seqlens.shape=}")
    batch = cache_seqlens.shape[0]
    m_tiles = pl.cdiv(num_q_heads_per_kv_head, 64)
    splits = max(1, num_sm_parts // (batch * num_kv_heads * m_tiles))
    n_pages = (cache_seqlens.astype(jnp.int32) + PAGE - 1) // PAGE       # [B]
    per = (n_pages + splits - 1) // splits                               # [B]
    starts = jnp.minimum(jnp.arange(splits, dtype=jnp.int32)[None] * per[:, None],
                         n_pages[:, None])                               # [B, S]
    ends = jnp.minimum(starts + per[:, None], n_pages[:, None])
    metadata = jnp.stack([starts, ends], axis=-1)                        # [B, S, 2]
    used = jnp.sum(ends > starts, axis=1, dtype=jnp.int32)
    num_splits = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(used, dtype=jnp.int32)])
    return metadata, num_splits


def _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Sq, Hq, D], got {q.shape=}")
    batch, s_q, h_q, d = q.shape
    if d != D_QK or head_dim_v != D_V:
        raise ValueError(f"head dims must be {D_QK=} and {D_V=}, got {d=} and {head_dim_v=}")
    if q.dtype != jnp.bfloat16:
        raise ValueError(f"q must be bfloat16, got {q.dtype=}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [N, P, Hkv, D], got {k_cache.shape=}")
    num_blocks, page, h_kv, d_k = k_cache.shape
    if page != PAGE:
        raise ValueError(f"page size {page=} must be {PAGE}")
    if k_cache.dtype == jnp.uint8:
        if d_k != FP8_TOKEN_BYTES:
            raise ValueError(f"an FP8 k_cache token must be {FP8_TOKEN_BYTES} bytes, got {d_k=}")
    elif k_cache.dtype == jnp.bfloat16:
        if d_k != D_QK:
            raise ValueError(f"k_cache head dim {d_k=} must equal q's {D_QK}")
    else:
        raise ValueError(f"k_cache must be bfloat16 or uint8 (FP8 layout), got {k_cache.dtype=}")
    if h_q % h_kv:
        raise ValueError(f"{h_q=} must be a multiple of {h_kv=}")
    if not 1 <= s_q <= 2:
        raise ValueError(f"{s_q=} must be 1 or 2 (decode, MTP)")
    if block_table.ndim != 2 or block_table.shape[0] != batch or block_table.dtype != jnp.int32:
        raise ValueError(f"block_table must be int32 [{batch}, M], got "
                         f"{block_table.dtype} {block_table.shape}")
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype != jnp.int32:
        raise ValueError(f"cache_seqlens must be int32 [{batch}], got "
                         f"{cache_seqlens.dtype} {cache_seqlens.shape}")
    seqlens, table = _concrete(cache_seqlens), _concrete(block_table)
    if seqlens is not None:                 # checkable only outside jit
        capacity = block_table.shape[1] * PAGE
        bad = (seqlens < 0) | (seqlens > capacity)
        if bad.any():
            worst = int(np.argmax(bad))
            raise ValueError(f"cache_seqlens[{worst}]={seqlens[worst]} is outside "
                             f"[0, {capacity}] (block_table holds {block_table.shape[1]} pages)")
    if seqlens is not None and table is not None:
        used = np.arange(table.shape[1])[None] < ((seqlens + PAGE - 1) // PAGE)[:, None]
        bad = used & ((table < 0) | (table >= num_blocks))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"block_table[{i}, {j}]={table[i, j]} is not a page of the "
                             f"cache ({num_blocks=})")


def _concrete(x):
    """x as a numpy array, or None under a jax transformation (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def flash_mla_with_kvcache(
    q: Shaped[Array, "B Sq Hq D"],
    k_cache: Shaped[Array, "N P Hkv Dk"],
    block_table: Int[Array, "B M"],
    cache_seqlens: Int[Array, "B"],
    head_dim_v: int = D_V,
    tile_scheduler_metadata: Int[Array, "B S 2"] | None = None,
    num_splits: Int[Array, "B+1"] | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    interpret: bool = False,
    config: TuningConfig = TuningConfig(),
) -> tuple[Float[Array, "B Sq Hq Dv"], Float[Array, "B Hq Sq"]]:
    """MLA decode attention over a paged cache: (out [B, Sq, Hq, 512] bf16, lse [B, Hq, Sq]).

    k_cache is bf16 [N, 64, Hkv, 576] or the FP8 layout uint8 [N, 64, Hkv, 656] written by
    `quantize_kv_cache_fp8`. V is the first 512 dims of K. With `causal` and Sq = 2, the first
    query position sees one cache token less than the second. A sequence with nothing to
    attend to gives out = 0 and lse = +inf. `num_splits` is accepted for FlashMLA's call
    signature; the split count is the metadata's second dimension.

    Shapes, dtypes and page size are checked always; seqlens beyond the block table and table
    entries outside the cache only when the arrays are concrete (outside jit). Under jit the
    schedule is clamped to the table, so a bad seqlen never reads past it.
    """
    del num_splits
    _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v)
    batch, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    if tile_scheduler_metadata is None:
        tile_scheduler_metadata, _ = get_mla_metadata(
            cache_seqlens, s_q * h_q // h_kv, h_kv, config.num_sm_parts)
    elif (tile_scheduler_metadata.ndim != 3 or tile_scheduler_metadata.shape[0] != batch
          or tile_scheduler_metadata.shape[2] != 2):
        raise ValueError(f"tile_scheduler_metadata must be [{batch}, S, 2], got "
                         f"{tile_scheduler_metadata.shape}")
    if softmax_scale is None:
        softmax_scale = D_QK ** -0.5
    if k_cache.dtype == jnp.uint8:
        k_cache, block_table = (_split_fp8_pages if config.dequantize_in_kernel else
                                _dequantized_pages)(k_cache, block_table)
    if interpret:
        # Here, outside `_flash_mla`'s jit: a cached trace of `_flash_mla` skips its body, and
        # the interpreter binds whatever wgmma callback is current when it lowers.
        _install_interpret_shims()
    return _flash_mla(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                      softmax_scale=float(softmax_scale), causal=bool(causal),
                      interpret=bool(interpret), config=config)


@functools.partial(jax.jit, static_argnames=["softmax_scale", "causal", "interpret", "config"])
def _flash_mla(q, k_cache, block_table, cache_seqlens, metadata, *, softmax_scale, causal,
               interpret, config):
    batch, s_q, h_q, _ = q.shape
    fp8 = isinstance(k_cache, tuple)                   # (latent e4m3, rope bf16, scales f32)
    k_views = k_cache if fp8 else (k_cache,)
    h_kv = k_views[0].shape[2]
    g = h_q // h_kv
    rows = s_q * g
    m_tiles = pl.cdiv(rows, config.block_m)
    splits = metadata.shape[1]
    # [B, Sq, Hq, D] -> [B, Hkv, R, D] with row r = (query position r // G, head r % G).
    q_rows = q.reshape(batch, s_q, h_kv, g, D_QK).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, h_kv, rows, D_QK)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, m_tiles * 64 - rows), (0, 0)))
    q_chunks = q_rows.reshape(batch, h_kv, m_tiles, 64, D_QK // 64, 64)
    q_chunks = q_chunks.transpose(0, 1, 2, 4, 3, 5)      # [B, Hkv, Rp / 64, D / 64, 64, 64]
    # Clamp the schedule to the table so that no CTA reads past it.
    n_table = block_table.shape[1]
    metadata = jnp.clip(metadata.astype(jnp.int32), 0, n_table)
    st = _Static(s_q=s_q, heads_per_kv=g, rows=rows, h_kv=h_kv, causal=causal,
                 scale_log2=softmax_scale * math.log2(math.e), slots=config.num_slots,
                 pairs=config.pair_pages, in_place=config.accumulate_in_place,
                 ping_pong=config.ping_pong, fp8=fp8)
    rp = m_tiles * 64
    kernel = plgpu.kernel(
        functools.partial(_kernel, st),
        out_type=(jax.ShapeDtypeStruct((batch, h_kv, splits, rp, D_V), jnp.bfloat16),
                  jax.ShapeDtypeStruct((batch, h_kv, splits, rp), jnp.float32)),
        grid=(m_tiles, splits, batch * h_kv),
        grid_names=("m", "split", "bh"),
        num_threads=3,
        thread_name="wg",
        # pair_pages needs 1 KiB of the 2 KiB that Pallas reserves by default for cross-warp
        # reductions; this kernel's reductions are over WGMMA rows, within a warp.
        compiler_params=plgpu.CompilerParams(
            approx_math=True, **(dict(reduction_scratch_bytes=1024) if config.pair_pages else {})),
        **_interpret_kwargs(interpret),
    )
    with _interpret_shims(interpret):
        o_part, lse_part = kernel(metadata, cache_seqlens, block_table, q_chunks, *k_views)
    out, lse = _combine(o_part, lse_part)                  # [B, Hkv, Rp, Dv], [B, Hkv, Rp]
    out = out[:, :, :rows].reshape(batch, h_kv, s_q, g, D_V).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :rows].reshape(batch, h_kv, s_q, g).transpose(0, 1, 3, 2)
    return out.reshape(batch, s_q, h_q, D_V).astype(q.dtype), lse.reshape(batch, h_q, s_q)


def _combine(o_part, lse_part):
    """lse-weighted merge of the splits: [B, Hkv, S, Rp, Dv], [B, Hkv, S, Rp] -> one split.

    An empty row (lse -inf in every split) gives out 0 and lse +inf. With one split (b=128,
    h_q=128 fills the SMs) the partial is the output: no f32 pass over it."""
    if o_part.shape[2] == 1:
        lse = lse_part[:, :, 0]
        return o_part[:, :, 0], jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    lse_max = jnp.max(lse_part, axis=2, keepdims=True)                  # [B, Hkv, 1, Rp]
    lse_max = jnp.where(jnp.isneginf(lse_max), 0.0, lse_max)
    w = jnp.exp(lse_part - lse_max)                                     # [B, Hkv, S, Rp]
    total = jnp.sum(w, axis=2)                                          # [B, Hkv, Rp]
    out = jnp.einsum("bhsr,bhsrd->bhrd", w, o_part.astype(jnp.float32))
    empty = total == 0.0
    out = jnp.where(empty[..., None], 0.0, out / jnp.where(empty, 1.0, total)[..., None])
    lse = jnp.where(empty, jnp.inf, jnp.log(jnp.where(empty, 1.0, total)) + lse_max[:, :, 0])
    return out, lse


# ----------------------------------------------------------------------------- FP8 cache


def quantize_kv_cache_fp8(k_cache: Shaped[Array, "N P Hkv 576"]) -> Shaped[Array, "N P Hkv 656"]:
    """bf16 [N, P, Hkv, 576] -> uint8 [N, P, Hkv, 656], FlashMLA's FP8 token layout.

    Bytes 0..511: the latent in e4m3, one scale per 128 values (scale = max(amax, 1e-4) / 448);
    bytes 512..527: the 4 scales as f32; bytes 528..655: the 64 rope values as bf16.
    """
    if k_cache.shape[-1] != D_QK:
        raise ValueError(f"k_cache head dim must be {D_QK}, got {k_cache.shape=}")
    lead = k_cache.shape[:-1]
    nope = k_cache[..., :D_V].astype(jnp.float32).reshape(*lead, D_V // FP8_TILE, FP8_TILE)
    scale = jnp.maximum(jnp.max(jnp.abs(nope), axis=-1), 1e-4) / 448.0   # [..., 4]
    codes = (nope / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(*lead, D_V)
    parts = [lax.bitcast_convert_type(codes, jnp.uint8),
             lax.bitcast_convert_type(scale, jnp.uint8).reshape(*lead, 16),
             lax.bitcast_convert_type(k_cache[..., D_V:].astype(jnp.bfloat16),
                                      jnp.uint8).reshape(*lead, 2 * D_ROPE)]
    return jnp.concatenate(parts, axis=-1)


def _table_pages(k_fp8: Shaped[Array, "N P Hkv 656"], block_table: Int[Array, "B M"]):
    """(pages, block table) for the kernel from an FP8 cache: the B x M pages the table names,
    renumbered 0 .. B*M-1, where that is fewer than the pool's N (a serving pool, with every
    layer's pages, holds far more: converting all of it per call cost O(pool)); else the whole
    pool and the table. Table entries past a sequence's pages are clamped; the kernel never
    reads them."""
    batch, width = block_table.shape
    if batch * width >= k_fp8.shape[0]:
        return k_fp8, block_table
    pages = jnp.clip(block_table, 0, k_fp8.shape[0] - 1).reshape(-1)
    return k_fp8[pages], jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width)


def _dequantized_pages(k_fp8: Shaped[Array, "N P Hkv 656"], block_table: Int[Array, "B M"]):
    """(bf16 pages, block table): `_table_pages`, dequantised."""
    pages, block_table = _table_pages(k_fp8, block_table)
    return dequantize_kv_cache_fp8(pages), block_table


def _split_fp8_pages(k_fp8: Shaped[Array, "N P Hkv 656"], block_table: Int[Array, "B M"]):
    """((latent e4m3 [n, P, Hkv, 512], rope bf16 [n, P, Hkv, 64], scales f32 [n, P, Hkv, 4]),
    block table) for `dequantize_in_kernel`: `_table_pages` split by field in one XLA pass (656
    bytes read and written a token; the kernel then reads 656).

    Why not the packed array itself: a Mosaic GPU copy moves one dtype (the 656 bytes hold
    three), and typed views of the one buffer would be no cheaper: XLA expands a bitcast that
    changes the element width into arithmetic over the whole array (BitcastDtypesExpander, seen
    in XLA:CPU's compiled HLO; the GPU pipeline runs the same pass)."""
    pages, block_table = _table_pages(k_fp8, block_table)
    codes, scales, rope = _fp8_fields(pages)
    return (codes, rope, scales), block_table


def _fp8_fields(k_fp8: Shaped[Array, "... 656"]):
    """The fields of FlashMLA's FP8 token: (codes e4m3 [..., 512], scales f32 [..., 4],
    rope bf16 [..., 64])."""
    lead = k_fp8.shape[:-1]
    codes = lax.bitcast_convert_type(k_fp8[..., :D_V], jnp.float8_e4m3fn)
    scales = lax.bitcast_convert_type(k_fp8[..., D_V:D_V + 16].reshape(*lead, 4, 4), jnp.float32)
    rope = lax.bitcast_convert_type(k_fp8[..., D_V + 16:].reshape(*lead, D_ROPE, 2), jnp.bfloat16)
    return codes, scales, rope


def dequantize_kv_cache_fp8(k_fp8: Shaped[Array, "N P Hkv 656"]) -> Float[Array, "N P Hkv 576"]:
    """uint8 [N, P, Hkv, 656] -> bf16 [N, P, Hkv, 576] (inverse of `quantize_kv_cache_fp8`)."""
    if k_fp8.dtype != jnp.uint8 or k_fp8.shape[-1] != FP8_TOKEN_BYTES:
        raise ValueError(f"expected uint8 [..., {FP8_TOKEN_BYTES}], got {k_fp8.dtype} {k_fp8.shape}")
    lead = k_fp8.shape[:-1]
    codes, scale, rope = _fp8_fields(k_fp8)
    nope = codes.astype(jnp.float32).reshape(*lead, 4, FP8_TILE) * scale[..., None]
    return jnp.concatenate([nope.reshape(*lead, D_V).astype(jnp.bfloat16), rope], axis=-1)


# ----------------------------------------------------------------------------- dispatch


def mla_decode(q, k_cache, block_table, cache_seqlens, *, softmax_scale=None, causal=False):
    """The serving engine's entry: the kernel on a GPU, `flash_mla_reference` elsewhere."""
    if jax.default_backend() == "gpu":
        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                      softmax_scale=softmax_scale, causal=causal)
    return flash_mla_reference(q, k_cache, block_table, cache_seqlens,
                               softmax_scale=softmax_scale, causal=causal)


# ------------------------------------------------------------------ interpret-mode helpers


def _interpret_kwargs(interpret: bool) -> dict:
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return {"interpret": InterpretGPUParams()}


@contextlib.contextmanager
def _interpret_shims(interpret: bool):
    """Interpreted runs: pallas_kernels/_interpret_shim.py's wgmma (transposed K^T view, P from
    registers) and the CPU layout_cast rule, (re)installed before the interpreter lowers."""
    if interpret:
        _install_interpret_shims()
    yield


def _install_interpret_shims():
    from pallas_kernels import _interpret_shim   # interpret-only: touches jax internals

    _interpret_shim.install()


# ----------------------------------------------------------------------------- 5. reference


def flash_mla_reference(
    q: Shaped[Array, "B Sq Hq D"],
    k_cache: Shaped[Array, "N P Hkv Dk"],
    block_table: Int[Array, "B M"],
    cache_seqlens: Int[Array, "B"],
    head_dim_v: int = D_V,
    softmax_scale: float | None = None,
    causal: bool = False,
    compute_dtype=jnp.float32,
) -> tuple[Float[Array, "B Sq Hq Dv"], Float[Array, "B Hq Sq"]]:
    """Plain jnp MLA decode over the paged cache; same contract as `flash_mla_with_kvcache`.

    Computes in `compute_dtype` (float64 for ground truth under jax_enable_x64); out is cast
    to q's dtype, lse stays in compute_dtype. Stale cache slots (even NaN) never leak.
    """
    batch, s_q, h_q, d = q.shape
    _, page, h_kv, _ = k_cache.shape
    g = h_q // h_kv
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    kv = k_cache[jnp.clip(block_table, 0, k_cache.shape[0] - 1)]          # [B, M, P, Hkv, Dk]
    if kv.dtype == jnp.uint8:                      # the sequences' pages only, not the whole pool
        kv = dequantize_kv_cache_fp8(kv)
    kv = kv.astype(compute_dtype)                                         # [B, M, P, Hkv, D]
    kv = kv.reshape(batch, -1, h_kv, d)                                   # [B, T, Hkv, D]
    t = jnp.arange(kv.shape[1])
    limit = cache_seqlens[:, None] - (s_q - 1 - jnp.arange(s_q))[None] if causal else \
        jnp.broadcast_to(cache_seqlens[:, None], (batch, s_q))            # [B, Sq]
    seen = t[None, None] < limit[..., None]                               # [B, Sq, T]
    kv = jnp.where((t[None] < cache_seqlens[:, None])[..., None, None], kv, 0.0)
    qg = q.astype(compute_dtype).reshape(batch, s_q, h_kv, g, d)
    s = jnp.einsum("bqhgd,bthd->bhgqt", qg, kv) * softmax_scale           # [B, Hkv, G, Sq, T]
    s = jnp.where(seen[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)                                # [B, Hkv, G, Sq, 1]
    empty = jnp.isneginf(m)                                               # nothing to attend to
    p = jnp.exp(s - jnp.where(empty, 0.0, m))                             # masked: exp(-inf) = 0
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgqt,bthv->bqhgv", p, kv[..., :head_dim_v])       # [B, Sq, Hkv, G, Dv], unnormalised
    scale = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, total))     # out = 0 for an empty sequence
    out = (out * jnp.moveaxis(scale[..., 0], 3, 1)[..., None]).reshape(batch, s_q, h_q, head_dim_v)
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, total)))[..., 0]
    return out.astype(q.dtype), lse.reshape(batch, h_q, s_q)
