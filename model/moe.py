"""DeepSeekMoE (DeepSeek-V3 §2.1.2): fine-grained routed experts + shared experts, dropless.

Letters: N tokens (B*T flattened), D d_model, E routed experts, G expert groups, k top-k,
F expert hidden size.

Routing: sigmoid (V3) or softmax (V2) scores in float32; the bias (aux-loss-free balancing)
enters expert *selection* only; group-limited routing keeps the best `num_limited_groups`
groups (group score = sum of its top-2 scores, or its max for V2); the chosen scores are
optionally normalised and multiplied by the route scale.

Expert compute is dropless: token copies are sorted by expert and run through grouped
matmuls (`jax.lax.ragged_dot`), so no token is ever dropped and no capacity is set.

Redundant experts (EPLB, sharding/eplb.py): a layer may hold its routed-expert weights as P >= E
physical slots (replicas are copies of their logical expert) together with `ExpertSlots`
(phy2log [P], log2phy [E, P-E+1] padded with -1, logcnt [E]). Routing stays logical; each
chosen expert is then mapped to one of its replicas, and the replicas' gradients are tied
(summed per logical expert and handed to every replica), so replicas stay copies under any
element-wise optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from model import fp8 as fp8_lib
from model.common import RouterBias, cast, param, silu_grad
from model.config import ModelConfig
from model.fp8 import project


class FFN(nnx.Module):
    """SwiGLU feed-forward: the dense layers' FFN and the shared experts."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        self.w_gate = param(rngs, cfg, (cfg.d_model, hidden), ("embed", "mlp"))
        self.w_up = param(rngs, cfg, (cfg.d_model, hidden), ("embed", "mlp"))
        self.w_down = param(rngs, cfg, (hidden, cfg.d_model), ("mlp", "embed"))


def ffn(p: FFN, x: Float[Array, "... D"], cfg: ModelConfig) -> Float[Array, "... D"]:
    gate = project(x, cast(p.w_gate, cfg), fp8=cfg.fp8)                               # [..., F]
    up = project(x, cast(p.w_up, cfg), fp8=cfg.fp8)
    return project(jax.nn.silu(gate) * up, cast(p.w_down, cfg), fp8=cfg.fp8)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, D, F = cfg.num_routed_experts, cfg.d_model, cfg.moe_ffn_dim
        self.router = param(rngs, cfg, (D, E), ("embed", "experts"), dtype="float32")
        if cfg.router_bias:
            self.bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=("experts",), eager_sharding=False)
        self.w_gate = param(rngs, cfg, (E, D, F), ("experts", "embed", "moe_mlp"))
        self.w_up = param(rngs, cfg, (E, D, F), ("experts", "embed", "moe_mlp"))
        self.w_down = param(rngs, cfg, (E, F, D), ("experts", "moe_mlp", "embed"))
        if cfg.num_shared_experts > 0:
            self.shared = FFN(cfg, cfg.moe_ffn_dim * cfg.num_shared_experts, rngs=rngs)


class ExpertSlots(nnx.Variable):
    """An EPLB placement of one layer's physical expert slots (integers; never trained)."""


def has_slots(p: MoE) -> bool:
    """Whether the layer holds physical expert slots (an EPLB placement) rather than E logical experts."""
    return hasattr(p, "phy2log")


@dataclasses.dataclass(frozen=True)
class Routing:
    weights: Float[Array, "N k"]     # gate values applied to expert outputs
    experts: Int[Array, "N k"]       # chosen routed experts
    scores: Float[Array, "N E"]      # affinity scores (sigmoid or softmax), float32


jax.tree_util.register_dataclass(Routing, data_fields=["weights", "experts", "scores"], meta_fields=[])


def group_limit(choice: Float[Array, "N E"], cfg: ModelConfig) -> Float[Array, "N E"]:
    """Keep the best `num_limited_groups` groups of experts; others become -inf."""
    G = cfg.num_expert_groups
    if G == 1:
        return choice
    grouped = choice.reshape(choice.shape[0], G, -1)                          # [N, G, E/G]
    if cfg.group_score == "top2_sum":
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)         # [N, G]
    else:
        group_scores = jnp.max(grouped, axis=-1)
    _, kept = jax.lax.top_k(group_scores, cfg.num_limited_groups)             # [N, topk_group]
    keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(choice.shape[0])[:, None], kept].set(True)
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(choice.shape)


def route(logits: Float[Array, "N E"], bias: Float[Array, " E"] | None, cfg: ModelConfig) -> Routing:
    with jax.named_scope("moe/route"):
        logits = logits.astype(jnp.float32)
        scores = jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        choice = scores if bias is None else scores + bias                # bias: selection only
        _, experts = jax.lax.top_k(group_limit(choice, cfg), cfg.num_experts_per_tok)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, experts, scores)


def _sort_copies(experts: Int[Array, "N k"], num_experts: int):
    """The N*k token copies sorted by expert, empty slots (-1) last: the sorted copies' experts
    (num_experts for an empty slot), the sort order, each sorted copy's token, copies per expert."""
    flat = jnp.where(experts < 0, num_experts, experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return flat[order], order, order // experts.shape[1], sizes


def _combine(x: Float[Array, "N D"], ys: Float[Array, "Nk D"], experts, weights, order, token) -> Float[Array, "N D"]:
    """Each token's sum of its sorted copies' outputs ys, weighted by its routing weights."""
    slot_weight = jnp.where(experts < 0, 0, weights).reshape(-1)[order]
    return jnp.zeros_like(x).at[token].add(ys * slot_weight[:, None].astype(ys.dtype))


def fp8_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                w_gate, w_up, w_down) -> Float[Array, "N D"]:
    """Dropless SwiGLU experts with FP8 GEMMs (V3 §3.3; `model.fp8.grouped_swiglu`).

    Token copies go into DeepGEMM's contiguous layout: sorted by expert, each expert's run starting
    on a multiple of 128 rows, zero rows between; at most N*k + G*127 rows, rounded to 128.
    """
    N, k = experts.shape
    G, D = w_gate.shape[0], x.shape[1]
    rows = -(-(N * k + G * (fp8_lib.BLOCK - 1)) // fp8_lib.BLOCK) * fp8_lib.BLOCK
    with jax.named_scope("moe/permute"):
        expert, order, token, sizes = _sort_copies(experts, G)           # empty slots sort last, unrun
        padded = -(-sizes // fp8_lib.BLOCK) * fp8_lib.BLOCK
        padded_start = jnp.cumsum(padded) - padded
        expert_c = jnp.minimum(expert, G - 1)
        rank = jnp.arange(N * k) - (jnp.cumsum(sizes) - sizes)[expert_c]    # position inside its expert
        dest = jnp.where(expert < G, padded_start[expert_c] + rank, rows)  # rows: dropped (empty slot)
        xs = jnp.zeros((rows, D), x.dtype).at[dest].set(x[token], mode="drop")
        tile_group = fp8_lib.tile_groups(padded, rows)                     # past the last run: -1
    with jax.named_scope("moe/experts_fp8"):
        ys = fp8_lib.grouped_swiglu(xs, tile_group, w_gate, w_up, w_down)
    with jax.named_scope("moe/unpermute"):                         # empty slots: a filled 0 row, weight 0
        return _combine(x, jnp.take(ys, dest, axis=0, mode="fill", fill_value=0), experts, weights, order, token)


def grouped_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                    w_gate, w_up, w_down, *, fp8: bool = False) -> Float[Array, "N D"]:
    """Dropless SwiGLU experts, weighted and summed per token.

    experts[n, j] in [0, G) picks one of the G experts of w_* ([G, D, F], [G, D, F], [G, F, D]);
    -1 marks an empty slot (expert parallelism: that expert lives on another rank). Grouped GEMMs
    (`ragged_experts`) on accelerators. XLA:CPU has none, so there the cheaper (by rows of work,
    known from static shapes) of `looped_experts` and `dense_experts` runs.
    """
    if fp8:
        return fp8_experts(x, experts, weights, w_gate, w_up, w_down)
    if jax.default_backend() != "cpu":
        return ragged_experts(x, experts, weights, w_gate, w_up, w_down)
    N, k = experts.shape
    G, tile = w_gate.shape[0], 32
    if N * k <= 8:                                  # decode at batch 1-2: read only the chosen experts
        return pairwise_experts(x, experts, weights, w_gate, w_up, w_down)
    tiled_rows = (-(-N * k // tile) + G) * tile
    impl = dense_experts if N * G <= tiled_rows else looped_experts
    return impl(x, experts, weights, w_gate, w_up, w_down)


def pairwise_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                     w_gate, w_up, w_down) -> Float[Array, "N D"]:
    """One (token, chosen expert) pair at a time, reading that expert's weights in place.

    For a handful of tokens (decode at batch 1-2) this reads k experts' weights a token instead of
    all G (`dense_experts`): on CPU, where reading the weights is the cost, about 1.3x faster a layer.
    """
    N, k = experts.shape
    expert = jnp.maximum(experts, 0).reshape(-1)
    weight = jnp.where(experts < 0, 0, weights).reshape(-1).astype(x.dtype)

    def pair(i, y):
        n, e = i // k, expert[i]
        xn = jax.lax.dynamic_slice_in_dim(x, n, 1)                                     # [1, D]
        yn = (jax.nn.silu(xn @ w_gate[e]) * (xn @ w_up[e])) @ w_down[e]
        return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, n, 1) + weight[i] * yn, n, 0)
    return jax.lax.fori_loop(0, N * k, pair, jnp.zeros_like(x))


def ragged_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                   w_gate, w_up, w_down) -> Float[Array, "N D"]:
    """Grouped-GEMM experts: sort token copies by expert, ragged_dot, unsort, weight."""
    N, k = experts.shape
    G = w_gate.shape[0]
    with jax.named_scope("moe/permute"):
        _, order, token, group_sizes = _sort_copies(experts, G)              # empty slots sort last
        xs = x[token]                                                         # [N*k, D]
    with jax.named_scope("moe/experts"):
        gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)                    # rows past the groups give 0
        up = jax.lax.ragged_dot(xs, w_up, group_sizes)
        ys = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)
    with jax.named_scope("moe/unpermute"):
        return _combine(x, ys, experts, weights, order, token)


def dense_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                  w_gate, w_up, w_down) -> Float[Array, "N D"]:
    """Every expert on every token, gated by a dense [N, G] weight matrix (zero where not chosen).

    Cheapest on CPU when there are few tokens (decode): N*G rows of work, no permutation.
    """
    N, k = experts.shape
    G = w_gate.shape[0]
    with jax.named_scope("moe/gates"):
        rows = jnp.broadcast_to(jnp.arange(N)[:, None], (N, k))
        gates = jnp.zeros((N, G + 1), weights.dtype).at[rows, jnp.where(experts < 0, G, experts)].add(weights)
    with jax.named_scope("moe/experts"):
        h = jax.nn.silu(jnp.einsum("nd,gdf->ngf", x, w_gate)) * jnp.einsum("nd,gdf->ngf", x, w_up)
        h = h * gates[:, :G, None].astype(h.dtype)
        return jnp.einsum("ngf,gfd->nd", h, w_down)


def looped_experts(x: Float[Array, "N D"], experts: Int[Array, "N k"], weights: Float[Array, "N k"],
                   w_gate, w_up, w_down, tile: int = 32) -> Float[Array, "N D"]:
    """Grouped GEMM as a loop: token copies sorted by expert, each expert's rows in tiles of `tile`.

    XLA:CPU has no grouped GEMM (its `ragged_dot` computes every group for every row). Here a loop
    over experts runs a dynamic number of tiles each, reading the expert's weights in place, so the
    work is the routed rows plus at most one partial tile per expert, and nothing of weight size is
    gathered or materialised per tile. The backward pass (`_expert_loop` custom_vjp) is the same loop
    accumulating each expert's weight gradient in a carry. Static shapes, dropless.
    """
    N, k = experts.shape
    G = w_gate.shape[0]
    with jax.named_scope("moe/permute"):
        _, order, token, sizes = _sort_copies(experts, G)                  # empty slots sort last, unrun
        starts = jnp.cumsum(sizes) - sizes
        xs = jnp.concatenate([x[token], jnp.zeros((tile, x.shape[1]), x.dtype)])   # a tile of slack
    with jax.named_scope("moe/experts"):
        ys = _expert_loop(xs, starts, sizes, w_gate, w_up, w_down, tile)[:N * k]
    with jax.named_scope("moe/unpermute"):
        return _combine(x, ys, experts, weights, order, token)


def _tile_rows(start, size, j: Array, tile: int) -> tuple[Array, Array]:
    """Offset of tile j of an expert's rows and the mask of the rows that are its own."""
    return start + j * tile, (jnp.arange(tile) < size - j * tile)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _expert_loop(xs, starts, sizes, w_gate, w_up, w_down, tile: int):
    """ys[r] = SwiGLU_e(xs[r]) for the rows r of each expert e ([starts[e], starts[e] + sizes[e])).

    Experts run in order; a tile's rows past its expert are written as 0 and rewritten by the next
    expert, so every row ends with its own expert's output (rows past the last expert stay 0).
    Gate and up run as one [D, 2F] matmul; the backward pass reuses the forward's pre-activations.
    """
    return _expert_loop_fwd(xs, starts, sizes, w_gate, w_up, w_down, tile)[0]


def _expert_loop_fwd(xs, starts, sizes, w_gate, w_up, w_down, tile):
    F = w_gate.shape[2]
    w_gu = jnp.concatenate([w_gate, w_up], axis=2)                                  # [G, D, 2F]

    def expert(e, carry):
        wgu, wd = w_gu[e], w_down[e]

        def body(j, carry):
            ys, pre = carry
            off, mine = _tile_rows(starts[e], sizes[e], j, tile)
            xt = jax.lax.dynamic_slice_in_dim(xs, off, tile)
            gu = xt @ wgu                                                            # [tile, 2F]
            yt = (jax.nn.silu(gu[:, :F]) * gu[:, F:]) @ wd
            return (jax.lax.dynamic_update_slice_in_dim(ys, jnp.where(mine, yt, 0).astype(ys.dtype), off, 0),
                    jax.lax.dynamic_update_slice_in_dim(pre, gu.astype(pre.dtype), off, 0))
        return jax.lax.fori_loop(0, (sizes[e] + tile - 1) // tile, body, carry)

    init = (jnp.zeros((xs.shape[0], w_down.shape[2]), xs.dtype), jnp.zeros((xs.shape[0], 2 * F), xs.dtype))
    ys, pre = jax.lax.fori_loop(0, w_gate.shape[0], expert, init)
    return ys, (xs, starts, sizes, w_gu, w_down, pre)


def _expert_loop_bwd(tile, res, dys):
    xs, starts, sizes, w_gu, w_down, pre = res
    F = w_down.shape[1]
    acc = jnp.promote_types(w_gu.dtype, jnp.float32)

    def expert(e, carry):
        dxs, d_gu, d_down = carry
        wgu, wd = w_gu[e], w_down[e]

        def body(j, c):
            dxs, ggu, gd = c
            off, mine = _tile_rows(starts[e], sizes[e], j, tile)
            xt = jax.lax.dynamic_slice_in_dim(xs, off, tile)
            dyt = jnp.where(mine, jax.lax.dynamic_slice_in_dim(dys, off, tile), 0)   # others' rows: no grad
            gu = jax.lax.dynamic_slice_in_dim(pre, off, tile)
            a, b = gu[:, :F], gu[:, F:]
            s = jax.nn.silu(a)
            gd = gd + jnp.dot((s * b).T, dyt, preferred_element_type=acc)
            dh = dyt @ wd.T
            dgu = jnp.concatenate([dh * b * silu_grad(a), dh * s], axis=1).astype(xt.dtype)
            ggu = ggu + jnp.dot(xt.T, dgu, preferred_element_type=acc)
            return jax.lax.dynamic_update_slice_in_dim(dxs, (dgu @ wgu.T).astype(dxs.dtype), off, 0), ggu, gd

        zeros = (jnp.zeros(w_gu.shape[1:], acc), jnp.zeros(w_down.shape[1:], acc))
        dxs, ggu, gd = jax.lax.fori_loop(0, (sizes[e] + tile - 1) // tile, body, (dxs, *zeros))
        return dxs, d_gu.at[e].set(ggu.astype(d_gu.dtype)), d_down.at[e].set(gd.astype(d_down.dtype))

    init = (jnp.zeros_like(xs), jnp.zeros_like(w_gu), jnp.zeros_like(w_down))
    dxs, d_gu, d_down = jax.lax.fori_loop(0, w_gu.shape[0], expert, init)
    return dxs, None, None, d_gu[:, :, :F], d_gu[:, :, F:], d_down


_expert_loop.defvjp(_expert_loop_fwd, _expert_loop_bwd)


# ---- redundant experts (physical slots) -------------------------------------------------------------

def logical_to_physical(topk_idx: Int[Array, "N k"], log2phy: Int[Array, "E C"], logcnt: Int[Array, " E"],
                        token_ids: Int[Array, " N"]) -> Int[Array, "N k"]:
    """Pick a replica of each chosen logical expert: replica (token + slot) mod its replica count."""
    k = topk_idx.shape[1]
    replica = (token_ids[:, None] + jnp.arange(k)) % logcnt[topk_idx]
    return log2phy[topk_idx, replica]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tie_replicas(w: Float[Array, "P ..."], phy2log: Int[Array, " P"], num_experts: int) -> Float[Array, "P ..."]:
    """Identity forward; backward gives every replica the summed gradient of its logical expert."""
    return w


def _tie_fwd(w, phy2log, num_experts):
    return w, phy2log


def _tie_bwd(num_experts, phy2log, g):
    logical = jax.ops.segment_sum(g.astype(jnp.float32), phy2log, num_segments=num_experts)   # [E, ...]
    return logical[phy2log].astype(g.dtype), None


tie_replicas.defvjp(_tie_fwd, _tie_bwd)


def expert_weights(p: MoE, cfg: ModelConfig) -> tuple[Array, Array, Array]:
    """The routed experts' (w_gate, w_up, w_down) in the compute dtype; [E, ...] or [P, ...] slots."""
    weights = cast(p.w_gate, cfg), cast(p.w_up, cfg), cast(p.w_down, cfg)
    if not has_slots(p):
        return weights
    return tuple(tie_replicas(w, p.phy2log[...], cfg.num_routed_experts) for w in weights)


def physical_routing(p: MoE, r: Routing) -> Routing:
    """Routing onto the layer's physical slots (unchanged when it holds none)."""
    if not has_slots(p):
        return r
    token = jnp.arange(r.experts.shape[0])
    return Routing(r.weights, logical_to_physical(r.experts, p.log2phy[...], p.logcnt[...], token), r.scores)


def routed_experts(p: MoE, x: Float[Array, "N D"], r: Routing, cfg: ModelConfig) -> Float[Array, "N D"]:
    """r holds physical expert ids when the layer has slots (see `physical_routing`)."""
    return grouped_experts(x, r.experts, r.weights, *expert_weights(p, cfg), fp8=cfg.fp8)


def sequence_balance_loss(r: Routing, batch: int, cfg: ModelConfig) -> Float[Array, ""]:
    """Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20), mean over sequences."""
    E, k = cfg.num_routed_experts, cfg.num_experts_per_tok
    scores = r.scores.reshape(batch, -1, E)                                   # [B, T, E]
    T = scores.shape[1]
    chosen = jax.nn.one_hot(r.experts.reshape(batch, T, k), E, dtype=jnp.float32).sum(axis=2)
    f = chosen.sum(axis=1) * (E / (k * T))                                    # [B, E]
    P = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)    # [B, E]
    return cfg.seq_aux_alpha * jnp.mean(jnp.sum(f * P, axis=-1))


# Expert parallelism plugs in here (sharding.ep registers itself on import); the model stays
# free of mesh code. Called as impl(p, x[N, D], routing, cfg) when the current mesh (jax.set_mesh)
# has an `expert` axis larger than one; the routing holds physical ids when the layer has slots.
_expert_parallel_impl: Callable | None = None


def set_expert_parallel(impl: Callable | None) -> None:
    global _expert_parallel_impl
    _expert_parallel_impl = impl


def _expert_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape).get("expert", 1) if mesh is not None and not mesh.empty else 1


def moe(p: MoE, x: Float[Array, "B T D"], cfg: ModelConfig, valid: Bool[Array, "B T"] | None = None):
    """Returns the layer output, per-expert token counts [E] (of the `valid` tokens only, when given:
    serving's bucket padding is routed but not counted) and the sequence balance loss."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    logits = jnp.einsum("nd,de->ne", flat.astype(jnp.float32), p.router[...])
    r = route(logits, p.bias[...] if cfg.router_bias else None, cfg)
    physical = physical_routing(p, r)
    if _expert_axis_size() > 1:
        if _expert_parallel_impl is None:
            raise RuntimeError("the mesh has an `expert` axis > 1: `import sharding` to enable expert parallelism")
        out = _expert_parallel_impl(p, flat, physical, cfg)
    else:
        out = routed_experts(p, flat, physical, cfg)
    if cfg.num_shared_experts > 0:
        with jax.named_scope("moe/shared"):
            out = out + ffn(p.shared, flat, cfg)
    real = None if valid is None else jnp.repeat(valid.reshape(-1).astype(jnp.int32), r.experts.shape[1])
    counts = jnp.bincount(r.experts.reshape(-1), weights=real, length=cfg.num_routed_experts)
    return out.reshape(B, T, D), counts, sequence_balance_loss(r, B, cfg)
