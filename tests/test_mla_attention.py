"""MLA training/prefill attention: the Pallas kernels interpreted on CPU against float64 ground
truth (forward and dq, dk, dv), the jnp reference's own checks, and lowering for CUDA.

Ground truth is `mla_attention_reference` in float64 (jax_enable_x64 inside the test) and its
autodiff, cross-checked against an independent numpy loop for the forward.
"""

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mla_attention as ma
from cuda_lowering import lower_for_cuda

# Interpreted kernels need more XLA:CPU pool threads than simulated warpgroups: conftest.py sets NPROC.

# Relative L2 error bounds, per input dtype. bf16 kernels round q, k, v, P, dS and the outputs
# to bf16 (8 bits of mantissa, unit roundoff 2^-9 = 2e-3): a few roundoffs over whole tensors.
# The float32 reference only accumulates float32 rounding.
TOL = {"bfloat16": 1e-2, "float32": 1e-5}
WATCHDOG_S = 300       # an exception in an interpreted kernel's thread can hang it


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seq: int
    heads: int
    d_qk: int
    d_v: int
    causal: bool
    segments: tuple[int, ...] | None    # start position of every segment after the first
    block_kv: int = 64
    slots: int = 2             # SMEM ring depth, forward and backward


CASES = [
    Case("v3_dims_causal", seq=128, heads=1, d_qk=192, d_v=128, causal=True, segments=None),
    Case("segments_noncausal", seq=128, heads=1, d_qk=128, d_v=64, causal=False,
         segments=(40, 90)),
    # Two CTAs of 128 rows: the second query CTA's segment starts at 128, so the forward and dQ
    # skip kv tiles 0-1, and dK/dV of keys 0..127 skip q tiles 2-3; the boundary at 100 is
    # masked inside a tile. One ring slot: every step after the first refills it.
    Case("segments_causal_skip", seq=256, heads=1, d_qk=64, d_v=64, causal=True,
         segments=(100, 128), slots=1),
]


def make_inputs(case, batch=1, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, case.seq, case.heads, case.d_qk), jnp.float32)
    k = jax.random.normal(kk, (batch, case.seq, case.heads, case.d_qk), jnp.float32)
    v = jax.random.normal(kv, (batch, case.seq, case.heads, case.d_v), jnp.float32)
    do = jax.random.normal(kd, (batch, case.seq, case.heads, case.d_v), jnp.float32)
    seg = None
    if case.segments is not None:
        pos = np.arange(case.seq)
        seg = jnp.asarray(np.broadcast_to(sum(pos >= s for s in case.segments), (batch, case.seq))
                          .astype(np.int32) + 3)
    return tuple(x.astype(dtype) for x in (q, k, v, do)), seg


def float64_truth(q, k, v, do, seg, causal):
    """(out, (dq, dk, dv)) of the float64 reference at the given (rounded) inputs."""
    with jax.enable_x64(True):
        up = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do)]
        fn = functools.partial(ma.mla_attention_reference, causal=causal, segment_ids=seg,
                               compute_dtype=jnp.float64)
        out, vjp = jax.vjp(fn, *up[:3])
        grads = vjp(up[3])
        return np.asarray(out), tuple(np.asarray(g) for g in grads)


def numpy_attention(q, k, v, seg, causal):
    """Independent float64 loop over batch and heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, heads, d = q.shape
    out = np.zeros(v.shape)
    seg = np.zeros((batch, seq)) if seg is None else np.asarray(seg)
    for b in range(batch):
        allowed = seg[b][:, None] == seg[b][None, :]
        if causal:
            allowed &= np.tri(seq, dtype=bool)
        for h in range(heads):
            s = np.where(allowed, q[b, :, h] @ k[b, :, h].T * d ** -0.5, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, :, h] = (p / p.sum(axis=1, keepdims=True)) @ v[b, :, h]
    return out


def rel_err(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{name}: non-finite value at {np.argwhere(bad)[0]}"
    worst = np.unravel_index(np.argmax(np.abs(got - want)), got.shape)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return err, worst


def check(name, got, want, dtype):
    err, worst = rel_err(name, got, want)
    tol = TOL[jnp.dtype(dtype).name]
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} (worst element at {worst})"
    return err


def run_with_watchdog(fn):
    """fn() in a thread; a hang fails the test instead of the run."""
    result = []
    worker = threading.Thread(target=lambda: result.append(jax.block_until_ready(fn())),
                              daemon=True)
    worker.start()
    worker.join(timeout=WATCHDOG_S)
    assert not worker.is_alive(), "interpreted kernel hung"
    assert result, "interpreted kernel raised (see the captured output)"
    return result[0]


def kernel_fn(case, seg):
    config = ma.TuningConfig(block_kv=case.block_kv, num_slots=case.slots, bwd_slots=case.slots)
    return functools.partial(ma.mla_attention, causal=case.causal, segment_ids=seg,
                             interpret=True, config=config)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernels_interpreted_vs_float64(case, report):
    (q, k, v, do), seg = make_inputs(case)
    out_gt, grads_gt = float64_truth(q, k, v, do, seg, case.causal)
    np.testing.assert_allclose(out_gt, numpy_attention(q, k, v, seg, case.causal),
                               rtol=1e-9, atol=1e-12)
    fn = kernel_fn(case, seg)

    def forward_and_backward():
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

    out, grads = run_with_watchdog(forward_and_backward)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    errs = [check(f"{case.name} out", out, out_gt, q.dtype)]
    for g_name, g, g_gt in zip(("dq", "dk", "dv"), grads, grads_gt):
        errs.append(check(f"{case.name} {g_name}", g, g_gt, q.dtype))
    report(f"mla_attention {case.name}: interpreted kernels vs float64, relative L2 error "
           + ", ".join(f"{n} {e:.1e}" for n, e in zip(("out", "dq", "dk", "dv"), errs)))


def test_forward_default_block_kv_interpreted():
    """The GPU default block_kv=128 (S tiles of 64 x 128, K^T views of 64 x 128)."""
    case = dataclasses.replace(CASES[0], block_kv=128)
    (q, k, v, _), seg = make_inputs(case)
    out_gt = numpy_attention(q, k, v, seg, case.causal)
    out = run_with_watchdog(lambda: kernel_fn(case, seg)(q, k, v))
    check("block_kv=128 out", out, out_gt, q.dtype)


@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: c.name)
def test_reference_float32_and_its_autodiff(case):
    """The CPU path (implementation 'xla') in float32 against float64: forward and gradients.
    (The float64 reference itself is checked against a numpy loop in every interpreted case.)"""
    (q, k, v, do), seg = make_inputs(case, batch=2, dtype=jnp.float32)
    out_gt, grads_gt = float64_truth(q, k, v, do, seg, case.causal)
    fn = functools.partial(ma.mla_attention, causal=case.causal, segment_ids=seg)
    out, vjp = jax.vjp(fn, q, k, v)               # CPU backend: dispatches to the reference
    check(f"{case.name} reference out", out, out_gt, jnp.float32)
    for g_name, g, g_gt in zip(("dq", "dk", "dv"), vjp(do), grads_gt):
        check(f"{case.name} reference {g_name}", g, g_gt, jnp.float32)


def test_causality_and_segments_through_gradients():
    """d out[t] / d k[s] is zero exactly when s is after t or in another segment."""
    case = CASES[2]
    (q, k, v, _), seg = make_inputs(case, dtype=jnp.float32)
    t = 160
    fn = lambda k: ma.mla_attention(q, k, v, causal=True, segment_ids=seg)[0, t].sum()
    dk = np.abs(np.asarray(jax.grad(fn)(k))[0]).sum(axis=(1, 2))      # [T]
    seen = np.arange(case.seq) <= t
    seen &= np.asarray(seg[0]) == np.asarray(seg[0, t])
    assert (dk[~seen] == 0).all() and (dk[seen] > 0).all()


def test_tile_ranges_skip_masked_tiles():
    seg = jnp.asarray(np.repeat([[0, 1]], 128, axis=1).astype(np.int32))   # [1, 256]: 2 docs
    q_rng = np.asarray(ma._tile_ranges(seg, True, 128, 64, keys_as_rows=False))[0]
    np.testing.assert_array_equal(q_rng, [[0, 2], [2, 4]])     # 2nd doc skips keys 0..127
    k_rng = np.asarray(ma._tile_ranges(seg, True, 128, 64, keys_as_rows=True))[0]
    np.testing.assert_array_equal(k_rng, [[0, 2], [2, 4]])
    causal = np.asarray(ma._tile_ranges(jnp.zeros((1, 256), jnp.int32), True, 128, 64,
                                        keys_as_rows=False))[0]
    np.testing.assert_array_equal(causal, [[0, 2], [0, 4]])
    keys = np.asarray(ma._tile_ranges(jnp.zeros((1, 256), jnp.int32), True, 128, 64,
                                      keys_as_rows=True))[0]
    np.testing.assert_array_equal(keys, [[0, 4], [2, 4]])


@pytest.mark.parametrize("segments", [False, True])
def test_v3_shapes_lower_for_cuda(segments):
    """Forward and backward at DeepSeek-V3's shapes (T=4096, H=128), default tuning."""
    q = jax.ShapeDtypeStruct((1, 4096, 128, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 4096, 128, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

    def loss(q, k, v, seg):
        out = ma.mla_attention(q, k, v, causal=True, segment_ids=seg if segments else None,
                               implementation="pallas")
        return out.astype(jnp.float32).sum()

    module = lower_for_cuda(lambda *a: ma.mla_attention(*a[:3], segment_ids=a[3] if segments else None,
                                                        implementation="pallas"), q, q, v, seg)
    assert module.count("mosaic_gpu") >= 1
    module = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, q, v, seg)
    assert module.count("mosaic_gpu") >= 3          # forward, dq and dk/dv kernels


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_test_cases_lower_for_cuda(case):
    (q, k, v, _), seg = make_inputs(case)
    config = ma.TuningConfig(block_kv=case.block_kv, num_slots=case.slots, bwd_slots=case.slots)
    loss = lambda q, k, v: ma.mla_attention(q, k, v, causal=case.causal, segment_ids=seg,
                                            implementation="pallas", config=config).sum()
    assert lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v).count("mosaic_gpu") >= 3


def test_dispatch_uses_reference_on_cpu():
    (q, k, v, _), seg = make_inputs(CASES[1])
    np.testing.assert_array_equal(
        ma.mla_attention(q, k, v, segment_ids=seg),
        ma.mla_attention_reference(q, k, v, segment_ids=seg))


def _small():
    q = jnp.zeros((1, 128, 2, 192), jnp.bfloat16)
    return q, q, jnp.zeros((1, 128, 2, 128), jnp.bfloat16)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q.astype(jnp.float32), k, v), "bfloat16 q"),
    (lambda q, k, v: (q, k, v.astype(jnp.float16)), "bfloat16 v"),
    (lambda q, k, v: (q[..., :96], k[..., :96], v), "d_qk=96"),
    (lambda q, k, v: (q, k, jnp.zeros((1, 128, 2, 320), jnp.bfloat16)), "d_v=320"),
    (lambda q, k, v: (q[:, :64], k[:, :64], v[:, :64]), "multiple of 128"),
    (lambda q, k, v: (q, k[:, :, :1], v), "k must have q's shape"),
    (lambda q, k, v: (q, k, v[:, :64]), "v must be"),
    (lambda q, k, v: (q[0], k, v), r"\[B, T, H, D\]"),
])
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        ma.mla_attention(*change(*_small()), implementation="pallas")


def test_bad_options_raise():
    q, k, v = _small()
    with pytest.raises(ValueError, match="segment_ids"):
        ma.mla_attention(q, k, v, segment_ids=jnp.zeros((1, 64), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        ma.mla_attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="block_kv"):
        ma.TuningConfig(block_kv=32)
    with pytest.raises(ValueError, match="bwd_block"):
        ma.TuningConfig(bwd_block=128)


def test_benchmark_entries_dry_run():
    """Baselines and FLOP counts of every entry on its dry inputs. The kernels' dry cases run
    interpreted in tests/test_gpu_suite.py (the suite's --dry-run over every entry)."""
    from benchmarks import entries_mla_attention
    from benchmarks.registry import ENTRY_MODULES, _ENTRIES

    assert "benchmarks.entries_mla_attention" in ENTRY_MODULES
    mine = [e for e in _ENTRIES.values() if e.name.startswith("mla_attention")]
    assert len(mine) == len(entries_mla_attention.ENTRIES) == 3
    for entry in mine:
        args = entry.make_inputs(True)
        assert entry.flops(*args) > 0 and entry.bytes(*args) > 0
        want = entry.reference(*args)
        for name, baseline in entry.baselines.items():
            assert entry.error(baseline(*args), want) < entry.tolerance, (entry.name, name)


def test_flop_counts():
    """Causal pairs: T (T + 1) / 2 per head, or the sum over documents with segment ids."""
    from benchmarks import entries_mla_attention as em

    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    v = jnp.zeros((1, 8, 2, 32), jnp.bfloat16)
    assert em._flops(False, q, q, v) == 2 * 2 * 36 * (64 + 32)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
    assert em._flops(True, q, q, v, v, seg) == 2 * 2 * (6 + 15) * (4 * 64 + 3 * 32)
