"""The kernel entries the GPU suite runs. Each kernel issue registers its own entries here.

An entry is a kernel and its baselines at one shape. `benchmarks/gpu_suite.py` (the harness)
builds the inputs, checks the kernel compiled on the GPU against the reference, then times the
kernel and every baseline, and reports TFLOP/s and GB/s against the measured ceilings. Its CPU
dry run calls the same entries with `dry=True` (tiny shapes, kernels interpreted), so an entry
must work both ways.

Entries are registered by modules listed in `ENTRY_MODULES`; importing such a module must not
need a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any

# Modules whose import registers entries (each kernel issue adds its module here). The suite runs
# entries with baselines first, then the tuning sweeps, each in this order, in case the time
# budget runs out: first what no GPU run has measured yet (the FP8 training step, whose timing is
# all its issue still needs, and the MLA training attention), then FlashMLA and DeepGEMM (timed on
# 2026-11-29), whose sweeps start with the one most likely to decide a target (FlashMLA's pages
# in pairs).
ENTRY_MODULES: list[str] = ["benchmarks.entries_train_step", "benchmarks.entries_mla_attention",
                             "benchmarks.entries_flash_mla", "benchmarks.entries_deep_gemm",
                             "benchmarks.entries_fp8_quant"]


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    name: str                                         # e.g. "flash_mla b=128 s_k=4096 h_q=128 s_q=1"
    make_inputs: Callable[[bool], tuple]              # make_inputs(dry) -> args; dry: tiny CPU shapes
    kernel: Callable[..., Any]                        # kernel(*args, interpret=bool) -> output pytree
    reference: Callable[..., Any]                     # plain jnp reference(*args) -> output pytree
    error: Callable[[Any, Any], float]                # error(kernel_out, reference_out), e.g. 1 - cosine
    tolerance: float                                  # error must be below this
    flops: Callable[..., float]                       # flops(*args): useful FLOPs of one call
    bytes: Callable[..., float]                       # bytes(*args): HBM bytes of one call (roofline)
    baselines: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)  # XLA peers
    bound: str = "compute"                            # "compute" or "memory": which ceiling applies
    peak: str = "bf16"                                # "bf16" or "fp8": which matmul ceiling applies
    quick: bool = True                                # included in --quick runs
    limit_s: float = 0.0                              # --watchdog: seconds before it is killed (0: default)


def gpu_dispatch_patches() -> list[tuple[Any, str, Callable]]:
    """(object, attribute, stand-in) that make our dispatch take its GPU branches while lowering
    on CPU: `jax.default_backend()` says "gpu" to our code (mla_attention, mla_decode and the MoE
    experts choose on it) and the FP8 path believes it runs on Hopper (model/fp8.py, fp8_gemm's
    *_auto). jax's own code reads its backend elsewhere, so only the choices of ours change; a
    lowering still targets CUDA explicitly. Used by tests/cuda_lowering.pretend_hopper and by
    benchmarks/ptxas.py, which lower the entries the way the GPU will trace them."""
    import jax

    from pallas_kernels import fp8_gemm
    return [(jax, "default_backend", lambda: "gpu"), (fp8_gemm, "on_hopper", lambda: True)]


_ENTRIES: dict[str, KernelEntry] = {}


def register(entry: KernelEntry) -> KernelEntry:
    if entry.name in _ENTRIES:
        raise ValueError(f"benchmark entry {entry.name!r} is registered twice")
    if entry.bound not in ("compute", "memory") or entry.peak not in ("bf16", "fp8"):
        raise ValueError(f"{entry.name}: bound must be compute|memory and peak bf16|fp8")
    _ENTRIES[entry.name] = entry
    return entry


def entries() -> list[KernelEntry]:
    """Every entry registered by ENTRY_MODULES, or by the comma-separated modules in
    $ORCINUS_SUITE_ENTRIES instead (a user's own entries; the suite's tests)."""
    chosen = [m for m in os.environ.get("ORCINUS_SUITE_ENTRIES", "").split(",") if m]
    for module in chosen or ENTRY_MODULES:
        importlib.import_module(module)
    return list(_ENTRIES.values())
