"""Expert parallelism on the `expert` mesh axis: DeepEP-style dispatch and combine.

Inside `shard_map` over the expert axis, each of R ranks holds n tokens and El = E / R
(physical) experts. DeepEP's vocabulary:
- `get_dispatch_layout(topk_idx, num_experts, num_ranks)`: tokens per rank, tokens per expert,
  is_token_in_rank.
- Normal mode (training, prefill; dropless): each token travels once to every rank that holds
  one of its experts, with its top-k ids made local (-1 for experts elsewhere) and its weights.
  `dispatch` -> recv_x [R, n, D] (one block per source rank), recv_topk_idx, recv_topk_weights,
  tokens per local expert, handle; `combine(y, handle)` sums the experts' (already weighted)
  outputs back onto the source token. Backward of dispatch is combine and vice versa.
  XLA:CPU lacks ragged-all-to-all, so blocks are padded to n rows (`all_to_all`); the layout
  and results are those of the ragged exchange.
- Low-latency mode (decode): fixed `max_tokens_per_rank` (M) buffers, static shapes, received
  tokens packed per local expert [El, R * M, D], optional FP8 payload with 1x128 scales, and a
  weighted combine.
- Redundant experts: `logical_to_physical` (model.moe) maps logical top-k ids to physical replicas
  through an EPLB placement (log2phy, logcnt), picking a replica deterministically from the token
  index. A layer that holds physical slots (`model.moe.has_slots`) arrives here already routed onto
  them; `ep_moe(placement=...)` instead builds the slots from E logical weights on the fly.
- cfg.fp8 runs each rank's local experts as FP8 grouped GEMMs (`model.fp8.grouped_swiglu`) in every
  mode: `grouped_experts(fp8=True)` in normal mode, `model.fp8.batched_swiglu` over the low-latency
  [El, R*M, D] buffers. Independent of the low-latency FP8 payload (`EPOptions.fp8`).

Letters: R ranks, n tokens on this rank, k top-k, D hidden, E physical experts, El local
experts, M low-latency buffer rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from model import fp8 as fp8_lib
from model import moe as moe_lib
from model.config import ModelConfig
from model.moe import logical_to_physical

AXIS = "expert"
FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class Layout:
    num_tokens_per_rank: Int[Array, " R"]
    num_tokens_per_expert: Int[Array, " E"]
    is_token_in_rank: Bool[Array, "n R"]


jax.tree_util.register_dataclass(Layout, data_fields=["num_tokens_per_rank", "num_tokens_per_expert",
                                                      "is_token_in_rank"], meta_fields=[])


def get_dispatch_layout(topk_idx: Int[Array, "n k"], num_experts: int, num_ranks: int) -> Layout:
    """Where each token goes; topk_idx holds physical expert ids, -1 for none."""
    if num_experts % num_ranks:
        raise ValueError(f"num_experts={num_experts} must be divisible by num_ranks={num_ranks}")
    valid = topk_idx >= 0
    rank = jnp.where(valid, topk_idx // (num_experts // num_ranks), num_ranks)
    in_rank = jnp.any(rank[:, :, None] == jnp.arange(num_ranks), axis=1)          # [n, R]
    per_expert = jnp.bincount(jnp.where(valid, topk_idx, num_experts).reshape(-1), length=num_experts + 1)
    return Layout(in_rank.sum(0).astype(jnp.int32), per_expert[:num_experts].astype(jnp.int32), in_rank)


# ---- normal mode ------------------------------------------------------------------------------------

def _exchange(blocks: Float[Array, "R n D"], axis: str) -> Float[Array, "R n D"]:
    """Block d goes to rank d; the result's block s came from rank s."""
    R = blocks.shape[0]
    return jax.lax.all_to_all(blocks.reshape((R * blocks.shape[1],) + blocks.shape[2:]), axis, 0, 0,
                              tiled=True).reshape(blocks.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _send(x: Float[Array, "n D"], in_rank: Bool[Array, "n R"], axis: str) -> Float[Array, "R n D"]:
    return _exchange(jnp.where(in_rank.T[:, :, None], x[None], 0), axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _receive(y: Float[Array, "R n D"], in_rank: Bool[Array, "n R"], axis: str) -> Float[Array, "n D"]:
    return jnp.sum(jnp.where(in_rank.T[:, :, None], _exchange(y, axis), 0), axis=0)


def _send_fwd(x, in_rank, axis):
    return _send(x, in_rank, axis), in_rank


def _send_bwd(axis, in_rank, g):
    return _receive(g, in_rank, axis), None           # backward of dispatch is combine


def _receive_fwd(y, in_rank, axis):
    return _receive(y, in_rank, axis), in_rank


def _receive_bwd(axis, in_rank, g):
    return _send(g, in_rank, axis), None              # backward of combine is dispatch


_send.defvjp(_send_fwd, _send_bwd)
_receive.defvjp(_receive_fwd, _receive_bwd)


@dataclasses.dataclass(frozen=True)
class Handle:
    is_token_in_rank: Bool[Array, "n R"]


jax.tree_util.register_dataclass(Handle, data_fields=["is_token_in_rank"], meta_fields=[])


def dispatch(x: Float[Array, "n D"], topk_idx: Int[Array, "n k"], topk_weights: Float[Array, "n k"],
             num_experts: int, axis: str = AXIS):
    """Normal-mode dispatch (inside shard_map over `axis`).

    Returns recv_x [R, n, D] (block s: tokens from rank s, zero rows where absent),
    recv_topk_idx [R, n, k] (local expert ids, -1 elsewhere), recv_topk_weights [R, n, k],
    num_recv_tokens_per_expert [El], handle.
    """
    R = jax.lax.axis_size(axis)
    local = num_experts // R
    layout = get_dispatch_layout(topk_idx, num_experts, R)
    dest = jnp.where(topk_idx >= 0, topk_idx // local, -1)
    ranks = jnp.arange(R)[:, None, None]
    send_idx = jnp.where(dest[None] == ranks, topk_idx[None] - ranks * local, -1)          # [R, n, k]
    send_w = jnp.where(dest[None] == ranks, topk_weights[None], 0)
    recv_x = _send(x, layout.is_token_in_rank, axis)
    recv_idx = _exchange(send_idx, axis)
    recv_w = _exchange(send_w, axis)
    counts = jnp.bincount(jnp.where(recv_idx >= 0, recv_idx, local).reshape(-1), length=local + 1)[:local]
    return recv_x, recv_idx, recv_w, counts.astype(jnp.int32), Handle(layout.is_token_in_rank)


def combine(y: Float[Array, "R n D"], handle: Handle, axis: str = AXIS) -> Float[Array, "n D"]:
    """Normal-mode combine: sum each token's expert outputs from every rank it visited."""
    return _receive(y, handle.is_token_in_rank, axis)


# ---- normal mode, ragged layout (ragged_all_to_all on accelerators) ------------------------------------

def ragged_exchange(operand, send_sizes: Int[Array, " R"], cap: int, axis: str = AXIS, *, native: bool):
    """`jax.lax.ragged_all_to_all` with offsets derived from per-destination sizes.

    operand rows are grouped by destination (send_sizes[d] rows for rank d, in rank order, each at
    most `cap`); the result has operand.shape[0] rows, received chunks packed in source order.
    native=False runs the same exchange as fixed [R, cap] blocks through `all_to_all` (XLA:CPU has
    no ragged-all-to-all), with the semantics of the ragged primitive's documentation.
    Returns (result, recv_sizes).
    """
    R = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    rows = operand.shape[0]
    sizes = jax.lax.all_gather(send_sizes, axis)                                  # [R(src), R(dst)]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    recv_sizes = sizes[:, me]
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    output_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]                        # where my chunk lands at d
    if native:
        out = jax.lax.ragged_all_to_all(operand, jnp.zeros_like(operand), input_offsets.astype(jnp.int32),
                                        send_sizes.astype(jnp.int32), output_offsets.astype(jnp.int32),
                                        recv_sizes.astype(jnp.int32), axis_name=axis)
        return out, recv_sizes
    slot = jnp.arange(cap)
    take = jnp.minimum(input_offsets[:, None] + slot, rows - 1)
    pad = (1,) * (operand.ndim - 1)
    blocks = jnp.where((slot < send_sizes[:, None]).reshape((R, cap) + pad), operand[take], 0)
    received = _exchange(blocks, axis)                                              # [R(src), cap, ...]
    target = jnp.where(slot < recv_sizes[:, None], recv_offsets[:, None] + slot, rows)
    out = jnp.zeros_like(operand).at[target.reshape(-1)].set(
        received.reshape((R * cap,) + operand.shape[1:]), mode="drop")
    return out, recv_sizes


@dataclasses.dataclass(frozen=True)
class RaggedHandle:
    token: Int[Array, " Rn"]          # source token of each sent row (sorted by destination)
    valid: Bool[Array, " Rn"]
    send_sizes: Int[Array, " R"]
    recv_sizes: Int[Array, " R"]
    num_tokens: int
    native: bool


jax.tree_util.register_dataclass(RaggedHandle, data_fields=["token", "valid", "send_sizes", "recv_sizes"],
                                 meta_fields=["num_tokens", "native"])


def ragged_dispatch(x: Float[Array, "n D"], topk_idx: Int[Array, "n k"], topk_weights: Float[Array, "n k"],
                    num_experts: int, axis: str = AXIS, *, native: bool):
    """Normal-mode dispatch in the ragged layout: recv_x [R*n, D] with received rows packed first."""
    n, D = x.shape
    R = jax.lax.axis_size(axis)
    local = num_experts // R
    layout = get_dispatch_layout(topk_idx, num_experts, R)
    in_rank = layout.is_token_in_rank
    key = jnp.where(in_rank.T, jnp.arange(R)[:, None] * n + jnp.arange(n), R * n).reshape(-1)   # dest-major
    key = jnp.sort(key)
    valid = key < R * n
    token, dest = jnp.where(valid, key % n, 0), jnp.where(valid, key // n, -1)
    mine = (topk_idx[token] // local == dest[:, None]) & (topk_idx[token] >= 0) & valid[:, None]
    send_idx = jnp.where(mine, topk_idx[token] - dest[:, None] * local, -1)
    send_w = jnp.where(mine, topk_weights[token], 0)
    send_sizes = in_rank.sum(0).astype(jnp.int32)
    recv_x, recv_sizes = ragged_exchange(jnp.where(valid[:, None], x[token], 0), send_sizes, n, axis, native=native)
    recv_idx = ragged_exchange(send_idx + 1, send_sizes, n, axis, native=native)[0] - 1   # empty rows -> -1
    recv_w = ragged_exchange(send_w, send_sizes, n, axis, native=native)[0]
    return recv_x, recv_idx, recv_w, RaggedHandle(token, valid, send_sizes, recv_sizes, n, native)


def ragged_combine(y: Float[Array, "Rn D"], handle: RaggedHandle, axis: str = AXIS) -> Float[Array, "n D"]:
    """Send each received row's expert output back to its source and sum per token."""
    back, _ = ragged_exchange(y, handle.recv_sizes, handle.num_tokens, axis, native=handle.native)
    rows = jnp.where(handle.valid, handle.token, handle.num_tokens)
    return jnp.zeros((handle.num_tokens,) + y.shape[1:], y.dtype).at[rows].add(back, mode="drop")


# ---- low-latency mode -------------------------------------------------------------------------------

def quantize_1x128(x: Float[Array, "M D"]) -> tuple[Array, Float[Array, "M G"]]:
    """Per-token e4m3 with one scale per 128 columns (a whole row when D < 128)."""
    M, D = x.shape
    group = 128 if D % 128 == 0 else D
    xg = x.astype(jnp.float32).reshape(M, D // group, group)
    scale = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1), 1e-4) / FP8_MAX
    q = (xg / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(M, D)
    return q, scale


def dequantize_1x128(q, scale) -> Float[Array, "M D"]:
    M, D = q.shape
    groups = scale.shape[-1]
    return (q.astype(jnp.float32).reshape(M, groups, D // groups) * scale[..., None]).reshape(M, D)


@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    topk_idx: Int[Array, "n k"]
    num_tokens: int


jax.tree_util.register_dataclass(LowLatencyHandle, data_fields=["topk_idx"], meta_fields=["num_tokens"])


def _send_rows(xp: Float[Array, "M D"], hit: Bool[Array, "R El M"], axis: str) -> Float[Array, "R El M D"]:
    """Row m to each (rank, local expert) it hits; the result's block s came from rank s (zeros elsewhere)."""
    return _exchange(jnp.where(hit[..., None], xp[None, None], 0), axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _send_fp8(xp: Float[Array, "M D"], hit: Bool[Array, "R El M"], axis: str) -> Float[Array, "R El M D"]:
    """`_send_rows` with an e4m3 payload (1x128 scales), dequantised on arrival. Its backward is the
    full-precision send's (the gradients travel back unquantised, as DeepEP's combine carries them):
    differentiating through the cast and the amax scale would give the quantiser's derivative, not x's."""
    R, El, M = hit.shape
    q, scale = quantize_1x128(xp)
    send_q = jnp.where(hit[..., None], q[None, None], jnp.zeros((), q.dtype))
    send_s = jnp.where(hit[..., None], scale[None, None], 0)
    recv = jax.vmap(dequantize_1x128)(_exchange(send_q, axis).reshape(R * El, M, -1),
                                     _exchange(send_s, axis).reshape(R * El, M, -1))
    return recv.reshape(R, El, M, -1).astype(xp.dtype)


def _send_fp8_fwd(xp, hit, axis):
    return _send_fp8(xp, hit, axis), hit


def _send_fp8_bwd(axis, hit, g):             # the transpose of `_send_rows` (g has xp's dtype)
    return jnp.sum(jnp.where(hit[..., None], _exchange(g, axis), 0), axis=(0, 1)).astype(g.dtype), None


_send_fp8.defvjp(_send_fp8_fwd, _send_fp8_bwd)


def low_latency_dispatch(x: Float[Array, "n D"], topk_idx: Int[Array, "n k"], max_tokens_per_rank: int,
                         num_experts: int, *, fp8: bool = False, axis: str = AXIS):
    """Returns packed_recv_x [El, R*M, D] (token t of rank s at row s*M + t), counts [El], handle."""
    n, D = x.shape
    R = jax.lax.axis_size(axis)
    local, M = num_experts // R, max_tokens_per_rank
    if n > M:
        raise ValueError(f"{n} tokens on a rank exceed max_tokens_per_rank={M}; raise the buffer size")
    hit = jnp.any(topk_idx[:, :, None] == jnp.arange(num_experts), axis=1)                 # [n, E]
    hit = jnp.pad(hit, ((0, M - n), (0, 0))).T.reshape(R, local, M)                        # [R, El, M]
    xp = jnp.pad(x, ((0, M - n), (0, 0)))
    recv = (_send_fp8 if fp8 else _send_rows)(xp, hit, axis)                                 # [R(src), El, M, D]
    counts = jnp.sum(_exchange(hit, axis), axis=(0, 2))
    packed = recv.transpose(1, 0, 2, 3).reshape(local, R * M, D)
    return packed, counts.astype(jnp.int32), LowLatencyHandle(topk_idx, n)


def low_latency_combine(y: Float[Array, "El RM D"], topk_weights: Float[Array, "n k"], handle: LowLatencyHandle,
                        axis: str = AXIS) -> Float[Array, "n D"]:
    """Weighted combine: out[t] = sum_j w[t, j] * y(expert topk_idx[t, j], token t)."""
    local, RM, D = y.shape
    R = jax.lax.axis_size(axis)
    M = RM // R
    back = _exchange(y.reshape(local, R, M, D).transpose(1, 0, 2, 3), axis)                # [R(dest), El, M, D]
    per_expert = back.reshape(R * local, M, D)                                              # global expert id
    idx = handle.topk_idx
    rows = per_expert[jnp.maximum(idx, 0), jnp.arange(handle.num_tokens)[:, None]]          # [n, k, D]
    w = jnp.where(idx >= 0, topk_weights, 0).astype(rows.dtype)
    return jnp.einsum("nk,nkd->nd", w, rows)


def _dense_local_experts(x: Float[Array, "El T D"], w_gate, w_up, w_down) -> Float[Array, "El T D"]:
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", x, w_gate)) * jnp.einsum("etd,edf->etf", x, w_up)
    return jnp.einsum("etf,efd->etd", h, w_down)


# ---- the EP MoE layer -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EPOptions:
    mode: Literal["normal", "low_latency"] = "normal"
    # normal mode's exchange: "ragged" (ragged_all_to_all; emulated with all_to_all on CPU), "padded"
    # (fixed blocks through all_to_all, custom_vjp pair), "auto": ragged on accelerators, padded on CPU
    exchange: Literal["auto", "ragged", "padded"] = "auto"
    fp8: bool = False                          # low-latency FP8 payload (the experts' GEMMs follow cfg.fp8)
    max_tokens_per_rank: int | None = None     # low-latency buffer rows (default: tokens per rank)


def _token_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "expert") if a in mesh.axis_names)


def ep_routed_experts(x: Float[Array, "N D"], topk_idx: Int[Array, "N k"], topk_weights: Float[Array, "N k"],
                      w_gate, w_up, w_down, *, mesh=None, options: EPOptions = EPOptions(),
                      fp8: bool = False) -> Float[Array, "N D"]:
    """Routed experts with E (physical) experts sharded over the mesh's `expert` axis.

    Tokens are split over (data, expert); expert weights [E, ...] over `expert`. fp8: the local experts'
    GEMMs in FP8 (V3 recipe, DeepGEMM's contiguous layout).
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    R = sizes.get("expert", 1)
    E = w_gate.shape[0]
    if E % R:
        raise ValueError(f"{E} physical experts do not divide over expert axis of size {R}")
    extra = {a: s for a, s in sizes.items() if a not in ("data", "expert") and s > 1}
    if extra:
        raise ValueError(f"expert parallelism shards tokens over (data, expert); mesh axes {extra} must be 1 here")
    shards = int(np.prod([sizes[a] for a in _token_axes(mesh)]))
    if x.shape[0] % shards:
        raise ValueError(f"{x.shape[0]} tokens do not divide over the {shards} (data x expert) shards")
    tokens = P(_token_axes(mesh))
    weights = P("expert")

    exchange = options.exchange
    if exchange == "auto":
        exchange = "padded" if jax.default_backend() == "cpu" else "ragged"
    native = jax.default_backend() != "cpu"

    def local(x, idx, w, wg, wu, wd):
        if options.mode == "normal" and exchange == "ragged":
            recv_x, recv_idx, recv_w, handle = ragged_dispatch(x, idx, w, E, native=native)
            return ragged_combine(moe_lib.grouped_experts(recv_x, recv_idx, recv_w, wg, wu, wd, fp8=fp8), handle)
        if options.mode == "normal":
            recv_x, recv_idx, recv_w, _, handle = dispatch(x, idx, w, E)
            R_, n, D = recv_x.shape
            y = moe_lib.grouped_experts(recv_x.reshape(R_ * n, D), recv_idx.reshape(R_ * n, -1),
                                        recv_w.reshape(R_ * n, -1), wg, wu, wd, fp8=fp8)
            return combine(y.reshape(R_, n, D), handle)
        M = options.max_tokens_per_rank or x.shape[0]
        packed, _, handle = low_latency_dispatch(x, idx, M, E, fp8=options.fp8)
        y = (fp8_lib.batched_swiglu if fp8 else _dense_local_experts)(packed, wg, wu, wd)
        return low_latency_combine(y, w, handle)

    f = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, weights, weights, weights),
                      out_specs=tokens, check_vma=False)
    return f(x, topk_idx, topk_weights, w_gate, w_up, w_down)


def ep_moe(p: moe_lib.MoE, x: Float[Array, "N D"], r: moe_lib.Routing, cfg: ModelConfig, *, mesh=None,
           options: EPOptions = EPOptions(), placement=None) -> Float[Array, "N D"]:
    """The routed part of a DeepSeekMoE layer under expert parallelism.

    r: routing onto the layer's experts, physical slots when it holds them (`moe.physical_routing`).
    placement: optional (phy2log [P], log2phy [E, C], logcnt [E]) of one layer (EPLB) for a layer of
    E logical experts; physical expert weights are gathered from the logical ones, so their
    gradients flow back to them.
    """
    wg, wu, wd = moe_lib.expert_weights(p, cfg)
    idx = r.experts
    if placement is not None:
        if moe_lib.has_slots(p):
            raise ValueError("the layer already holds physical expert slots; pass placement=None")
        phy2log, log2phy, logcnt = (jnp.asarray(a) for a in placement)
        wg, wu, wd = wg[phy2log], wu[phy2log], wd[phy2log]
        idx = logical_to_physical(idx, log2phy, logcnt, jnp.arange(idx.shape[0]))
    return ep_routed_experts(x, idx, r.weights, wg, wu, wd, mesh=mesh, options=options, fp8=cfg.fp8)


_OPTIONS = EPOptions()


def set_options(options: EPOptions) -> None:
    """Mode / FP8 / buffer size used when the model's MoE layers run under an `expert` mesh axis."""
    global _OPTIONS
    _OPTIONS = options


moe_lib.set_expert_parallel(lambda p, x, r, cfg: ep_moe(p, x, r, cfg, options=_OPTIONS))
