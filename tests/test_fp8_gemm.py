"""FP8 GEMMs (pallas_kernels/fp8_gemm.py): interpreted kernels vs float64, errors, CUDA lowering.

Every kernel runs in the Mosaic GPU interpreter on CPU (a few tiles) and is compared with a
float64 product of the same quantised inputs (tight, elementwise) and with the unquantised
product (DeepGEMM's metric 1 - 2Σxy/Σ(x²+y²) < 1e-3). The same functions are then lowered
for CUDA with jax.export, which needs no GPU. Where a GPU exists the kernels also run compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_quant as fq
from cuda_lowering import lower_for_cuda

ON_GPU = fg.on_hopper()
INTERPRET = not ON_GPU
BF16_EPS = 2.0 ** -8          # relative rounding of a bf16 output
F32_ACC = 2.0 ** -20          # fp32 accumulation over a few hundred terms, relative to Σ|ab|


def calc_diff(x, y) -> float:
    """DeepGEMM's global metric 1 - 2Σxy/Σ(x²+y²), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def quantise(key, m, n, k, groups=None):
    """Random activations [.., m, k] and weights [.., n, k], quantised by the jnp references."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, ((groups,) if groups else ()) + (m, k), jnp.float32)
    w = jax.random.normal(kw, ((groups,) if groups else ()) + (n, k), jnp.float32)
    x = x * jnp.exp(jax.random.normal(kw, x.shape[:-1] + (1,)))  # rows of uneven magnitude
    cast_x = jax.vmap(fq.per_token_cast_to_fp8_reference) if groups else fq.per_token_cast_to_fp8_reference
    cast_w = jax.vmap(fq.per_block_cast_to_fp8_reference) if groups else fq.per_block_cast_to_fp8_reference
    return x, w, cast_x(x), cast_w(w)


def dequant64(q, s, block_rows: bool):
    q, s = np.asarray(q.astype(jnp.float32), np.float64), np.asarray(s, np.float64)
    s = np.repeat(s, 128, axis=-1)
    if block_rows:
        s = np.repeat(s, 128, axis=-2)
    return q * s


def check(out, ref64, absprod64, out_dtype, what):
    """Elementwise: |out - ref| <= rounding of the output + fp32 accumulation error."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all(), f"{what}: non-finite at {np.argwhere(~np.isfinite(out))[:4]}"
    rel = BF16_EPS if out_dtype == jnp.bfloat16 else 2.0 ** -23
    bound = rel * np.abs(ref64) + F32_ACC * absprod64 + 1e-30
    excess = np.abs(out - ref64) / bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 1.0, (
        f"{what}: worst {worst} out={out[worst]} ref={ref64[worst]} bound={bound[worst]}")
    return float(np.abs(out - ref64).max())


@pytest.mark.parametrize("out_dtype,config", [
    (jnp.bfloat16, None),                                        # heuristic: block_n 64, 6 stages
    (jnp.float32, fg.TuningConfig(block_m=128, block_n=128, max_concurrent_steps=2)),  # warp spec.
    (jnp.bfloat16, fg.TuningConfig(block_m=64, block_n=32, max_concurrent_steps=3)),   # narrow N tiles
    (jnp.bfloat16, fg.TuningConfig(block_m=64, block_n=16, max_concurrent_steps=3)),
    (jnp.bfloat16, fg.TuningConfig(block_m=64, block_n=64, max_concurrent_steps=2, split_k=3,
                                   grid_tile_m=1)),                 # 2 bands of 1 M tile, snaking
    (jnp.float32, fg.TuningConfig(block_m=128, block_n=128, max_concurrent_steps=2, split_k=3)),
])
def test_dense_matches_float64(out_dtype, config, report):
    m, n, k = 100, 256, 384                   # m pads to 128: two row tiles; 3 K steps
    x, w, (a, sa), (b, sb) = quantise(jax.random.key(0), m, n, k)
    out = fg.fp8_gemm_nt((a, sa), (b, sb), out_dtype=out_dtype, interpret=INTERPRET,
                         config=config)
    assert out.shape == (m, n) and out.dtype == out_dtype
    a64, b64 = dequant64(a, sa, False), dequant64(b, sb, True)
    err = check(out, a64 @ b64.T, np.abs(a64) @ np.abs(b64).T, out_dtype, "dense")
    diff = calc_diff(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T)
    assert diff < 1e-3, diff
    ref = fg.fp8_gemm_nt_reference((a, sa), (b, sb), out_dtype=jnp.float32)
    check(ref, a64 @ b64.T, np.abs(a64) @ np.abs(b64).T, jnp.float32, "reference")
    report(f"fp8_gemm_nt {m}x{n}x{k} {jnp.dtype(out_dtype).name} {config}: max|err| vs f64 dequant "
           f"{err:.3g}, calc_diff vs unquantised {diff:.2e}")


@pytest.mark.parametrize("n", [192, 200])
def test_dense_unaligned_n(n):
    """N % 128 != 0 (DeepGEMM's N=2112 is 16.5 blocks): 192 runs natively, 200 pads B."""
    m, k = 64, 256
    x, w, (a, sa), (b, sb) = quantise(jax.random.key(6), m, n, k)
    assert sb.shape == (2, 2)
    out = fg.fp8_gemm_nt((a, sa), (b, sb), out_dtype=jnp.float32, interpret=INTERPRET)
    assert out.shape == (m, n)
    a64 = dequant64(a, sa, False)
    b64 = np.asarray(b.astype(jnp.float32), np.float64) * np.repeat(np.repeat(
        np.asarray(sb, np.float64), 128, 0)[:n], 128, 1)
    check(out, a64 @ b64.T, np.abs(a64) @ np.abs(b64).T, jnp.float32, f"dense n={n}")
    assert calc_diff(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-3


def test_dense_ue8m0_scales():
    m, n, k = 64, 128, 256
    x = jax.random.normal(jax.random.key(1), (m, k))
    w = jax.random.normal(jax.random.key(2), (n, k))
    (a, sa), (b, sb) = fq.per_token_cast_to_fp8_reference(x, True), fq.per_block_cast_to_fp8_reference(w, True)
    out = fg.fp8_gemm_nt((a, sa), (b, sb), out_dtype=jnp.float32, interpret=INTERPRET)
    a64, b64 = dequant64(a, sa, False), dequant64(b, sb, True)
    check(out, a64 @ b64.T, np.abs(a64) @ np.abs(b64).T, jnp.float32, "dense ue8m0")
    assert calc_diff(out, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T) < 1e-3


def test_contiguous_uneven_empty_and_padded_groups(report):
    n, k, groups = 128, 256, 4
    # DeepGEMM layout: each group padded up to 128 rows with -1 rows.
    # group 0: 100 rows (+28 pad), group 1: empty, group 2: 64 (+64), group 3: 130 (+126).
    segments = [(0, 100, 128), (2, 64, 128), (3, 130, 256)]
    m_indices = np.concatenate([np.r_[np.full(real, g), np.full(aligned - real, -1)]
                                for g, real, aligned in segments]).astype(np.int32)
    m = len(m_indices)                    # 512 rows: 4 row tiles of 128 (warp specialized)
    x, w, (a, sa), (b, sb) = quantise(jax.random.key(3), m, n, k)
    _, w3, _, (b3, sb3) = quantise(jax.random.key(4), 1, n, k, groups=groups)
    # Launch order in bands of 3 M tiles: one full band and a partial one, over 2 N tiles.
    config = fg.TuningConfig(block_n=64, max_concurrent_steps=3, grid_tile_m=3)
    out = fg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b3, sb3), jnp.asarray(m_indices),
                                              out_dtype=jnp.float32, interpret=INTERPRET,
                                              config=config)
    a64 = dequant64(a, sa, False)
    b64 = dequant64(b3, sb3, True)                             # [G, N, K]
    g = np.maximum(m_indices, 0)
    ref = np.einsum("mk,mnk->mn", a64, b64[g]) * (m_indices >= 0)[:, None]
    absprod = np.einsum("mk,mnk->mn", np.abs(a64), np.abs(b64[g]))
    err = check(out, ref, absprod, jnp.float32, "contiguous")
    assert (np.asarray(out)[m_indices < 0] == 0).all()
    valid = m_indices >= 0
    unq = np.einsum("mk,mnk->mn", np.asarray(x, np.float64), np.asarray(w3, np.float64)[g])
    diff = calc_diff(np.asarray(out)[valid], unq[valid])
    assert diff < 1e-3, diff
    out_ref = fg.m_grouped_fp8_gemm_nt_contiguous_reference((a, sa), (b3, sb3), jnp.asarray(m_indices),
                                                            out_dtype=jnp.float32)
    check(out_ref, ref, absprod, jnp.float32, "contiguous reference")
    report(f"m_grouped_contiguous m={m} n={n} k={k} G={groups}: max|err| {err:.3g}, calc_diff {diff:.2e}")


def test_masked_rows(report):
    groups, m_max, n, k = 3, 96, 128, 256                      # m_max pads to 128
    masked_m = np.array([70, 0, 5], np.int32)
    x, w, (a, sa), (b, sb) = quantise(jax.random.key(5), m_max, n, k, groups=groups)
    a = a.at[:, 80:].set(jnp.nan)                              # rows past masked_m must not leak
    out = fg.m_grouped_fp8_gemm_nt_masked((a, sa), (b, sb), jnp.asarray(masked_m), expected_m=64,
                                          out_dtype=jnp.float32, interpret=INTERPRET)
    assert out.shape == (groups, m_max, n)
    a64, b64 = dequant64(a, sa, False), dequant64(b, sb, True)
    rows = np.arange(m_max)[None, :, None] < masked_m[:, None, None]
    a64 = np.where(np.isnan(a64), 0, a64)
    ref = np.einsum("gmk,gnk->gmn", a64, b64) * rows
    absprod = np.einsum("gmk,gnk->gmn", np.abs(a64), np.abs(b64))
    err = check(out, ref, absprod, jnp.float32, "masked")
    unq = np.einsum("gmk,gnk->gmn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    diff = calc_diff(np.asarray(out)[rows[..., 0]], unq[rows[..., 0]])
    assert diff < 1e-3, diff
    out_ref = fg.m_grouped_fp8_gemm_nt_masked_reference((a, sa), (b, sb), jnp.asarray(masked_m), 64,
                                                        out_dtype=jnp.float32)
    check(jnp.where(rows, out_ref, 0), ref, absprod, jnp.float32, "masked reference")
    report(f"m_grouped_masked G={groups} m_max={m_max} masked={masked_m.tolist()}: "
           f"max|err| {err:.3g}, calc_diff {diff:.2e}")


def _small():
    (a, sa) = fq.per_token_cast_to_fp8_reference(jnp.ones((64, 256)))
    (b, sb) = fq.per_block_cast_to_fp8_reference(jnp.ones((128, 256)))
    return a, sa, b, sb


def test_errors():
    a, sa, b, sb = _small()
    with pytest.raises(ValueError, match="must be a multiple of 128"):
        fg.fp8_gemm_nt((a[:, :200], sa), (b[:, :200], sb))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fg.fp8_gemm_nt((a.astype(jnp.bfloat16), sa), (b, sb))
    with pytest.raises(ValueError, match="sa.shape"):
        fg.fp8_gemm_nt((a, sa[:, :1]), (b, sb))
    with pytest.raises(ValueError, match="sb.shape"):
        fg.fp8_gemm_nt((a, sa), (b, sb[:, :1]))
    with pytest.raises(ValueError, match="contracting"):
        fg.fp8_gemm_nt((a, sa), (b[:, :128], sb[:, :1]))
    b3, sb3 = b[None], sb[None]
    mixed = jnp.r_[jnp.zeros(32, jnp.int32), jnp.ones(32, jnp.int32)]  # two groups in one tile
    with pytest.raises(ValueError, match="m_indices"):
        fg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b3, sb3), mixed)
    with pytest.raises(ValueError, match="m_indices"):
        fg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b3, sb3), jnp.full(64, 3, jnp.int32))
    with pytest.raises(ValueError, match="groups differ"):
        fg.m_grouped_fp8_gemm_nt_masked((a[None], sa[None]), (b3, sb3), jnp.array([1, 2]), 1)
    with pytest.raises(ValueError, match="must be 64 or 128"):
        fg.TuningConfig(block_m=256)
    with pytest.raises(ValueError, match="16, 32, 64 or 128"):
        fg.TuningConfig(block_n=256)
    with pytest.raises(ValueError, match="divisor of 128"):
        fg.TuningConfig(block_n=48)
    with pytest.raises(ValueError, match="split_k"):
        fg.TuningConfig(split_k=0)
    with pytest.raises(ValueError, match="grid_tile_m"):
        fg.TuningConfig(grid_tile_m=0)
    with pytest.raises(ValueError, match="must divide K/128 = 2"):   # K = 256
        fg.fp8_gemm_nt((a, sa), (b, sb), config=fg.TuningConfig(block_m=64, split_k=3))
    with pytest.raises(ValueError, match="split-K is fp8_gemm_nt's"):
        fg.m_grouped_fp8_gemm_nt_masked((a[None], sa[None]), (b3, sb3), jnp.array([1]), 1,
                                        config=fg.TuningConfig(split_k=2))
    with pytest.raises(ValueError, match="split-K is fp8_gemm_nt's"):
        fg.m_grouped_fp8_gemm_nt_contiguous((a, sa), (b3, sb3), jnp.zeros(64, jnp.int32),
                                            config=fg.TuningConfig(split_k=2))


@pytest.mark.parametrize("m,n,k,split", [
    (64, 2112, 7168, 4),      # DeepGEMM's shape: 33 tiles of 64 x 64 -> 132 CTAs of 14 K steps
    (64, 7168, 16384, 1),     # 112 tiles: most SMs busy already
    (4096, 7168, 16384, 1),
    (64, 128, 7168, 7),       # 2 tiles: up to 66 splits fit, but 8 steps each allow 7 at most
])
def test_split_k_heuristic(m, n, k, split):
    config = fg._dense_config(m, n, k)
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    kb = k // 128
    assert config.split_k == split
    assert kb % split == 0 and (split == 1 or tiles * split <= fg.NUM_SMS)
    assert split == 1 or kb // split >= fg.MIN_SPLIT_STEPS


def test_contiguous_misaligned_under_jit_is_nan_not_wrong():
    a, sa, b, sb = _small()
    mixed = jnp.r_[jnp.zeros(32, jnp.int32), jnp.ones(32, jnp.int32)]
    b2, sb2 = jnp.stack([b, b]), jnp.stack([sb, sb])
    out = jax.jit(lambda i: fg.m_grouped_fp8_gemm_nt_contiguous(
        (a, sa), (b2, sb2), i, interpret=INTERPRET))(mixed)
    assert np.isnan(np.asarray(out, np.float32)).all()


def test_dispatch_uses_reference_off_gpu():
    a, sa, b, sb = _small()
    out = fg.fp8_gemm_nt_auto((a, sa), (b, sb))
    np.testing.assert_array_equal(out, fg.fp8_gemm_nt_reference((a, sa), (b, sb)))
    mi = jnp.zeros(64, jnp.int32)
    out = fg.m_grouped_fp8_gemm_nt_contiguous_auto((a, sa), (b[None], sb[None]), mi)
    assert out.shape == (64, 128)
    out = fg.m_grouped_fp8_gemm_nt_masked_auto((a[None], sa[None]), (b[None], sb[None]),
                                                jnp.array([3]), 3)
    assert out.shape == (1, 64, 128) and (np.asarray(out[0, 3:], np.float32) == 0).all()


VARIANTS = {
    "dense": lambda a, sa, b, sb: fg.fp8_gemm_nt((a, sa), (b, sb)),
    "dense_warp_specialized": lambda a, sa, b, sb: fg.fp8_gemm_nt((a, sa), (b, sb),
                                                                  config=fg.TuningConfig()),
    "dense_64x128": lambda a, sa, b, sb: fg.fp8_gemm_nt(
        (a, sa), (b, sb), config=fg.TuningConfig(block_m=64, block_n=128)),
    "dense_64x16": lambda a, sa, b, sb: fg.fp8_gemm_nt(
        (a, sa), (b, sb), config=fg.TuningConfig(block_m=64, block_n=16, max_concurrent_steps=6)),
    "dense_64x32": lambda a, sa, b, sb: fg.fp8_gemm_nt(
        (a, sa), (b, sb), config=fg.TuningConfig(block_m=64, block_n=32, max_concurrent_steps=6)),
    "dense_split_k": lambda a, sa, b, sb: fg.fp8_gemm_nt(
        (a, sa), (b, sb), config=fg.TuningConfig(block_m=64, block_n=64, split_k=2)),
    "dense_warp_specialized_split_k": lambda a, sa, b, sb: fg.fp8_gemm_nt(
        (a, sa), (b, sb), config=fg.TuningConfig(block_m=128, block_n=128, split_k=4)),
    "dense_f32_padded_m": lambda a, sa, b, sb: fg.fp8_gemm_nt((a[:40], sa[:40]), (b, sb),
                                                              out_dtype=jnp.float32),
    "contiguous": lambda a, sa, b, sb: fg.m_grouped_fp8_gemm_nt_contiguous(
        (a, sa), (jnp.stack([b, b]), jnp.stack([sb, sb])), jnp.r_[jnp.zeros(64, jnp.int32),
                                                                jnp.ones(64, jnp.int32)]),
    "contiguous_warp_specialized": lambda a, sa, b, sb: fg.m_grouped_fp8_gemm_nt_contiguous(
        (jnp.tile(a, (2, 1)), jnp.tile(sa, (2, 1))), (jnp.stack([b, b]), jnp.stack([sb, sb])),
        jnp.repeat(jnp.arange(2, dtype=jnp.int32), 128)),
    "masked_warp_specialized": lambda a, sa, b, sb: fg.m_grouped_fp8_gemm_nt_masked(
        (a[None], sa[None]), (b[None], sb[None]), jnp.array([100], jnp.int32), expected_m=100,
        config=fg.TuningConfig()),
    "masked": lambda a, sa, b, sb: fg.m_grouped_fp8_gemm_nt_masked(
        (a.reshape(2, 64, -1), sa.reshape(2, 64, -1)), (jnp.stack([b, b]), jnp.stack([sb, sb])),
        jnp.array([64, 3], jnp.int32), expected_m=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lowers_for_cuda(variant):
    (a, sa) = fq.per_token_cast_to_fp8_reference(jnp.ones((128, 512)))
    (b, sb) = fq.per_block_cast_to_fp8_reference(jnp.ones((256, 512)))
    assert "mosaic_gpu" in lower_for_cuda(VARIANTS[variant], a, sa, b, sb)


def test_benchmark_entries_dry_run(report):
    """Each registered DeepGEMM entry: dry inputs, kernel (interpreted) vs reference, baselines run."""
    import benchmarks.entries_deep_gemm  # noqa: F401  (registers on import)
    from benchmarks import registry
    entries = [e for e in registry._ENTRIES.values() if e.name.startswith("deep_gemm")]
    # DeepGEMM's 7 published shapes with XLA baselines, plus tuning-sweep entries without.
    assert len([e for e in entries if e.baselines]) == 7 and all(e.peak == "fp8" for e in entries)
    for entry in entries:
        args = entry.make_inputs(True)
        assert entry.flops(*args) > 0 and entry.bytes(*args) > 0
        if not entry.baselines:   # tuning sweeps: the same dry case as their shape's entry
            continue
        err = entry.error(entry.kernel(*args, interpret=INTERPRET), entry.reference(*args))
        assert err < entry.tolerance, (entry.name, err)
        for name, baseline in entry.baselines.items():
            err_b = entry.error(baseline(*args), entry.reference(*args))
            assert np.isfinite(err_b), (entry.name, name)
        report(f"dry {entry.name}: calc_diff kernel vs reference {err:.2e}")
