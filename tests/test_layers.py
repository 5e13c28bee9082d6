"""RMSNorm and YaRN rope against independent formulations."""

import numpy as np
import pytest

import jax.numpy as jnp

from model import ModelConfig, YarnConfig
from model.norm import rms_norm
from model.rope import apply_rope, inv_frequencies, rope_tables


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=16).astype(np.float32)
    want = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=40, original_max_position=4096),
                                  YarnConfig(factor=4, original_max_position=32, mscale=0.707, mscale_all_dim=0.707)])
def test_inv_frequencies_match_transformers(yarn):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = dict(rope_type="default", rope_theta=10000.0)
    if yarn:
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=yarn.factor, beta_fast=yarn.beta_fast,
                    beta_slow=yarn.beta_slow, original_max_position_embeddings=yarn.original_max_position,
                    mscale=yarn.mscale, mscale_all_dim=yarn.mscale_all_dim)
    hf_cfg = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=rope, max_position_embeddings=163840)
    if yarn:
        inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, torch.device("cpu"))
        assert yarn.attention_factor == pytest.approx(factor, rel=1e-12)
    else:
        inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    np.testing.assert_allclose(inv_frequencies(64, 10000.0, yarn), inv.numpy(), rtol=1e-6)


def test_v3_softmax_scale():
    cfg = ModelConfig.preset("deepseek-v3")
    m = 0.1 * 1.0 * np.log(40.0) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs():
    cfg = ModelConfig.preset("tiny", rope_scaling=YarnConfig(factor=4, original_max_position=64))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3, cfg.qk_rope_head_dim)).astype(np.float32)
    pos = np.stack([np.arange(7), np.arange(7) + 100])
    cos, sin = rope_tables(jnp.asarray(pos), cfg)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    freqs = pos[..., None] * inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    rot = np.exp(1j * freqs)[:, :, None, :] * cfg.rope_scaling.attention_factor
    want = x[..., 0::2] + 1j * x[..., 1::2]
    want = want * rot
    np.testing.assert_allclose(got[..., 0::2], want.real, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[..., 1::2], want.imag, rtol=1e-4, atol=1e-5)
