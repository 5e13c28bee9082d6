"""Interpret-mode only: let the Mosaic GPU interpreter's wgmma read transposed SMEM views
(and a register LHS). The one shim every kernel here uses (fp8_gemm, fp8_quant, flash_mla).

fp8 wgmma on Hopper needs both operands K-major, so a kernel keeps B as [N, K] in SMEM and
passes `plgpu.transpose_ref(b_smem, (1, 0))`. The CUDA lowering accepts this; the GPU
interpreter (jax 0.10.2, unchanged in 0.11) does not: its `wgmma` callback turns each
operand's transforms into an index range with `to_range`, which only understands indexers,
and fails with "'TransposeTransform' object has no attribute 'indices'".

A transpose is only a view, so the fix is to read the operand through the indexers that
precede the first transpose and then apply the remaining transforms (transposes and further
indexers) to the fetched numpy array. `install()` wraps `gpu_callbacks.wgmma` with that
reader; operands without a transpose go to the original callback untouched. The wrapped
callback is only ever called by the interpreter, so compiled and lowered kernels are not
affected: the interpreted kernel is the same kernel that lowers for CUDA.

The interpreter binds the callback current when its pallas_call is lowered (possibly inside
an outer `jax.jit`, after the kernel wrapper returned), so the wrapper is installed for the
process, not for a scope. `install()` is idempotent; kernel wrappers call it on every
interpreted call, outside their own jit (a cached trace would skip it), so a callback swapped
by other code is put back before the next interpreted kernel lowers.

Second gap, same treatment: `plgpu.layout_cast` (a register-layout hint that Warpgroup-semantics
layout inference needs, e.g. before a row reduction) has no CPU lowering, so the interpreter,
which evaluates non-memory primitives with XLA:CPU, cannot run it. A layout cast is the
identity on values; `install()` registers that identity as its CPU lowering. Only the "cpu"
platform gets the rule: the CUDA lowering of the same kernel is untouched.
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import numpy as np
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.state import indexing
from jax._src.state.types import TransposeTransform

_LOCK = threading.Lock()
_ORIGINAL_WGMMA = gpu_callbacks.wgmma
_LAYOUT_CAST_ON_CPU = False


def _has_view(transforms: Any) -> bool:
    return any(isinstance(t, TransposeTransform) for t in (transforms or ()))


def apply_views(read, transforms: tuple[Any, ...]) -> np.ndarray:
    """Reads an operand through `transforms`, which may contain transposes.

    `read(range)` fetches buffer contents for an index range (as `to_range` builds it). The
    indexers before the first transpose select what is fetched; every later transform is
    applied to the fetched array: a transpose permutes its axes, an indexer slices it in the
    transposed coordinates.
    """
    transforms = tuple(transforms)
    first = next(i for i, t in enumerate(transforms) if isinstance(t, TransposeTransform))
    x = np.asarray(read(interpret_utils.to_range(transforms[:first])))
    for t in transforms[first:]:
        if isinstance(t, TransposeTransform):
            x = np.transpose(x, t.permutation)
        elif isinstance(t, indexing.NDIndexer):
            x = x[interpret_utils.to_range((t,))]
        else:
            raise NotImplementedError(f"interpret shim: unsupported transform after a transpose: {t}")
    return x


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array,
           acc_transforms, acc_dtype, a_allocation_key_as_array, a_transforms,
           b_allocation_key_as_array, b_transforms, source_info=None):
    """`gpu_callbacks.wgmma` that also accepts transposed operand views and a register LHS.

    wgmma may take its LHS from registers (e.g. P in FlashMLA's P·V): the callback then gets
    the value itself, a 2-D array, where it otherwise gets an SMEM allocation key.
    """
    a_in_registers = np.ndim(a_allocation_key_as_array) == 2
    if not (a_in_registers or _has_view(a_transforms) or _has_view(b_transforms)
            or _has_view(acc_transforms)):
        return _ORIGINAL_WGMMA(
            token=token, device_id=device_id, grid_point_coords=grid_point_coords,
            thread_id=thread_id, acc_allocation_key_as_array=acc_allocation_key_as_array,
            acc_transforms=acc_transforms, acc_dtype=acc_dtype,
            a_allocation_key_as_array=a_allocation_key_as_array, a_transforms=a_transforms,
            b_allocation_key_as_array=b_allocation_key_as_array, b_transforms=b_transforms,
            source_info=source_info)
    if _has_view(acc_transforms):
        raise NotImplementedError("interpret shim: a transposed wgmma accumulator")

    device_id, thread_id = int(device_id), int(thread_id)
    shared_memory = gpu_callbacks._get_shared_memory()
    global_thread_id = shared_memory.get_global_thread_id(device_id, thread_id)
    logging_info = interpret_utils.GPULoggingInfo(
        device_id=device_id,
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=thread_id,
        source_info=source_info,
    )
    key_of = gpu_callbacks.HostAllocationKey.from_array
    clean = lambda ts: jax.tree.map(int, gpu_callbacks._remove_noop_transforms(ts or ()))

    def operand(key_array, transforms):
        key = key_of(key_array)
        read = lambda rng: shared_memory.get_buffer_content(
            key, rng, global_thread_id, logging_info=logging_info)[0]
        transforms = clean(transforms)
        if _has_view(transforms):
            return apply_views(read, transforms)
        return read(interpret_utils.to_range(transforms))

    a = (np.asarray(a_allocation_key_as_array) if a_in_registers
         else operand(a_allocation_key_as_array, a_transforms))  # [M, K]
    b = operand(b_allocation_key_as_array, b_transforms)  # [K, N]
    acc_key = key_of(acc_allocation_key_as_array)
    acc_range = interpret_utils.to_range(clean(acc_transforms))
    acc, _, _ = shared_memory.get_buffer_content(
        acc_key, acc_range, global_thread_id, logging_info=logging_info)
    res = acc + np.matmul(a, b, dtype=acc_dtype)
    shared_memory.store_buffer_content(
        acc_key, acc_range, res, global_thread_id, logging_info=logging_info)
    return token


def install() -> None:
    """Interpreter: wgmma accepts transposed operands; layout_cast runs on CPU (idempotent)."""
    global _LAYOUT_CAST_ON_CPU
    with _LOCK:
        if gpu_callbacks.wgmma is not _wgmma:    # other code (tests) may have swapped it
            gpu_callbacks.wgmma = _wgmma
        if not _LAYOUT_CAST_ON_CPU:
            gpu_core.layout_cast_p.def_impl(lambda x, *, new_layout: x)
            mlir.register_lowering(
                gpu_core.layout_cast_p, lambda ctx, x, *, new_layout: [x], platform="cpu")
            _LAYOUT_CAST_ON_CPU = True


def installed() -> bool:
    return gpu_callbacks.wgmma is _wgmma and _LAYOUT_CAST_ON_CPU
