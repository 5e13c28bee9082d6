"""GPU-suite entries for the FP8 quantisers (pallas_kernels/fp8_quant.py).

Memory-bound: a bf16 read, an e4m3 write and the f32 scales. Shapes: the activations of a
DeepSeek-V3 MLP input (4096 tokens x 7168) and the largest weight of DeepGEMM's table
(7168 x 16384). The baseline is the jnp reference compiled by XLA. Importing needs no GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.registry import KernelEntry, register
from pallas_kernels import fp8_quant as fq


def _error(got, want):
    """Relative L1 distance of the dequantised tensors (0 when the casts agree bit for bit)."""
    (y, s), (y_ref, s_ref) = got, want
    def deq(y, s):
        y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
        s = np.asarray(s, np.float64)
        rows = np.repeat(s, fq.BLOCK, axis=-1)[..., : y.shape[-1]]
        if rows.shape[0] != y.shape[0]:                       # per-block: [NB, K] -> [N, K]
            rows = np.repeat(rows, fq.BLOCK, axis=0)[: y.shape[0]]
        return y * rows
    a, b = deq(y, s), deq(y_ref, s_ref)
    return float(np.abs(a - b).sum() / max(np.abs(b).sum(), 1e-30))


def _entry(kind: str, rows: int, cols: int, block_rows: int | None = None):
    def make_inputs(dry: bool):
        r, c = (200, 256) if dry else (rows, cols)
        return (jax.random.normal(jax.random.key(3), (r, c), jnp.bfloat16),)

    if kind == "per_token":
        config = fq.TuningConfig(block_rows=block_rows or fq.TuningConfig().block_rows)
        kernel = lambda x, interpret=False: fq.per_token_cast_to_fp8(x, interpret=interpret,  # noqa: E731
                                                                     config=config)
        reference = jax.jit(fq.per_token_cast_to_fp8_reference)
    else:
        kernel = lambda x, interpret=False: fq.per_block_cast_to_fp8(x, interpret=interpret)  # noqa: E731
        reference = jax.jit(fq.per_block_cast_to_fp8_reference)

    def nbytes(x):
        scales = x.size // fq.BLOCK if kind == "per_token" else x.size // fq.BLOCK ** 2
        return float(x.size * (x.dtype.itemsize + 1) + 4 * scales)

    suffix = f" block_rows={block_rows}" if block_rows else ""
    register(KernelEntry(
        name=f"fp8_quant {kind} {rows}x{cols}{suffix}",
        make_inputs=make_inputs, kernel=kernel, reference=reference,
        error=_error, tolerance=1e-3, flops=lambda x: 2.0 * x.size, bytes=nbytes,
        baselines={"xla_reference": reference}, bound="memory", peak="bf16",
        quick=block_rows is None,
    ))


_entry("per_token", 4096, 7168)
_entry("per_block", 7168, 16384)
_entry("per_token", 4096, 7168, block_rows=64)
