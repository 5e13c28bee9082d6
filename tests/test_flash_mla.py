"""FlashMLA kernel: interpreted on CPU against a float64 numpy ground truth, lowered for CUDA.

FlashMLA's own checks: cosine diff < 1e-5 on out and lse, unused cache slots filled with NaN,
shuffled block tables, empty sequences give out = 0 and lse = +inf.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_mla as fm
from cuda_lowering import lower_for_cuda

COS_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seqlens: tuple[int, ...]
    s_q: int
    h_q: int
    causal: bool
    fp8: bool = False
    num_sm_parts: int = 4        # few simulated SMs: a handful of CTAs, 2 splits for b = 2
    pairs: bool = False          # TuningConfig.pair_pages
    in_place: bool = True        # TuningConfig.accumulate_in_place
    ping_pong: bool = False      # TuningConfig.ping_pong
    in_kernel: bool = False      # TuningConfig.dequantize_in_kernel (with fp8)

    def config(self) -> fm.TuningConfig:
        return fm.TuningConfig(num_sm_parts=self.num_sm_parts, pair_pages=self.pairs,
                               accumulate_in_place=self.in_place, ping_pong=self.ping_pong,
                               dequantize_in_kernel=self.in_kernel)


CASES = [
    Case("varlen_empty_sq1_h16", (100, 0, 37), s_q=1, h_q=16, causal=False, num_sm_parts=6),
    Case("causal_sq2_h64", (65, 130), s_q=2, h_q=64, causal=True, num_sm_parts=4),
    Case("fp8_sq1_h16", (70, 128), s_q=1, h_q=16, causal=False, fp8=True, num_sm_parts=4),
    # page pairs: even and odd page counts per split, an empty sequence, a partial last page
    # (which runs unpaired) and a sequence of whole pages only (128), s_q = 2 causal
    Case("pairs_varlen_empty_sq1_h16", (300, 0, 37, 128), s_q=1, h_q=16, causal=False, num_sm_parts=6,
         pairs=True),
    # three splits a sequence: 200 pairs its first two (full) pages in one split, its second
    # split ends mid-page, its third is empty (as is 65's). One 64-row tile (h_q 16; the
    # default's cases cover a second tile): half the CTAs to interpret of h_q 64.
    Case("pairs_causal_sq2_h16", (65, 200), s_q=2, h_q=16, causal=True, num_sm_parts=6, pairs=True),
    # the ping-pong schedule: two splits a sequence (130's first holds two pages), empty splits
    # (the empty sequence: the warpgroups still meet equally often), causal s_q = 2, partial
    # last pages
    Case("ping_pong_causal_sq2_h16", (130, 0, 65), s_q=2, h_q=16, causal=True, num_sm_parts=6,
         ping_pong=True),
    # The FP8 cache read and dequantised by the kernel itself: two splits (the second ends
    # mid-page), an empty sequence (empty splits), causal s_q = 2. The unused slots' 0xFF bytes
    # are NaN codes, NaN scales and NaN rope values in the FP8 slots.
    Case("fp8_in_kernel_causal_sq2_h16", (65, 0), s_q=2, h_q=16, causal=True, fp8=True,
         num_sm_parts=4, in_kernel=True),
    # O += P V into a fresh accumulator per chunk (the suite's A/B against the in-place default)
    Case("fresh_acc_causal_sq2_h16", (130, 0, 70), s_q=2, h_q=16, causal=True, num_sm_parts=4,
         in_place=False),
]


def make_case(case: Case, seed: int = 0):
    """Inputs with a shuffled block table and NaN in every unused cache slot."""
    rng = np.random.default_rng(seed)
    batch = len(case.seqlens)
    max_pages = max(1, max(-(-s // fm.PAGE) for s in case.seqlens))
    num_blocks = batch * max_pages + 2
    q = rng.standard_normal((batch, case.s_q, case.h_q, fm.D_QK)).astype(np.float32)
    k = rng.standard_normal((num_blocks, fm.PAGE, 1, fm.D_QK)).astype(np.float32)
    table = rng.permutation(num_blocks)[: batch * max_pages].reshape(batch, max_pages)
    k_bf16 = jnp.asarray(k, jnp.bfloat16)
    if case.fp8:
        cache = fm.quantize_kv_cache_fp8(k_bf16)
        values = np.asarray(fm.dequantize_kv_cache_fp8(cache), np.float64)
    else:
        cache, values = k_bf16, np.asarray(k_bf16, np.float64)
    # Fill every slot no sequence owns with NaN (for FP8: NaN scales and rope bytes).
    used = np.zeros((num_blocks, fm.PAGE), bool)
    for i, s in enumerate(case.seqlens):
        for t in range(s):
            used[table[i, t // fm.PAGE], t % fm.PAGE] = True
    cache = np.asarray(cache).copy()
    if case.fp8:
        cache[~used] = 0xFF                       # e4m3 NaN, f32 NaN scales, bf16 NaN rope
    else:
        cache[~used] = np.nan
    args = (jnp.asarray(q, jnp.bfloat16), jnp.asarray(cache), jnp.asarray(table, jnp.int32),
            jnp.asarray(case.seqlens, jnp.int32))
    return args, values, table


def ground_truth(q, values, table, seqlens, causal):
    """float64 numpy, loop over sequences: (out [B, Sq, Hq, 512], lse [B, Hq, Sq])."""
    q = np.asarray(q.astype(jnp.float32), np.float64)
    batch, s_q, h_q, d = q.shape
    out = np.zeros((batch, s_q, h_q, fm.D_V))
    lse = np.full((batch, h_q, s_q), np.inf)
    for i, seqlen in enumerate(np.asarray(seqlens)):
        kv = values[table[i]].reshape(-1, d)[:seqlen]                 # [T, D]
        for j in range(s_q):
            n = seqlen - (s_q - 1 - j) if causal else seqlen
            if n <= 0:
                continue
            s = q[i, j] @ kv[:n].T * d ** -0.5                        # [Hq, n]
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            out[i, j] = (p / p.sum(1, keepdims=True)) @ kv[:n, : fm.D_V]
            lse[i, :, j] = (m[:, 0] + np.log(p.sum(1)))
    return out, lse


def cos_diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - 2.0 * (x * y).sum() / max((x * x + y * y).sum(), 1e-12)


def check(name, out, lse, out_gt, lse_gt):
    out, lse = np.asarray(out.astype(jnp.float32), np.float64), np.asarray(lse, np.float64)
    assert not np.isnan(out).any(), f"{name}: NaN in out at {np.argwhere(np.isnan(out))[0]}"
    inf_gt, inf = np.isinf(lse_gt), np.isinf(lse)
    assert (inf == inf_gt).all() and (lse[inf] > 0).all(), \
        f"{name}: lse inf positions differ, first at {np.argwhere(inf != inf_gt)[:1]}"
    empty = np.broadcast_to(np.moveaxis(inf_gt, 2, 1)[..., None], out.shape)
    assert (out[empty] == 0).all(), f"{name}: empty rows must give out = 0"
    d_out, d_lse = cos_diff(out, out_gt), cos_diff(lse[~inf], lse_gt[~inf])
    worst = np.unravel_index(np.argmax(np.abs(out - out_gt)), out.shape)
    assert d_out < COS_TOL and d_lse < COS_TOL, \
        f"{name}: cos diff out {d_out:.2e} lse {d_lse:.2e} (worst out element at {worst})"
    return d_out, d_lse


def run_kernel(case, args, interpret=True):
    return fm.flash_mla_with_kvcache(*args, causal=case.causal, interpret=interpret,
                                     config=case.config())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_interpreted_vs_float64(case, report):
    args, values, table = make_case(case)
    out_gt, lse_gt = ground_truth(args[0], values, table, args[3], case.causal)
    d_out, d_lse = check(case.name, *run_kernel(case, args), out_gt, lse_gt)
    r_out, r_lse = check(case.name + " reference",
                         *fm.flash_mla_reference(*args, causal=case.causal), out_gt, lse_gt)
    report(f"flash_mla {case.name}: kernel (interpreted) cos diff out {d_out:.1e} "
           f"lse {d_lse:.1e}; jnp reference out {r_out:.1e} lse {r_lse:.1e}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_lowers_for_cuda(case):
    args, _, _ = make_case(case)
    config = case.config()
    fn = lambda *a: fm.flash_mla_with_kvcache(*a, causal=case.causal, config=config)
    assert "mosaic_gpu" in lower_for_cuda(fn, *args)


@pytest.mark.parametrize("variant", ["default", "pair_pages", "ping_pong", "fp8_in_kernel"])
@pytest.mark.parametrize("s_q", [1, 2])
def test_benchmark_shapes_lower_for_cuda(s_q, variant):
    """FlashMLA's benchmark shape (b = 128, s_k = 32768, h_q = 128) with 132 SMs, abstractly."""
    b, pages = 128, 32768 // fm.PAGE
    fp8 = variant == "fp8_in_kernel"
    args = (jax.ShapeDtypeStruct((b, s_q, 128, fm.D_QK), jnp.bfloat16),
            jax.ShapeDtypeStruct((b * pages, fm.PAGE, 1, fm.FP8_TOKEN_BYTES if fp8 else fm.D_QK),
                                 jnp.uint8 if fp8 else jnp.bfloat16),
            jax.ShapeDtypeStruct((b, pages), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))
    config = fm.TuningConfig(pair_pages=variant == "pair_pages", ping_pong=variant == "ping_pong",
                             dequantize_in_kernel=fp8)
    fn = lambda *a: fm.flash_mla_with_kvcache(*a, causal=s_q > 1, config=config)
    assert "mosaic_gpu" in lower_for_cuda(fn, *args)


def test_metadata_splits_cover_every_page():
    seqlens = jnp.array([0, 1, 64, 65, 1000], jnp.int32)
    # 128 rows per latent head = 2 m-tiles; 20 SMs / (5 sequences x 2 tiles) = 2 splits.
    meta, num_splits = fm.get_mla_metadata(seqlens, 128, 1, num_sm_parts=20)
    meta = np.asarray(meta)
    assert meta.shape == (5, 2, 2)
    for i, s in enumerate(np.asarray(seqlens)):
        pages = np.concatenate([np.arange(a, e) for a, e in meta[i]])
        np.testing.assert_array_equal(pages, np.arange(-(-s // 64)))
    np.testing.assert_array_equal(num_splits, [0, 0, 1, 2, 4, 6])


def test_fp8_round_trip():
    k = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 1, 576)).astype(jnp.bfloat16)
    packed = fm.quantize_kv_cache_fp8(k)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 64, 1, 656)
    back = fm.dequantize_kv_cache_fp8(packed)
    np.testing.assert_array_equal(back[..., 512:], k[..., 512:])     # rope kept in bf16
    rel = jnp.linalg.norm((back - k)[..., :512].astype(jnp.float32)) / jnp.linalg.norm(
        k[..., :512].astype(jnp.float32))
    assert rel < 0.05, rel                                           # e4m3: 3 mantissa bits


def _dequantised_pages(fn, *args, dtype=jnp.bfloat16, width=fm.D_QK) -> int:
    """The most bf16 cache pages ([..., P, Hkv, 576] values; or of `dtype` and `width`) any one
    array in fn's jaxpr holds."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                aval = var.aval
                if getattr(aval, "dtype", None) == dtype and aval.shape[-3:] == (fm.PAGE, 1, width):
                    yield aval.size // (fm.PAGE * width)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr), default=0)


@pytest.mark.parametrize("path", ["kernel", "reference", "in_kernel"])
def test_fp8_cache_dequantises_the_sequences_pages_not_the_pool(path):
    """A serving pool holds every layer's pages; the FP8 path dequantises (with
    dequantize_in_kernel: splits by field) only the B x M pages the block table names (here
    2 x 3 of a 512-page pool), so its cost does not grow with the pool."""
    b, width, pool = 2, 3, 512
    args = (jnp.zeros((b, 1, 16, fm.D_QK), jnp.bfloat16),
            jnp.zeros((pool, fm.PAGE, 1, fm.FP8_TOKEN_BYTES), jnp.uint8),
            jnp.zeros((b, width), jnp.int32), jnp.array([100, 150], jnp.int32))
    fn = fm.flash_mla_with_kvcache if path != "reference" else fm.flash_mla_reference
    count = _dequantised_pages
    if path == "in_kernel":
        fn = functools.partial(fn, config=fm.TuningConfig(dequantize_in_kernel=True))
        count = functools.partial(_dequantised_pages, dtype=jnp.float8_e4m3fn, width=fm.D_V)
        assert _dequantised_pages(fn, *args) == 0          # no bf16 pages outside the kernel
    assert count(fn, *args) == b * width
    if path != "reference":                    # a pool smaller than B x M: the pool, once
        small = (args[0], args[1][: b * width - 1], *args[2:])
        assert count(fn, *small) == b * width - 1


def test_dispatch_uses_reference_on_cpu():
    args, _, _ = make_case(CASES[0])
    out, lse = fm.mla_decode(*args)
    ref_out, ref_lse = fm.flash_mla_reference(*args)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(lse, ref_lse)


def _small():
    q = jnp.zeros((2, 1, 16, 576), jnp.bfloat16)
    k = jnp.zeros((4, 64, 1, 576), jnp.bfloat16)
    return q, k, jnp.zeros((2, 2), jnp.int32), jnp.array([10, 128], jnp.int32)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, t, s: (q.astype(jnp.float32), k, t, s), "q must be bfloat16"),
    (lambda q, k, t, s: (q[..., :512], k, t, s), "head dims"),
    (lambda q, k, t, s: (jnp.zeros((2, 3, 16, 576), jnp.bfloat16), k, t, s), "s_q=3"),
    (lambda q, k, t, s: (q, k[:, :32], t, s), "page size"),
    (lambda q, k, t, s: (q, k.astype(jnp.float32), t, s), "k_cache must be bfloat16"),
    (lambda q, k, t, s: (q, jnp.zeros((4, 64, 1, 600), jnp.uint8), t, s), "656 bytes"),
    (lambda q, k, t, s: (q, jnp.zeros((4, 64, 3, 576), jnp.bfloat16), t, s), "multiple of h_kv"),
    (lambda q, k, t, s: (q, k, t.astype(jnp.int16), s), "block_table must be int32"),
    (lambda q, k, t, s: (q, k, t, s[:1]), "cache_seqlens must be int32"),
    (lambda q, k, t, s: (q, k, t, jnp.array([10, 129], jnp.int32)), "outside"),
    (lambda q, k, t, s: (q, k, t.at[1, 1].set(7), s), "not a page"),
])
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        fm.flash_mla_with_kvcache(*change(*_small()), interpret=True)


def test_tuning_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="block_m"):
        fm.TuningConfig(block_m=128)
    with pytest.raises(ValueError, match="num_slots"):
        fm.TuningConfig(num_slots=3)
    with pytest.raises(ValueError, match="pair_pages needs num_slots=2"):
        fm.TuningConfig(num_slots=1, pair_pages=True)
    with pytest.raises(ValueError, match="set one of them"):
        fm.TuningConfig(pair_pages=True, ping_pong=True)
    for other in (dict(pair_pages=True), dict(ping_pong=True)):
        with pytest.raises(ValueError, match="dequantize_in_kernel runs the default schedule"):
            fm.TuningConfig(dequantize_in_kernel=True, **other)


def test_benchmark_entries_cover_flash_mla_shapes():
    from benchmarks import entries_flash_mla
    from benchmarks.registry import _ENTRIES

    mine = [e for e in _ENTRIES.values() if e.name.startswith("flash_mla")]
    assert len(mine) == len(entries_flash_mla.ENTRIES)
    # FlashMLA's benchmark shapes, each beside the XLA reference; then the FP8 cache and tuning sweeps
    shapes = {e.name for e in mine if e.baselines and "fp8" not in e.name}
    assert shapes == {f"flash_mla b=128 s_k={s_k} h_q=128 s_q={s_q}"
                      for s_k in (4096, 8192, 16384, 32768) for s_q in (1, 2)}
    checked = set()
    for entry in mine:      # the kernel itself: test_gpu_suite's dry run of every entry interprets it
        args = entry.make_inputs(True)
        assert entry.flops(*args) > 0 and entry.bytes(*args) > 0
        key = tuple(a.shape for a in args)
        if key in checked:       # dry shapes depend only on s_q
            continue
        checked.add(key)
        for baseline in entry.baselines.values():
            assert entry.error(baseline(*args), entry.reference(*args)) < entry.tolerance


def test_interpret_shim_transposed_and_register_operands():
    """The interpreter shim against numpy: C = A B^T (B as a transposed SMEM view), then
    C2 = bf16(C) B (A from registers); the same kernel also lowers for CUDA."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(a_gmem, b_gmem, c_gmem, c2_gmem):
        def scoped(a_smem, b_smem, c_smem, bar):
            plgpu.copy_gmem_to_smem(a_gmem, a_smem, bar.at[0])
            plgpu.copy_gmem_to_smem(b_gmem, b_smem, bar.at[1])
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])

            def abt(acc):
                plgpu.wgmma(acc, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
                return acc[...]

            c = pl.run_scoped(abt, plgpu.ACC((64, 64), jnp.float32))

            def cb(acc):
                plgpu.wgmma(acc, c.astype(jnp.bfloat16), b_smem)
                return acc[...]

            c2 = pl.run_scoped(cb, plgpu.ACC((64, 64), jnp.float32))
            for out, gmem in ((c, c_gmem), (c2, c2_gmem)):
                c_smem[...] = out
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(c_smem, gmem)
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((64, 64), jnp.bfloat16, transforms=transforms),
                      plgpu.SMEM((64, 64), jnp.bfloat16, transforms=transforms),
                      plgpu.SMEM((64, 64), jnp.float32), plgpu.Barrier(num_barriers=2))

    def call(a, b, interpret):
        out = jax.ShapeDtypeStruct((64, 64), jnp.float32)
        kernel = plgpu.kernel(body, out_type=(out, out), **fm._interpret_kwargs(interpret))
        with fm._interpret_shims(interpret):
            return kernel(a, b)

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (64, 64), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (64, 64), jnp.float32).astype(jnp.bfloat16)
    c, c2 = jax.jit(functools.partial(call, interpret=True))(a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(c, a64 @ b64.T, rtol=1e-5, atol=1e-4)
    c_bf16 = np.asarray(jnp.asarray(c).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(c2, c_bf16 @ b64, rtol=1e-5, atol=1e-3)
    jax.export.export(jax.jit(functools.partial(call, interpret=False)),
                      platforms=["cuda"])(a, b)


# Pages per CTA 5, 3, 0 and 3 in one split: the ring's fill, refill and drain all run.
RING = Case("ring_steps_5_3_0_3", (320, 130, 0, 187), s_q=1, h_q=16, causal=False,
            num_sm_parts=1)


def test_interpret_shim_reinstalled_after_the_wgmma_callback_is_swapped():
    """Regression: a long pytest run hung in tests/test_gpu_suite.py's flash_mla dry entry.

    tests/test_fp8_quant.py swaps `gpu_callbacks.wgmma` (to the unpatched callback, then to
    _interpret_shim's transpose-only wrapper). flash_mla installed its wrapper only while
    tracing `_flash_mla`, which a cached trace skips, so the interpreter bound a callback that
    cannot read PV's register LHS: both consumer threads raised and the producer waited forever
    on a consumed-slot barrier. The wrapper must be back in place when the interpreter lowers.
    """
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from pallas_kernels import _interpret_shim

    args, values, table = make_case(RING)
    fn = lambda *a: run_kernel(RING, a)
    jax.jit(fn).lower(*args)                           # `_flash_mla` traced (and cached)
    saved = gpu_callbacks.wgmma
    gpu_callbacks.wgmma = _interpret_shim._ORIGINAL_WGMMA   # unpatched: no transposes, no register LHS
    try:
        lowered = jax.jit(lambda *a: fn(*a)).lower(*args)  # new outer jit, cached inner trace
        assert gpu_callbacks.wgmma is _interpret_shim._wgmma, \
            "the interpreter's wgmma shim was not reinstalled (executing would hang)"
        out, lse = lowered.compile()(*args)
    finally:
        if gpu_callbacks.wgmma is not _interpret_shim._wgmma:
            gpu_callbacks.wgmma = saved
    check(RING.name, out, lse, *ground_truth(args[0], values, table, args[3], RING.causal))


@pytest.mark.parametrize("variant", ["default", "pair_pages", "ping_pong", "fp8_in_kernel"])
def test_barrier_protocol_under_random_delays(monkeypatch, variant):
    """Every barrier wait has its arrivals in any interleaving: random sleeps around the
    interpreter's barrier arrive/wait (TMA completions arrive through the same method) must
    neither hang nor trip its phase checks. A hang here is caught by a watchdog. With
    pair_pages the two consumers also exchange row maxima and P through SMEM every pair; with
    fp8_in_kernel they meet twice a page around the shared staging page, and each FP8 page
    arrives by six copies on one barrier."""
    import random
    import threading
    import time

    from jax._src.pallas.mosaic_gpu.interpret import shared_memory

    rng = random.Random(0)
    wait, arrive = shared_memory.Barrier.wait, shared_memory.Barrier.arrive

    def jitter():
        time.sleep(rng.random() * 0.003)

    def slow_wait(self, *a, **k):
        jitter()
        result = wait(self, *a, **k)
        jitter()
        return result

    def slow_arrive(self, *a, **k):
        jitter()
        return arrive(self, *a, **k)

    monkeypatch.setattr(shared_memory.Barrier, "wait", slow_wait)
    monkeypatch.setattr(shared_memory.Barrier, "arrive", slow_arrive)
    ring = dataclasses.replace(RING, pairs=variant == "pair_pages", ping_pong=variant == "ping_pong",
                               fp8=variant == "fp8_in_kernel", in_kernel=variant == "fp8_in_kernel")
    args, values, table = make_case(ring)
    result = []
    worker = threading.Thread(target=lambda: result.append(jax.block_until_ready(run_kernel(ring, args))), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "interpreted kernel hung under barrier delays"
    assert result, "interpreted kernel raised (see the captured output)"
    check(ring.name + " delayed", *result[0],
          *ground_truth(args[0], values, table, args[3], ring.causal))
