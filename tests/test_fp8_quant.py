"""FP8 quantisers and the interpret-mode shim (pallas_kernels/fp8_quant.py, _interpret_shim.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _interpret_shim
from pallas_kernels import fp8_quant as fq
from pallas_kernels.fp8_gemm import on_hopper
from cuda_lowering import lower_for_cuda

INTERPRET = not on_hopper()
E4M3_REL = 2.0 ** -4          # e4m3 rounding (3 mantissa bits), relative to the element


def _bits_equal(x, y):
    return np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_token_matches_reference_and_bounds(ue8m0):
    x = jax.random.normal(jax.random.key(0), (100, 256)) * jnp.exp(
        3 * jax.random.normal(jax.random.key(1), (100, 1)))
    x = x.at[3, :128].set(0.0).astype(jnp.bfloat16)            # an all-zero tile: floor scale
    q, s = fq.per_token_cast_to_fp8(x, ue8m0=ue8m0, interpret=INTERPRET)
    q_ref, s_ref = fq.per_token_cast_to_fp8_reference(x, ue8m0=ue8m0)
    assert q.shape == (100, 256) and s.shape == (100, 2) and q.dtype == jnp.float8_e4m3fn
    assert _bits_equal(q, q_ref) and np.array_equal(s, s_ref)
    assert float(s[3, 0]) == pytest.approx(1e-4 / 448 if not ue8m0 else 2.0 ** -22)
    x64 = np.asarray(x, np.float64)
    deq = np.asarray(q.astype(jnp.float32), np.float64) * np.repeat(np.asarray(s), 128, 1)
    assert (np.abs(deq - x64) <= E4M3_REL * np.abs(x64) + 2.0 ** -9 * np.repeat(np.asarray(s), 128, 1)).all()
    if ue8m0:
        mant, _ = np.frexp(np.asarray(s))
        assert (mant == 0.5).all()                             # powers of two


@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_block_matches_reference(ue8m0):
    w = jax.random.normal(jax.random.key(2), (256, 384)) * jnp.exp(
        jax.random.normal(jax.random.key(3), (256, 1)))
    q, s = fq.per_block_cast_to_fp8(w, ue8m0=ue8m0, interpret=INTERPRET)
    q_ref, s_ref = fq.per_block_cast_to_fp8_reference(w, ue8m0=ue8m0)
    assert s.shape == (2, 3)
    assert _bits_equal(q, q_ref) and np.array_equal(s, s_ref)
    amax = np.abs(np.asarray(w)).reshape(2, 128, 3, 128).max(axis=(1, 3))
    if not ue8m0:
        np.testing.assert_allclose(np.asarray(s), amax / 448, rtol=1e-6)
    else:
        assert (np.asarray(s) >= amax / 448).all() and (np.asarray(s) < 2 * amax / 448).all()


def test_quant_errors():
    with pytest.raises(ValueError, match="multiple of 128"):
        fq.per_token_cast_to_fp8(jnp.ones((4, 100)))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        fq.per_block_cast_to_fp8(jnp.ones((128, 128), jnp.int32))


def test_per_block_partial_last_block():
    """N = 200: the last block row has 72 rows; its scale comes from them alone."""
    w = jax.random.normal(jax.random.key(4), (200, 256))
    q, s = fq.per_block_cast_to_fp8(w, interpret=INTERPRET)
    q_ref, s_ref = fq.per_block_cast_to_fp8_reference(w)
    assert q.shape == (200, 256) and s.shape == (2, 2)
    assert _bits_equal(q, q_ref) and np.array_equal(s, s_ref)
    np.testing.assert_allclose(np.asarray(s[1, 0]), np.abs(np.asarray(w)[128:, :128]).max() / 448,
                               rtol=1e-6)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_lowers_for_cuda(ue8m0):
    x = jnp.ones((128, 256), jnp.bfloat16)
    for fn in (fq.per_token_cast_to_fp8, fq.per_block_cast_to_fp8):
        assert "mosaic_gpu" in lower_for_cuda(functools.partial(fn, ue8m0=ue8m0), x)


# --- the interpret-mode shim ------------------------------------------------------------

def test_apply_views_reads_through_transposes():
    """Indexers before the transpose select what is read; later ones slice the transposed view."""
    from jax._src.state import indexing
    from jax._src.state.types import TransposeTransform
    buf = np.arange(4 * 6 * 8).reshape(4, 6, 8)
    head = indexing.NDIndexer.from_indices_shape((2, slice(0, 6), slice(0, 8)), buf.shape)
    tail = indexing.NDIndexer.from_indices_shape((slice(1, 5), slice(2, 4)), (8, 6))
    # The interpreter hands callbacks transforms with concrete ints, as here.
    transforms = jax.tree.map(int, (head, TransposeTransform((1, 0)), tail))
    got = _interpret_shim.apply_views(lambda rng: buf[rng], transforms)
    np.testing.assert_array_equal(got, buf[2].T[1:5, 2:4])


def _wgmma_kernel(transpose: bool, dtype, interpret):
    """acc = A·B for one 64x128x128 tile; B is stored [N, K] and viewed transposed if asked."""
    def body(a_gmem, b_gmem, o_gmem):
        def scope(a_smem, b_smem, barrier):
            plgpu.copy_gmem_to_smem(a_gmem, a_smem, barrier)
            plgpu.barrier_wait(barrier)
            plgpu.copy_gmem_to_smem(b_gmem, b_smem, barrier)
            plgpu.barrier_wait(barrier)

            def mma(acc_ref):
                b_view = plgpu.transpose_ref(b_smem, (1, 0)) if transpose else b_smem
                plgpu.wgmma(acc_ref, a_smem, b_view)
                return acc_ref[...]

            o_gmem[...] = pl.run_scoped(mma, plgpu.ACC((64, 128), jnp.float32))

        swizzle = 128
        elems = swizzle // jnp.dtype(dtype).itemsize
        tr = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
        pl.run_scoped(scope, plgpu.SMEM((64, 128), dtype, transforms=tr),
                      plgpu.SMEM((128, 128), dtype, transforms=tr), plgpu.Barrier(num_arrivals=1))

    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 128), jnp.float32),
                        compiler_params=plgpu.CompilerParams(
                            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=InterpretGPUParams() if interpret else None)


@pytest.mark.parametrize("transpose,dtype", [(True, jnp.float8_e4m3fn), (False, jnp.bfloat16)])
def test_shim_wgmma_transposed_and_plain(transpose, dtype):
    """The interpreted kernel with a transposed (K-major) B equals A·B; plain B is unchanged."""
    _interpret_shim.install()
    assert _interpret_shim.installed()
    a = jax.random.normal(jax.random.key(0), (64, 128)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (128, 128)).astype(dtype)   # [N, K] if transposed
    out = _wgmma_kernel(transpose, dtype, interpret=True)(a, b)
    a64, b64 = np.asarray(a.astype(jnp.float32), np.float64), np.asarray(b.astype(jnp.float32), np.float64)
    ref = a64 @ (b64.T if transpose else b64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)
    if transpose:  # the very same kernel lowers for CUDA
        exported = jax.export.export(jax.jit(_wgmma_kernel(transpose, dtype, interpret=False)),
                                     platforms=["cuda"])(a, b)
        assert "mosaic_gpu" in exported.mlir_module()


def test_unpatched_interpreter_fails_on_the_transposed_view():
    """Why the shim exists: without it the same kernel fails in the interpreter."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
        reset_gpu_interpret_mode_state)
    if _interpret_shim._ORIGINAL_WGMMA.__module__ != gpu_callbacks.__name__:
        pytest.skip("another module's wgmma wrapper was installed before ours was imported")
    _interpret_shim.install()
    a = jnp.ones((64, 128), jnp.float8_e4m3fn)
    b = jnp.ones((128, 128), jnp.float8_e4m3fn)
    gpu_callbacks.wgmma = _interpret_shim._ORIGINAL_WGMMA
    try:
        with pytest.raises(Exception, match="TransposeTransform"):
            jax.block_until_ready(_wgmma_kernel(True, jnp.float8_e4m3fn, interpret=True)(a, b))
    finally:
        reset_gpu_interpret_mode_state()
        _interpret_shim.install()
    assert _interpret_shim.installed()
    out = _wgmma_kernel(True, jnp.float8_e4m3fn, interpret=True)(a, b)
    np.testing.assert_array_equal(np.asarray(out), 128.0)


def _accumulate_kernel(steps: int, interpret: bool):
    """o = 1 + Σ_i (P_i + A_i)·B_i over `steps` [64, 64] tiles, accumulated in place with
    pl.run_state(...)(plgpu.ACC.init(o)), as FlashMLA's and mla_attention's O += P·V are: a
    producer warpgroup streams A_i and B_i through a 2-slot ring; each of two consumer
    warpgroups adds P_i·B_i (P_i = i + 1 + wg, in registers: run_state hoists it into a ref) and
    A_i·B_i (A_i from SMEM) to its own accumulator, then releases the slot."""
    def body(a_gmem, b_gmem, o_gmem):
        wg = lax.axis_index("wg")

        def scope(a_smem, b_smem, o_smem, loaded, consumed):
            @pl.when(wg == 2)
            def _producer():
                @pl.loop(0, steps)
                def _(i):
                    slot = lax.rem(i, 2)

                    @pl.when(i >= 2)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])
                    plgpu.copy_gmem_to_smem(a_gmem.at[i], a_smem.at[slot], loaded.at[slot])
                    plgpu.copy_gmem_to_smem(b_gmem.at[i], b_smem.at[slot], loaded.at[slot])

                @pl.loop(max(steps - 2, 0), steps)
                def _(i):
                    plgpu.barrier_wait(consumed.at[lax.rem(i, 2)])

            @pl.when(wg < 2)
            def _consumers():
                def step(i, o):
                    slot = lax.rem(i, 2)
                    plgpu.barrier_wait(loaded.at[slot])
                    p = plgpu.layout_cast(jnp.full((64, 64), 1.0, jnp.bfloat16), plgpu.Layout.WGMMA)
                    p = p * (i + 1 + wg).astype(jnp.bfloat16)

                    def mma(acc_ref):
                        plgpu.wgmma(acc_ref, p, b_smem.at[slot])
                        plgpu.wgmma(acc_ref, a_smem.at[slot], b_smem.at[slot])

                    o = pl.run_state(mma)(plgpu.ACC.init(o))
                    plgpu.barrier_arrive(consumed.at[slot])
                    return o

                o0 = plgpu.layout_cast(jnp.full((64, 64), 1.0, jnp.float32), plgpu.Layout.WGMMA)
                o_smem.at[wg][...] = lax.fori_loop(0, steps, step, o0)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[wg])
                plgpu.wait_smem_to_gmem(0)

        tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(scope, plgpu.SMEM((2, 64, 64), jnp.bfloat16, transforms=tr),
                      plgpu.SMEM((2, 64, 64), jnp.bfloat16, transforms=tr),
                      plgpu.SMEM((2, 64, 64), jnp.float32),
                      plgpu.Barrier(num_arrivals=2, num_barriers=2),
                      plgpu.Barrier(num_arrivals=2, num_barriers=2), collective_axes="wg")

    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((2, 64, 64), jnp.float32),
                        num_threads=3, thread_name="wg",
                        interpret=InterpretGPUParams() if interpret else None)


def test_shim_runs_run_state_accumulators_in_place():
    """The interpreter has no run_state; with the shim the kernel equals its float64 sum, and the
    very same kernel lowers for CUDA."""
    _interpret_shim.install()
    steps = 5
    a = jax.random.normal(jax.random.key(0), (steps, 64, 64)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (steps, 64, 64)).astype(jnp.bfloat16)
    out = np.asarray(_accumulate_kernel(steps, interpret=True)(a, b))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for wg in range(2):
        want = 1 + sum((i + 1 + wg + a64[i]) @ b64[i] for i in range(steps))
        np.testing.assert_allclose(out[wg], want, rtol=1e-5, atol=1e-3)
    assert "mosaic_gpu" in lower_for_cuda(_accumulate_kernel(steps, interpret=False), a, b)


def test_unpatched_interpreter_has_no_run_state():
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
        reset_gpu_interpret_mode_state)
    _interpret_shim.install()
    a = jnp.ones((2, 64, 64), jnp.bfloat16)
    jaxpr_interpret.JaxprInterpreter.interpret = _interpret_shim._ORIGINAL_INTERPRET
    try:
        with pytest.raises(Exception, match="run_state"):
            jax.block_until_ready(_accumulate_kernel(2, interpret=True)(a, a))
    finally:
        reset_gpu_interpret_mode_state()
        _interpret_shim.install()
    assert _interpret_shim.installed()
