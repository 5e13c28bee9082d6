"""The third CPU check of our kernels: compiled for sm_90a through ptxas (benchmarks/ptxas.py).

A kernel that lowers can still fail to compile on the GPU machine (its LLVM or ptxas stage), and
one that compiles can spill registers to local memory: the lowering never sees either. These
tests run the CUDA plugin's own pipeline and ptxas here, at the register-heavy kernels' GPU
shapes (FlashMLA's exactly: its split schedule follows the batch and lengths; the others' code
does not depend on batch or sequence length, so those stay small), and hold each
kernel to the spills ptxas reported on 2026-11-30: none where there were none, and no more than
measured where the kernel holds more accumulators than 240 registers carry comfortably.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import ptxas
from pallas_kernels import flash_mla as fm
from pallas_kernels import fp8_gemm
from pallas_kernels import mla_attention as ma
from cuda_lowering import pretend_hopper

SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    80 bytes stack frame, 84 bytes spill stores, 92 bytes spill loads
ptxas info    : Used 168 registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 2316.146 ms
"""


def test_ptxas_report_is_read():
    r = ptxas.parse_ptxas(SAMPLE)
    assert (r.kernel, r.registers, r.stack, r.spill_stores, r.spill_loads) == \
        ("anonymous_mosaic_gpu_kernel", 168, 80, 84, 92)
    assert r.spills
    with pytest.raises(ValueError, match="unrecognised"):
        ptxas.parse_ptxas("ptxas fatal   : Unresolved extern function")


@pytest.fixture(autouse=True)
def _fresh_traces():
    """Traces made under pretend_hopper (GPU branches) must not serve later tests."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def toolchain():
    """ptxas, a C compiler, the CUDA plugin wheel and nvdisasm (both downloaded once where
    missing); skip, saying which is missing."""
    try:
        ptxas.cuda_root()
        ptxas.fake_libcuda()
        ptxas.plugin_library()
        ptxas.nvdisasm()
    except ptxas.Unavailable as exc:
        pytest.skip(f"ptxas check unavailable here: {exc}")


def _flash_mla(s_q: int, **config):
    """The suite's first FlashMLA shape (b = 128, s_k = 4096, h_q = 128): the split schedule, and
    so the code ptxas allocates for, depends on the batch and lengths."""
    b, pages = 128, 4096 // fm.PAGE
    fp8 = config.get("dequantize_in_kernel", False)
    args = (jax.ShapeDtypeStruct((b, s_q, 128, fm.D_QK), jnp.bfloat16),
            jax.ShapeDtypeStruct((b * pages, fm.PAGE, 1, fm.FP8_TOKEN_BYTES if fp8 else fm.D_QK),
                                 jnp.uint8 if fp8 else jnp.bfloat16),
            jax.ShapeDtypeStruct((b, pages), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32))
    fn = lambda *a: fm.flash_mla_with_kvcache(*a, causal=s_q > 1, config=fm.TuningConfig(**config))
    return fn, args


def _mla_attention_grad():
    q = jax.ShapeDtypeStruct((1, 256, 2, 192), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: ma.mla_attention(q, k, v, causal=True, implementation="pallas") \
        .astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2)), (q, q, v)


def _fp8_gemm(m: int):
    n, k = 512, 4096
    args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((n // 128, k // 128), jnp.float32))
    return (lambda a, sa, b, sb: fp8_gemm.fp8_gemm_nt((a, sa), (b, sb))), args


def test_kernels_compile_for_sm90a_within_their_spill_budgets(toolchain, monkeypatch):
    """Per kernel, in lowering order: (spill stores in bytes, spill instructions a main-loop
    iteration runs, the most of any of its main loops) may not exceed what was measured."""
    pretend_hopper(monkeypatch)
    cases = [
        # 2 x 64 x 256 f32 O accumulators: 128 of the consumers' 240 registers a thread.
        ("flash_mla s_q=1", *_flash_mla(1), [(4, 1)]),
        ("flash_mla s_q=2 causal", *_flash_mla(2), [(44, 9)]),
        # pages in pairs also holds the row statistics and P exchanged between the warpgroups
        ("flash_mla s_q=2 causal pair_pages", *_flash_mla(2, pair_pages=True), [(444, 40)]),
        # the ping-pong schedule barrier holds nothing more in registers than the default
        ("flash_mla s_q=2 causal ping_pong", *_flash_mla(2, ping_pong=True), [(32, 8)]),
        # the FP8 cache dequantised in the kernel: swizzled fp8 load addresses held across pages
        ("flash_mla s_q=1 fp8 dequantize_in_kernel", *_flash_mla(1, dequantize_in_kernel=True), [(124, 21)]),
        # forward, dQ, dK/dV: dK and dV (64 x 192 and 64 x 128 f32) hold 160 registers a thread.
        ("mla_attention forward + backward", *_mla_attention_grad(), [(0, 0), (0, 0), (88, 20)]),
        ("fp8_gemm_nt block_m=64", *_fp8_gemm(64), [(0, 0)]),
        ("fp8_gemm_nt block_m=128 (warp specialised)", *_fp8_gemm(256), [(0, 0)]),
    ]
    modules, owners = [], []
    for name, fn, args, budgets in cases:
        found = ptxas.kernel_modules(fn, *args)
        assert len(found) == len(budgets), (name, len(found))
        modules += found
        owners += [(name, i, budget) for i, budget in enumerate(budgets)]
    reports = ptxas.compile_modules(modules, sass=True)
    measured = [(name, i, r.registers, r.spill_stores,
                 max((loop.stores + loop.loads for loop in r.loops), default=0), budget)
                for (name, i, budget), r in zip(owners, reports)]
    assert all(r.loops for r in reports), "a kernel without a main loop: the SASS was not read"
    over = [m for m in measured if m[3] > m[5][0] or m[4] > m[5][1] or m[2] > 168]
    assert not over, f"(case, kernel, registers, spill stores, main-loop spills, budget): {over}"


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDL R3, [R1+0x4] ;
.L_x_2:
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   STL [R1+0x8], R4 ;
        /*0060*/                   LDL R5, [R1+0x8] ;
        /*0070*/                   LDL.64 R6, [R1+0x10] ;
        /*0080*/               @P1 BRA `(.L_x_2) ;
        /*0090*/               @P2 BRA `(.L_x_1) ;
        /*00a0*/               @P3 EXIT ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*00d0*/                   BRA `(.L_x_2) ;
"""


def test_main_loops_are_read_from_the_sass():
    """The innermost loop holding a wgmma, not the retry loop (none), not the loop around it,
    not the out-of-line retry block past the last EXIT that jumps back into it."""
    assert ptxas.hot_loops(SASS) == [ptxas.LoopSpills(instructions=5, gmma=1, stores=1, loads=2)]


def test_the_spill_check_sees_a_kernel_starved_of_registers(toolchain, monkeypatch):
    """Without setmaxnreg the consumers keep the 168 registers of a 384-thread CTA: FlashMLA's
    accumulators do not fit and ptxas spills hundreds of bytes (744 at s_q = 2 on 2026-11-30)."""
    pretend_hopper(monkeypatch)
    monkeypatch.setattr(plgpu, "set_max_registers", lambda n, *, action: None)
    fn, args = _flash_mla(2)
    (report,) = ptxas.ptxas_report(fn, *args)
    assert report.spill_stores > 200, report.ptxas
