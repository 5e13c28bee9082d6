"""Lowering for CUDA with shared-memory alignment checked (no GPU needed): `lower_for_cuda`.

A TMA copy (cp.async.bulk.tensor) faults with CUDA_ERROR_MISALIGNED_ADDRESS unless its SMEM
address is 128-byte aligned, and a tile swizzled in S-byte rows must start on a multiple of 8 S
(the swizzle atom, 1024 bytes for S = 128): the swizzle pattern is a function of the address, and
Mosaic GPU builds every wgmma operand descriptor with base offset 0, so a swizzled operand that
starts off the atom is read with the wrong pattern, silently. Neither CPU check sees this: the
interpreter does not model addresses and the lowering does not verify them. On 2026-11-29 the
first GPU run of DeepGEMM faulted this way: each pipeline stage's B-scale row was 80 bytes
(N = 2112: 17 scales padded to 20), so stage 1 began 80 bytes in, and the fault cost that process
every later entry.

`smem_alignment()` wraps Mosaic GPU's `LaunchContext.async_copy` and `wgmma` for the duration of
a lowering and, for every TMA copy and every SMEM wgmma operand, follows the ref's definition
back to the dynamic shared-memory base: views add their byte shift, subviews add offset x stride
per dimension (a dynamic index adds an unknown multiple of that dimension's stride, so a pipeline
slot index contributes the stage size), casts and reshapes keep the address. The guaranteed
alignment of the address is the gcd of all those terms (the base is 1024-aligned: Pallas lays
out scratch on 1024-byte boundaries). An op it has no rule for is an error, never a guess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math

import jax
import jax.experimental.mosaic.gpu as mgpu
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.gpu import launch_context
from jax.experimental.mosaic.gpu import utils as mgpu_utils

# The module (the package's attribute of that name is its function).
wgmma_module = importlib.import_module("jax.experimental.mosaic.gpu.wgmma")

BASE_ALIGNMENT = 1024     # the dynamic SMEM base: Pallas Mosaic GPU's SMEM_ALIGNMENT
TMA_ALIGNMENT = 128       # any TMA tensor copy's SMEM address
WGMMA_ALIGNMENT = 16      # an unswizzled wgmma operand (descriptor addresses are in 16-byte units)
# A tile swizzled in S-byte rows, for TMA and wgmma alike, starts on a multiple of 8 S (the
# swizzle atom: 1024 bytes for S = 128).

# Ops that change the type of a ref but not the address of its first element.
_SAME_ADDRESS = {"builtin.unrealized_conversion_cast", "memref.cast", "memref.expand_shape",
                 "memref.collapse_shape", "memref.transpose"}


@dataclasses.dataclass(frozen=True)
class Access:
    """One SMEM ref a TMA copy or a wgmma reads or writes, seen during lowering: the op, the ref's
    type, the alignment its address is guaranteed, the alignment it needs, and the chain of ops
    from the ref back to the SMEM base."""
    op: str                  # "tma" or "wgmma"
    smem_type: str
    alignment: int
    required: int
    chain: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.alignment % self.required == 0


def _constant(value) -> int | None:
    op = value.owner
    if isinstance(op, ir.Block) or op.name != "arith.constant":
        return None
    return ir.IntegerAttr(op.attributes["value"]).value


def _element_bytes(memref_type) -> int:
    return mgpu_utils.bitwidth(memref_type.element_type) // 8


def address_alignment(ref) -> tuple[int, tuple[str, ...]]:
    """(alignment, chain): the largest power of two (<= BASE_ALIGNMENT) that divides the address of
    ref's first element for every value of the dynamic indices, and the ops walked to find it."""
    terms, chain = [0], []                   # address = base + sum(terms), an unknown k for each k*term
    value = ref
    while True:
        op = value.owner
        if isinstance(op, ir.Block):
            raise ValueError(f"SMEM ref {ref.type} comes from a block argument: alignment unknown")
        op = op.opview
        chain.append(f"{op.name}: {value.type}")
        if op.name == "gpu.dynamic_shared_memory":
            break
        if op.name in _SAME_ADDRESS:
            value = op.operands[0]
        elif op.name == "memref.view":
            shift = _constant(op.byte_shift)
            terms.append(shift if shift is not None else 1)
            value = op.source
        elif op.name == "memref.subview":
            source = ir.MemRefType(op.source.type)
            strides, _ = source.get_strides_and_offset()
            dynamic = iter(op.offsets)
            for static, stride in zip(op.static_offsets, strides):
                if static == ir.ShapedType.get_dynamic_stride_or_offset():
                    index = _constant(next(dynamic))
                    # an unknown index: any multiple of the stride (terms only ever enter a gcd)
                    terms.append(stride * _element_bytes(source) * (1 if index is None else index))
                else:
                    terms.append(static * stride * _element_bytes(source))
            value = op.source
        else:
            raise ValueError(f"SMEM ref {ref.type}: no alignment rule for {op.name} "
                             f"(chain so far: {chain})")
    alignment = math.gcd(BASE_ALIGNMENT, *terms)
    return alignment, tuple(chain)


def _access(op: str, ref, swizzle: int | None) -> Access:
    alignment, chain = address_alignment(ref)
    required = max(TMA_ALIGNMENT if op == "tma" else WGMMA_ALIGNMENT, 8 * (swizzle or 0))
    return Access(op, str(ref.type), alignment, required, chain)


def _is_smem(value) -> bool:
    return isinstance(value, ir.Value) and mgpu_utils.is_smem_ref(ir.MemRefType(value.type))


@contextlib.contextmanager
def smem_alignment():
    """Record every TMA copy and SMEM wgmma operand lowered inside the block:
    `with smem_alignment() as accesses: export(...)`; those with `not a.ok` are misaligned."""
    accesses: list[Access] = []
    async_copy, wgmma = launch_context.LaunchContext.async_copy, wgmma_module.wgmma

    def checked_copy(self, *, src_ref, dst_ref, swizzle=None, implementation=None, **kwargs):
        smem = [r for r in (src_ref, dst_ref) if _is_smem(r)]
        if implementation in (None, launch_context.AsyncCopyImplementation.TMA) and smem:
            accesses.append(_access("tma", smem[0], swizzle))
        if implementation is not None:
            kwargs["implementation"] = implementation
        return async_copy(self, src_ref=src_ref, dst_ref=dst_ref, swizzle=swizzle, **kwargs)

    def checked_wgmma(acc, a, b, *, swizzle: int = 128, **kwargs):
        accesses.extend(_access("wgmma", ref, swizzle) for ref in (a, b) if _is_smem(ref))
        return wgmma(acc, a, b, swizzle=swizzle, **kwargs)

    # Lane-semantics kernels call wgmma through the package, Warpgroup-semantics ones (the dialect
    # lowering: fp8_gemm) through its module
    launch_context.LaunchContext.async_copy = checked_copy
    mgpu.wgmma = wgmma_module.wgmma = checked_wgmma
    try:
        yield accesses
    finally:
        launch_context.LaunchContext.async_copy = async_copy
        mgpu.wgmma = wgmma_module.wgmma = wgmma


def misaligned(accesses: list[Access]) -> list[str]:
    """One line per misaligned access: the ref, its alignment and need, and the ops that placed it
    (only the address-changing ones show their result type)."""
    def step(link: str) -> str:
        name = link.split(":")[0]
        return link if name in ("memref.view", "memref.subview") else name
    return [f"{a.op} {a.smem_type}: address aligned to {a.alignment} B, needs {a.required} B "
            f"(from {' <- '.join(map(step, a.chain))})" for a in accesses if not a.ok]


def lower_for_cuda(fn, *args, **export_kwargs) -> str:
    """jax.export for CUDA (the second CPU check of ../shared/PALLAS.md) with every TMA copy's and
    wgmma operand's SMEM address checked on the way; returns the module text. A module with a Mosaic
    GPU kernel must show at least one TMA copy, so a lowering served from jax's cache cannot pass
    unchecked."""
    with smem_alignment() as accesses:
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], **export_kwargs)(*args)
    module = exported.mlir_module()
    if "mosaic_gpu" in module:
        assert any(a.op == "tma" for a in accesses), \
            "no TMA copy was lowered (a cached lowering?): alignment unchecked"
    bad = misaligned(accesses)
    assert not bad, "\n".join(bad)
    return module


def pretend_hopper(monkeypatch) -> None:
    """Make our dispatch take its GPU branches while lowering on CPU (benchmarks/registry.py's
    `gpu_dispatch_patches` says which choices and why), undone when the test ends."""
    from benchmarks.registry import gpu_dispatch_patches
    for obj, name, stand_in in gpu_dispatch_patches():
        monkeypatch.setattr(obj, name, stand_in)
