import jax
import pytest
from flax import nnx

import model
from model import ModelConfig


@pytest.mark.parametrize("field, value, words", [
    ("kv_lora_rank", 0, "kv_lora_rank"),
    ("num_expert_groups", 3, "divisible by num_expert_groups"),
    ("num_experts_per_tok", 17, "top-k must be in"),
    ("num_experts_per_tok", 9, "kept groups"),
    ("num_limited_groups", 5, "num_limited_groups"),
    ("q_lora_rank", 0, "q_lora_rank"),
    ("qk_rope_head_dim", 15, "even"),
    ("num_dense_layers", 5, "num_dense_layers"),
    ("score_func", "relu", "score_func"),
])
def test_invalid_config_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=words) as err:
        ModelConfig.preset("tiny", **{field: value})
    assert f"ModelConfig.{field}" in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("deepseek-v4")


def test_presets_construct_and_are_frozen():
    for name in model.PRESETS:
        cfg = ModelConfig.preset(name)
        with pytest.raises(Exception):
            cfg.d_model = 1


def _abstract_counts(name):
    cfg = ModelConfig.preset(name)
    abstract = nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0)))
    total = model.param_count(nnx.state(abstract, nnx.Param))
    mtp = model.param_count(nnx.state(abstract.mtp, nnx.Param)) if cfg.mtp_depth else 0
    return total - mtp, mtp, abstract


def test_deepseek_v3_671b_abstract_parameter_count(report):
    main, mtp, abstract = _abstract_counts("deepseek-v3")
    report(f"deepseek-v3 (abstract, eval_shape): {main:,} main parameters + {mtp:,} in the MTP module "
           f"(which shares the embedding and head)")
    # transformers' DeepseekV3ForCausalLM at the V3 config has 671,026,419,200 parameters, of which
    # 58 x 256 are the fp32 e_score_correction_bias buffers that we keep outside nnx.Param.
    assert main == 671_026_419_200 - 58 * 256
    assert 11e9 < mtp < 12e9
    leaf = jax.tree.leaves(nnx.state(abstract))[0]
    assert isinstance(leaf, jax.ShapeDtypeStruct)        # nothing materialised


def test_v2_lite_and_tiny_sizes():
    main, _, _ = _abstract_counts("deepseek-v2-lite")
    assert 15.5e9 < main < 16e9
    main, mtp, _ = _abstract_counts("tiny")
    assert 1e6 < main + mtp < 10e6
