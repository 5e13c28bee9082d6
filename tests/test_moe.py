"""DeepSeekMoE routing and dropless experts against per-token / per-expert loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig
from model.moe import MoE, moe, route


def _route_reference(logits, bias, cfg: ModelConfig):
    """Per-token numpy routing, written from the DeepSeek-V3 report's equations."""
    logits = np.asarray(logits, np.float64)
    if cfg.score_func == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    E, G = cfg.num_routed_experts, cfg.num_expert_groups
    weights, experts = [], []
    for s in scores:
        choice = s + (bias if bias is not None else 0)
        per_group = E // G
        groups = [choice[g * per_group:(g + 1) * per_group] for g in range(G)]
        gscore = [np.sort(g)[-2:].sum() if cfg.group_score == "top2_sum" else g.max() for g in groups]
        kept = np.argsort(gscore, kind="stable")[::-1][:cfg.num_limited_groups]
        allowed = [e for e in range(E) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:cfg.num_experts_per_tok]
        w = s[chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        weights.append(w * cfg.routed_scaling_factor)
        experts.append(chosen)
    return np.array(weights), np.array(experts), scores


CONFIGS = {
    "v3": ModelConfig.preset("tiny"),
    "v3_no_groups": ModelConfig.preset("tiny", num_expert_groups=1, num_limited_groups=1),
    "v2_group_limited": ModelConfig.preset("tiny", score_func="softmax", group_score="max", router_bias=False,
                                           norm_topk_prob=False, routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_routing_matches_reference(name):
    cfg = CONFIGS[name]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, cfg.num_routed_experts)).astype(np.float32)
    bias = (0.3 * rng.normal(size=cfg.num_routed_experts)).astype(np.float32) if cfg.router_bias else None
    r = route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias), cfg)
    w_ref, e_ref, s_ref = _route_reference(logits, bias, cfg)
    got_e = np.asarray(r.experts)
    order = np.argsort(got_e, 1)
    np.testing.assert_array_equal(np.take_along_axis(got_e, order, 1), np.sort(e_ref, 1))
    ref_order = np.argsort(e_ref, 1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), order, 1),
                               np.take_along_axis(w_ref, ref_order, 1), rtol=1e-5)
    np.testing.assert_allclose(r.scores, s_ref, rtol=1e-5)


def test_bias_changes_selection_not_weights():
    cfg = CONFIGS["v3"]
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(32, cfg.num_routed_experts)), jnp.float32)
    bias = jnp.zeros(cfg.num_routed_experts).at[3].set(10.0)       # force expert 3 in
    r = route(logits, bias, cfg)
    assert bool(jnp.all(jnp.any(r.experts == 3, axis=1)))
    scores = jax.nn.sigmoid(logits)
    raw = jnp.take_along_axis(scores, r.experts, axis=1)
    np.testing.assert_allclose(r.weights, raw / raw.sum(1, keepdims=True) * cfg.routed_scaling_factor, rtol=1e-6)


@pytest.mark.parametrize("name", ["v3", "v2_group_limited"])
def test_moe_layer_equals_per_expert_loop(name):
    cfg = CONFIGS[name].replace(d_model=32, moe_ffn_dim=16)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    if cfg.router_bias:
        layer.bias.set_value(0.05 * jax.random.normal(jax.random.key(3), (cfg.num_routed_experts,)))
    x = jax.random.normal(jax.random.key(1), (2, 9, cfg.d_model))
    out, counts, aux = moe(layer, x, cfg)

    flat = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    logits = flat @ np.asarray(layer.router[...], np.float64)
    bias = np.asarray(layer.bias[...]) if cfg.router_bias else None
    w, e, _ = _route_reference(logits, bias, cfg)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    wg, wu, wd = (np.asarray(getattr(layer, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))
    want = np.zeros_like(flat)
    for expert in range(cfg.num_routed_experts):                 # per-expert loop over its tokens
        tok, slot = np.nonzero(e == expert)
        h = silu(flat[tok] @ wg[expert]) * (flat[tok] @ wu[expert])
        np.add.at(want, tok, (h @ wd[expert]) * w[tok, slot][:, None])
    sg, su, sd = (np.asarray(getattr(layer.shared, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))
    want += (silu(flat @ sg) * (flat @ su)) @ sd
    np.testing.assert_allclose(np.asarray(out).reshape(-1, cfg.d_model), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(counts, np.bincount(e.ravel(), minlength=cfg.num_routed_experts))
    assert int(counts.sum()) == 18 * cfg.num_experts_per_tok          # dropless: every copy computed


def test_sequence_balance_loss_formula():
    cfg = CONFIGS["v3"].replace(d_model=32, moe_ffn_dim=16, seq_aux_alpha=0.01)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 11, cfg.d_model))
    _, _, aux = moe(layer, x, cfg)
    E, k = cfg.num_routed_experts, cfg.num_experts_per_tok
    flat = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    _, e, s = _route_reference(flat @ np.asarray(layer.router[...], np.float64), None, cfg)
    losses = []
    for b in range(3):
        eb, sb = e[b * 11:(b + 1) * 11], s[b * 11:(b + 1) * 11]
        f = np.bincount(eb.ravel(), minlength=E) * E / (k * 11)
        p = (sb / sb.sum(1, keepdims=True)).mean(0)
        losses.append(cfg.seq_aux_alpha * (f * p).sum())
    assert float(aux) == pytest.approx(np.mean(losses), rel=1e-5)


def test_moe_gradients_flow_to_experts_and_router():
    cfg = CONFIGS["v3"].replace(d_model=32, moe_ffn_dim=16)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))

    def loss(m):
        out, _, aux = moe(m, x, cfg)
        return jnp.sum(out ** 2) + aux

    grads = nnx.grad(loss)(layer)
    assert float(jnp.abs(grads.w_gate[...]).sum()) > 0
    assert float(jnp.abs(grads.router[...]).sum()) > 0
    assert "bias" not in grads                          # the routing bias is not a gradient-trained param


def test_ragged_and_looped_expert_paths_agree():
    """The accelerator path (sort + ragged_dot) and the CPU paths (looped, dense, pairwise) agree, with gradients
    (the looped path's backward is its own custom_vjp)."""
    from model.moe import dense_experts, looped_experts, pairwise_experts, ragged_experts
    cfg = CONFIGS["v3"].replace(d_model=32, moe_ffn_dim=16)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (40, cfg.d_model))
    r = route(jnp.einsum("nd,de->ne", x, layer.router[...]), None, cfg)
    experts = r.experts.at[::3, 1].set(-1)                               # empty slots (EP) too
    args = (x, experts, r.weights, layer.w_gate[...], layer.w_up[...], layer.w_down[...])
    ragged, looped = ragged_experts(*args), looped_experts(*args, tile=8)
    np.testing.assert_allclose(ragged, looped, rtol=1e-5, atol=1e-6)
    g_r = jax.grad(lambda *a: jnp.sum(ragged_experts(*a) ** 2), argnums=(0, 2, 3, 4, 5))(*args)
    g_l = jax.grad(lambda *a: jnp.sum(looped_experts(*a, tile=8) ** 2), argnums=(0, 2, 3, 4, 5))(*args)
    for a, b in zip(g_r, g_l):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dense_experts(*args), ragged, rtol=1e-5, atol=1e-6)
    few = tuple(a[:2] for a in args[:3]) + args[3:]                                  # 2 tokens: decode
    np.testing.assert_allclose(pairwise_experts(*few), ragged_experts(*few), rtol=1e-5, atol=1e-6)
    g_p = jax.grad(lambda *a: jnp.sum(pairwise_experts(*a) ** 2), argnums=(0, 2, 3, 4, 5))(*few)
    g_r = jax.grad(lambda *a: jnp.sum(ragged_experts(*a) ** 2), argnums=(0, 2, 3, 4, 5))(*few)
    for a, b in zip(g_r, g_p):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
