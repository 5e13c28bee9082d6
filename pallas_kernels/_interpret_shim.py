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

Third gap: `pl.run_state(f)(plgpu.ACC.init(x))`, the way a Hopper kernel accumulates wgmma
results in place across loop steps (JAX's own FlashAttention-3 example does O += P V so), is a
higher-order primitive the interpreter does not implement ("Higher-order primitive run_state").
`install()` wraps the interpreter's `JaxprInterpreter.interpret`: a jaxpr without run_state goes
to the original untouched; one with it is run piecewise, the stretches between run_state
equations by the original interpreter and each run_state by `_run_state`, with the interpreter's
token threaded through all of them so the callbacks keep their order. `_run_state` allocates
each accumulator ref as the interpreter's `run_scoped` allocates `plgpu.ACC` (a register
buffer), but holding its initial value (so are the values the body closes over, which run_state
hoists into refs); interprets the body (its wgmmas accumulate into that buffer); reads the
accumulators back (on the GPU run_state waits for outstanding wgmmas there; the interpreter's
wgmma is synchronous) and frees the buffers. SMEM refs the body closes over pass through.
"""

from __future__ import annotations

import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import callback
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
from jax._src.state import discharge, indexing
from jax._src.state.types import AbstractRef, TransposeTransform

_LOCK = threading.Lock()
_ORIGINAL_WGMMA = gpu_callbacks.wgmma
_ORIGINAL_INTERPRET = jaxpr_interpret.JaxprInterpreter.interpret
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


# --- run_state ------------------------------------------------------------------------------

def _is_accumulator(aval) -> bool:
    return isinstance(aval, AbstractRef) and aval.memory_space == gpu_core.MemorySpace.REGS


def _run_state(interp, eqn, token, invals):
    """One run_state equation: (token, outputs), outputs in eqn.outvars' order.

    Each body ref whose equation input is a value gets a buffer holding it, in register space
    (per thread: SMEM allocations are collective, made by every thread of the block in the same
    order, and these are made by the consumer warpgroups only): the accumulators (plgpu.ACC.init)
    and the values the body closes over (run_state hoists them into refs: P, the register LHS of
    P V; a slot index). Accumulators are read back at the end; a closed-over value comes back as
    it went in (run_state drops those outputs). Refs that are refs already (SMEM) pass through."""
    body = eqn.params["jaxpr"]
    if not all(eqn.params["is_initialized"]):
        raise NotImplementedError("interpret shim: run_state with an uninitialized ref")
    ids = dict(device_id=jnp.int32(interp.device_info.device_id),
               grid_point_coords=interp.grid_point_coords, thread_id=interp.thread_id)
    args, buffers = [], []
    for outer, var, value in zip(eqn.invars, body.invars, invals):
        if isinstance(outer.aval, AbstractRef):
            args.append(value)                               # an SMEM ref the body closes over
            continue
        owner = gpu_callbacks.get_thread_id_for_collective_allocation_key(
            thread_id=jnp.int32(interp.thread_id), axes_dims=interp.thread_cluster_shape,
            is_last_thread_axis_collective=False)
        token, request = gpu_callbacks.call_make_allocation_request_array(
            token=token, device_id=ids["device_id"], thread_id=jnp.int32(owner),
            memory_space_id=gpu_callbacks.get_memory_space_idx(gpu_core.MemorySpace.REGS))
        token, key = gpu_callbacks.call_allocate_buffer(
            token=token, **ids, allocation_request_as_array=request,
            value=jnp.asarray(value, var.aval.dtype), source_info=eqn.source_info)
        buffers.append((len(args), value, _is_accumulator(var.aval)))
        args.append(key)
    token, _ = interp.interpret(body, token, *args)
    outs = list(args)
    for i, value, accumulator in buffers:
        outs[i] = value
        if accumulator:
            token, outs[i] = callback.io_callback(
                lambda **kw: gpu_callbacks.wgmma_accumulator_deref(**kw, source_info=eqn.source_info),
                (gpu_callbacks.TOKEN_SHAPE_DTYPE, body.invars[i].aval.inner_aval), token=token, **ids,
                acc_allocation_key_as_array=args[i], wait_n=0, ordered=True)
        token = gpu_callbacks.call_deallocate_buffer(
            token=token, **ids, allocation_key_as_array=args[i], source_info=eqn.source_info)
    return token, outs


def _interpret(self, jaxpr, token, *args):
    """`JaxprInterpreter.interpret`, also running run_state equations (see the module docstring)."""
    if not any(e.primitive is discharge.run_state_p for e in jaxpr.eqns):
        return _ORIGINAL_INTERPRET(self, jaxpr, token, *args)
    env = dict(zip([*jaxpr.constvars, *jaxpr.invars], args))
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
    eqns = list(jaxpr.eqns)
    start = 0
    while start < len(eqns):
        if eqns[start].primitive is discharge.run_state_p:
            eqn = eqns[start]
            token, outs = _run_state(self, eqn, token, [read(v) for v in eqn.invars])
            env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jax_core.DropVar))
            start += 1
            continue
        stop = next((i for i in range(start, len(eqns)) if eqns[i].primitive is discharge.run_state_p),
                    len(eqns))
        run = eqns[start:stop]
        defined = {v for e in run for v in e.outvars}
        later = {v for v in [*(v for e in eqns[stop:] for v in e.invars), *jaxpr.outvars]
                 if not isinstance(v, jax_core.Literal)}
        free = list(dict.fromkeys(v for e in run for v in e.invars
                                  if not isinstance(v, jax_core.Literal) and v not in defined))
        # (nested jaxprs' free variables are equation inputs, so `free` is complete)
        kept = [v for v in dict.fromkeys(v for e in run for v in e.outvars)
                if v in later and not isinstance(v, jax_core.DropVar)]
        piece = jax_core.Jaxpr([], free, kept, run, jax_core.no_effects,
                               jax_core.DebugInfo("interpret shim: a stretch between run_states",
                                                  "", None, None))
        token, outs = _ORIGINAL_INTERPRET(self, piece, token, *[env[v] for v in free])
        env.update(zip(kept, outs))
        start = stop
    return token, [read(v) for v in jaxpr.outvars]


def install() -> None:
    """Interpreter: wgmma accepts transposed operands; layout_cast runs on CPU; run_state
    accumulates in place (idempotent)."""
    global _LAYOUT_CAST_ON_CPU
    with _LOCK:
        if gpu_callbacks.wgmma is not _wgmma:    # other code (tests) may have swapped it
            gpu_callbacks.wgmma = _wgmma
        jaxpr_interpret.JaxprInterpreter.interpret = _interpret
        if not _LAYOUT_CAST_ON_CPU:
            gpu_core.layout_cast_p.def_impl(lambda x, *, new_layout: x)
            mlir.register_lowering(
                gpu_core.layout_cast_p, lambda ctx, x, *, new_layout: [x], platform="cpu")
            _LAYOUT_CAST_ON_CPU = True


def installed() -> bool:
    return (gpu_callbacks.wgmma is _wgmma and _LAYOUT_CAST_ON_CPU
            and jaxpr_interpret.JaxprInterpreter.interpret is _interpret)
