"""The named mesh, the rules table, and the model sharded over 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
import sharding
from multiprocess import run_processes
from sharding import DEFAULT_RULES, FSDP_RULES, ShardingRules, make_mesh

CFG = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2, init_std=0.1)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 16))


def test_make_mesh_sizes():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, expert=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "pipe": 1, "expert": 2, "tensor": 2}
    assert dict(make_mesh(expert=4).shape)["data"] == 2
    with pytest.raises(ValueError, match="multiply to"):
        make_mesh(data=2, expert=2)
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(expert=3)
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh(data=-1, expert=-1)


def test_rules_reject_collisions_and_duplicates():
    rules = DEFAULT_RULES.replace(moe_mlp="expert")
    with pytest.raises(ValueError, match="both map to mesh axis 'expert'"):
        rules.spec(("experts", "embed", "moe_mlp"), name="w_gate")
    with pytest.raises(ValueError, match="more than once"):
        ShardingRules((("embed", "data"), ("embed", None)))
    with pytest.raises(ValueError, match="no sharding rule"):
        DEFAULT_RULES.spec(("nonsense",))


def test_every_parameter_has_a_rule():
    abstract = nnx.eval_shape(lambda: model.Transformer(model.ModelConfig.preset("deepseek-v3"), rngs=nnx.Rngs(0)))
    mesh = make_mesh(data=1, expert=8)
    shardings = sharding.state_shardings(abstract, mesh, FSDP_RULES)
    specs = {".".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}
    P = jax.sharding.PartitionSpec
    assert specs["moe_layers.ffn.w_gate"] == P(None, "expert", "data", "tensor")   # [layers, E, D, F]
    assert specs["embed"] == P("tensor", "data")                                     # [vocab, D]
    assert specs["moe_layers.attn.w_uk"] == P(None, None, "tensor", None)            # [layers, C, H, K]


def test_indivisible_dimension_is_a_clear_error():
    m = model.Transformer(CFG.replace(num_routed_experts=12, num_expert_groups=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by mesh axes"):
        sharding.shard_model(m, make_mesh(expert=8), DEFAULT_RULES)


@pytest.fixture(scope="module")
def reference():
    m = model.Transformer(CFG, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, t: m.forward(t))(m, jnp.asarray(TOKENS))
    return out


@pytest.mark.parametrize("mesh_kw, rules", [
    (dict(data=8), DEFAULT_RULES),                       # data parallel
    (dict(data=8), FSDP_RULES),                          # FSDP: parameters sharded over data too
    (dict(data=2, expert=2, tensor=2), FSDP_RULES),      # data x expert x tensor
])
def test_sharded_model_matches_single_device(reference, mesh_kw, rules):
    mesh = make_mesh(**mesh_kw)
    m = sharding.shard_model(model.Transformer(CFG, rngs=nnx.Rngs(0)), mesh, rules)
    w = m.moe_layers.ffn.w_gate[...]
    assert len(w.sharding.device_set) == 8
    if mesh_kw.get("expert", 1) > 1:
        assert w.addressable_shards[0].data.shape[1] == CFG.num_routed_experts // 2
    out = nnx.jit(lambda m, t: m.forward(t))(m, sharding.shard_batch(TOKENS, mesh, rules))
    for got, want in ((out.logits, reference.logits), (out.mtp_logits, reference.mtp_logits)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    np.testing.assert_array_equal(out.expert_counts, reference.expert_counts)


def test_two_processes_one_global_mesh():
    """jax.distributed over gloo: two processes x two CPU devices, FSDP over all four."""
    for text in run_processes("multihost_worker.py", timeout=240):
        assert "rel_err=" in text
