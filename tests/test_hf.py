"""Parity with transformers' DeepseekV3/V2ForCausalLM, checkpoint round trips, FP8 and error paths."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import model  # noqa: E402
from hf_reference import hf_logits, tiny_v2, tiny_v3  # noqa: E402

torch.set_num_threads(2)
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 24))
main_logits = nnx.jit(lambda m, t: m(t))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _ours(path, **kw):
    return np.asarray(main_logits(model.load_hf_checkpoint(path, **kw), jnp.asarray(TOKENS)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v3_parity_and_round_trip(seed, tmp_path, report):
    reference = tiny_v3(seed)
    reference.save_pretrained(tmp_path / "hf")
    want = hf_logits(reference, TOKENS)
    ours = model.load_hf_checkpoint(tmp_path / "hf")
    assert ours.cfg.rope_scaling is not None and ours.cfg.num_expert_groups == 4 and ours.cfg.router_bias
    got = np.asarray(main_logits(ours, jnp.asarray(TOKENS)))
    report(f"DeepseekV3 parity seed {seed}: logits relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-5
    model.save_hf_checkpoint(ours, tmp_path / "ours")                          # and back to transformers
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(again, TOKENS), want) < 1e-5


@pytest.mark.parametrize("kw", [dict(q_lora=None), dict(groups=1, topk_group=1, yarn=None)])
def test_v3_parity_variants(kw, tmp_path):
    reference = tiny_v3(5, **kw)
    reference.save_pretrained(tmp_path)
    assert rel_err(_ours(tmp_path), hf_logits(reference, TOKENS)) < 1e-5


@pytest.mark.parametrize("seed, method", [(0, "group_limited_greedy"), (1, "group_limited_greedy"), (2, "greedy")])
def test_v2_parity_and_round_trip(seed, method, tmp_path, report):
    reference = tiny_v2(seed, topk_method=method)
    reference.save_pretrained(tmp_path / "hf")
    want = hf_logits(reference, TOKENS)
    ours = model.load_hf_checkpoint(tmp_path / "hf")
    assert ours.cfg.score_func == "softmax" and not ours.cfg.router_bias
    err = rel_err(np.asarray(main_logits(ours, jnp.asarray(TOKENS))), want)
    report(f"DeepseekV2 parity seed {seed} ({method}): logits relative error {err:.2e}")
    assert err < 1e-5
    model.save_hf_checkpoint(ours, tmp_path / "ours")
    again = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(again, TOKENS), want) < 1e-5


def test_mtp_round_trip_and_sharded_save(tmp_path):
    cfg = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2,
                                   rope_scaling=model.YarnConfig(factor=4, original_max_position=16))
    ours = model.Transformer(cfg, rngs=nnx.Rngs(0))
    ours.moe_layers.ffn.bias.set_value(0.1 * jnp.arange(16.0)[None] - 0.8)
    model.save_hf_checkpoint(ours, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = model.load_hf_checkpoint(tmp_path)
    assert back.cfg == cfg
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    fwd = nnx.jit(lambda m, t: m.forward(t).mtp_logits)
    np.testing.assert_array_equal(fwd(ours, jnp.asarray(TOKENS)), fwd(back, jnp.asarray(TOKENS)))
    # transformers loads our export (it ignores the MTP layer, as it does DeepSeek's own)
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(hf_logits(reference, TOKENS), np.asarray(main_logits(ours, jnp.asarray(TOKENS)))) < 1e-5


def test_fp8_block_scaled_weights_are_dequantised(tmp_path):
    """A DeepSeek-style FP8 checkpoint (e4m3 + weight_scale_inv per 128x128 block) loads to the same model."""
    from safetensors.torch import load_file, save_file
    reference = tiny_v3(0)
    reference.save_pretrained(tmp_path / "bf")
    tensors = load_file(tmp_path / "bf" / "model.safetensors")
    quantised, dequantised = {}, {}
    for name, w in tensors.items():
        if name.endswith("_proj.weight") and w.ndim == 2:
            rows, cols = w.shape
            pad = torch.zeros((-(-rows // 128)) * 128, (-(-cols // 128)) * 128)
            pad[:rows, :cols] = w
            blocks = pad.reshape(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
            q = (blocks / scale[:, None, :, None]).reshape(pad.shape)[:rows, :cols].to(torch.float8_e4m3fn)
            quantised[name], quantised[name + "_scale_inv"] = q, scale
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
            dequantised[name] = q.float() * full
        else:
            quantised[name] = dequantised[name] = w
    (tmp_path / "fp8").mkdir()
    (tmp_path / "deq").mkdir()
    for d in ("fp8", "deq"):
        shutil.copy(tmp_path / "bf" / "config.json", tmp_path / d / "config.json")
    save_file(quantised, tmp_path / "fp8" / "model.safetensors")
    save_file(dequantised, tmp_path / "deq" / "model.safetensors")
    deq_ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq").eval()
    got = _ours(tmp_path / "fp8")
    assert rel_err(got, hf_logits(deq_ref, TOKENS)) < 1e-5
    assert rel_err(got, hf_logits(reference, TOKENS)) > 1e-4       # the quantisation was real


def test_missing_and_unknown_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_v3(0).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.1.mlp.mystery.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        model.load_hf_checkpoint(tmp_path)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in str(err.value)
    assert "model.layers.1.mlp.mystery.weight" in str(err.value)


def test_bad_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="deepseek_v2 and deepseek_v3"):
        model.load_hf_checkpoint(tmp_path)
