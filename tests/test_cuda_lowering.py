"""The SMEM alignment check of tests/cuda_lowering.py: it catches the fault the H200 found, and sees
every TMA copy and wgmma operand of both lowering semantics."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import fp8_gemm as fg
from cuda_lowering import lower_for_cuda, smem_alignment

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
        with smem_alignment() as copies:
            jax.export.export(jax.jit(gemm(config)), platforms=["cuda"])(*ARGS)
        bad = [c for c in copies if not c.ok]
        assert bad and all(c.smem_type.startswith("memref<1x20xf32") for c in bad)
        assert {c.alignment for c in bad} <= {16, 32, 64} and {c.required for c in bad} == {128}
        with pytest.raises(AssertionError, match=r"tma memref<1x20xf32.*aligned to 16 B, needs 128 B"):
            lower_for_cuda(gemm(config), *ARGS)
    finally:                                    # no later test may meet the 16-byte trace
        monkeypatch.undo()
        jax.clear_caches()


def test_swizzled_tiles_need_the_swizzle_atom_and_are_found():
    """fp8_gemm (Warpgroup semantics, lowered through Mosaic GPU's dialect): every A and B stage is a
    128-byte-swizzled TMA tile (6 stages each, in the prologue and in the loop) and both wgmma
    operands read one; all need and have 1024-byte alignment."""
    with smem_alignment() as accesses:
        jax.export.export(jax.jit(gemm(CONFIGS[0])), platforms=["cuda"])(*ARGS)
    swizzled = [a for a in accesses if a.op == "tma" and a.required == 1024]
    wgmma = [a for a in accesses if a.op == "wgmma"]
    assert len(swizzled) >= 2 * 6 and len(wgmma) == 2
    assert all(a.ok and a.required == 1024 for a in swizzled + wgmma)
    assert all(a.chain[-1].startswith("gpu.dynamic_shared_memory") for a in accesses)


def test_lane_semantics_wgmma_operands_are_seen():
    """FlashMLA (Lane semantics, wgmma called through the mosaic.gpu package): QK^T and PV operands."""
    from pallas_kernels import flash_mla as fm
    args = (jax.ShapeDtypeStruct((2, 1, 16, fm.D_QK), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, fm.PAGE, 1, fm.D_QK), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    with smem_alignment() as accesses:
        jax.export.export(jax.jit(fm.flash_mla_with_kvcache), platforms=["cuda"])(*args)
    wgmma = [a for a in accesses if a.op == "wgmma"]
    assert wgmma and all(a.ok and a.required == 1024 for a in wgmma)


def test_a_lowering_served_from_the_cache_is_not_passed_unchecked():
    f = gemm(CONFIGS[0])
    lower_for_cuda(f, *ARGS)
    with pytest.raises(AssertionError, match="no TMA copy was lowered"):
        lower_for_cuda(f, *ARGS)                                 # jax.jit(f) again: cached
