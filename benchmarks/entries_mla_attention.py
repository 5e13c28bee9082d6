"""GPU-suite entries for MLA training/prefill attention (pallas_kernels/mla_attention.py).

DeepSeek-V3's shapes: T = 4096 tokens, H = 128 heads, q/k head dim 192, v head dim 128, causal,
bf16. Forward alone, and forward + backward (jax.vjp: out, then dq, dk, dv) as one call, both
against the bf16 matmul ceiling. Baselines in the same run: the plain-jnp reference compiled by
XLA, and `jax.nn.dot_product_attention` (which needs one head dim, so V is zero-padded to 192
and the output sliced; that padding is part of its cost). A packed-documents entry (segment ids)
is timed against the reference only (jax.nn's call takes no segment ids here). Dry runs use T = 128, H = 1 and 64-wide heads, interpreted.
Importing this module needs no GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.registry import KernelEntry, register
from pallas_kernels import mla_attention as ma

ENTRIES: list[KernelEntry] = []
T, H, D_QK, D_V = 4096, 128, 192, 128


def _make_inputs(batch, seq, heads, backward, dry, doc_len=0):
    """(q, k, v[, do][, segment_ids])."""
    d_qk, d_v = (64, 64) if dry else (D_QK, D_V)
    if dry:
        seq, heads = 128, 1
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, d_qk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, heads, d_qk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, heads, d_v), jnp.bfloat16)
    args = (q, k, v)
    if backward:
        args += (jax.random.normal(keys[3], (batch, seq, heads, d_v), jnp.bfloat16),)
    if doc_len:
        doc_len = 48 if dry else doc_len
        args += (jnp.asarray(np.arange(seq)[None].repeat(batch, 0) // doc_len, jnp.int32),)
    return args


def _attention(impl, q, k, v, seg=None, interpret=False):
    if impl == "pallas":
        return ma.mla_attention(q, k, v, causal=True, segment_ids=seg, interpret=interpret,
                                implementation="pallas")
    if impl == "xla":
        return ma.mla_attention(q, k, v, causal=True, segment_ids=seg, implementation="xla")
    d_v = v.shape[3]                                   # jax.nn: v zero-padded to q's head dim
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[3] - d_v)))
    out = jax.nn.dot_product_attention(q, k, v_pad, is_causal=True, scale=q.shape[3] ** -0.5)
    return out[..., :d_v]


def _forward(impl, q, k, v, *seg, interpret=False):
    return _attention(impl, q, k, v, *seg, interpret=interpret)


def _forward_backward(impl, q, k, v, do, *seg, interpret=False):
    fn = lambda q, k, v: _attention(impl, q, k, v, *seg, interpret=interpret)  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _error(got, want):
    """Worst relative L2 error over the outputs (out, or out, dq, dk, dv)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    errs = []
    for x, y in zip(got, want):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not np.isfinite(x).all():
            return float("inf")
        errs.append(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
    return float(max(errs))


def _causal_pairs(q, seg=None):
    """Visible (query, key) pairs per batch row and head (causal, within segments)."""
    seq = q.shape[1]
    if seg is None:
        return q.shape[0] * seq * (seq + 1) / 2
    seg = np.asarray(seg)
    return float(sum(np.sum(np.bincount(row) * (np.bincount(row) + 1) / 2) for row in seg))


def _flops(backward, q, k, v, *rest):
    """Useful matmul FLOPs: forward QK^T and PV; backward recomputes QK^T, then dP = dO V^T,
    dV = P^T dO, dQ = dS K, dK = dS^T Q."""
    seg = rest[-1] if rest and rest[-1].dtype == jnp.int32 else None
    d_qk, d_v, heads = q.shape[3], v.shape[3], q.shape[2]
    per_pair = (d_qk + d_v) + ((3 * d_qk + 2 * d_v) if backward else 0)
    return 2.0 * heads * _causal_pairs(q, seg) * per_pair


def _bytes(backward, q, k, v, *rest):
    """HBM traffic if each operand is read and each result written once."""
    io = q.nbytes + k.nbytes + v.nbytes + v.nbytes          # q, k, v in, out
    return float(io * (3 if backward else 1))


def _add(name, backward, doc_len=0, jax_nn=True, quick=True):
    run = _forward_backward if backward else _forward
    make = functools.partial(_make_inputs, 1, T, H, backward, doc_len=doc_len)
    reference = jax.jit(functools.partial(run, "xla"))
    ENTRIES.append(register(KernelEntry(
        name=name,
        make_inputs=make,
        kernel=functools.partial(run, "pallas"),
        reference=reference,
        error=_error,
        tolerance=2e-2,              # bf16 out and grads vs the fp32-computed reference
        flops=functools.partial(_flops, backward),
        bytes=functools.partial(_bytes, backward),
        baselines={"xla_reference": reference,
                   **({"jax.nn.dot_product_attention": functools.partial(run, "jax_nn")}
                      if jax_nn else {})},
        bound="compute", peak="bf16", quick=quick,
    )))


_add(f"mla_attention fwd b=1 t={T} h={H} causal", backward=False)
_add(f"mla_attention fwd+bwd b=1 t={T} h={H} causal", backward=True)
_add(f"mla_attention fwd b=1 t={T} h={H} causal docs=1024", backward=False, doc_len=1024,
     jax_nn=False, quick=False)
