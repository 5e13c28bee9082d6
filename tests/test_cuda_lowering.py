"""The TMA alignment check of tests/cuda_lowering.py catches the fault the H200 found, and only it."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import fp8_gemm as fg
from cuda_lowering import lower_for_cuda, tma_alignment

M, N, K = 64, 2112, 7168      # DeepGEMM's shape whose B-scale rows faulted (17 scales a row)
ARGS = (jax.ShapeDtypeStruct((M, K), fg.FP8), jax.ShapeDtypeStruct((M, K // 128), jnp.float32),
        jax.ShapeDtypeStruct((N, K), fg.FP8), jax.ShapeDtypeStruct((-(-N // 128), K // 128), jnp.float32))
CONFIGS = [fg.TuningConfig(block_m=64, block_n=64, max_concurrent_steps=6),
           fg.TuningConfig(block_m=128, block_n=64, max_concurrent_steps=3)]


def gemm(config):
    return lambda a, sa, b, sb: fg.fp8_gemm_nt((a, sa), (b, sb), config=config)


@pytest.mark.parametrize("config", CONFIGS, ids=["one_warpgroup", "warp_specialized"])
def test_the_b_scale_rows_that_faulted_on_the_h200_are_caught(config, monkeypatch):
    """Before 61b8294 the B-scale rows were padded to 16 bytes (17 -> 20 floats, 80 bytes a stage):
    it lowered, passed the interpreter, and faulted with CUDA_ERROR_MISALIGNED_ADDRESS on the GPU."""
    assert "mosaic_gpu" in lower_for_cuda(gemm(config), *ARGS)     # today's 128-byte rows pass
    monkeypatch.setattr(fg, "_scales_for_tma",
                        lambda sb: fg._pad_rows(jnp.swapaxes(sb, -1, -2), sb.ndim - 1, 4))
    jax.clear_caches()                          # fp8_gemm_nt's jitted trace holds today's padding
    try:
        with tma_alignment() as copies:
            jax.export.export(jax.jit(gemm(config)), platforms=["cuda"])(*ARGS)
        bad = [c for c in copies if not c.ok]
        assert bad and all(c.smem_type.startswith("memref<1x20xf32") for c in bad)
        assert {c.alignment for c in bad} <= {16, 32, 64} and {c.required for c in bad} == {128}
        with pytest.raises(AssertionError, match=r"1x20xf32.*aligned to 16 B, TMA needs 128 B"):
            lower_for_cuda(gemm(config), *ARGS)
    finally:                                    # no later test may meet the 16-byte trace
        monkeypatch.undo()
        jax.clear_caches()


def test_swizzled_tiles_need_the_swizzle_atom_and_are_found():
    """Every A and B stage is a 128-byte-swizzled tile and needs 1024-byte alignment: all of them
    are seen (6 stages of A and of B in the prologue and in the loop), and they hold."""
    with tma_alignment() as copies:
        jax.export.export(jax.jit(gemm(CONFIGS[0])), platforms=["cuda"])(*ARGS)
    swizzled = [c for c in copies if c.required == 1024]
    assert len(swizzled) >= 2 * 6 and all(c.ok for c in swizzled)
    assert all(c.chain[-1].startswith("gpu.dynamic_shared_memory") for c in copies)


def test_a_lowering_served_from_the_cache_is_not_passed_unchecked():
    f = gemm(CONFIGS[0])
    lower_for_cuda(f, *ARGS)
    with pytest.raises(AssertionError, match="no TMA copy was lowered"):
        lower_for_cuda(f, *ARGS)                                 # jax.jit(f) again: cached
