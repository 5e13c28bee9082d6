"""Tiny random Hugging Face DeepSeek-V2/V3 models, used as the independent reference."""

from __future__ import annotations

import torch
import transformers

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def tiny_v3(seed: int, *, q_lora: int | None = 24, groups: int = 4, topk_group: int = 2, yarn=YARN):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=groups,
        topk_group=topk_group, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=q_lora, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(yarn) if yarn else dict(rope_type="default", rope_theta=10000.0),
        max_position_embeddings=128, initializer_range=0.1)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(cfg.n_routed_experts))
    return model


def tiny_v2(seed: int, *, topk_method: str = "group_limited_greedy", yarn=YARN):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method=topk_method, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=1.5,
        rope_parameters=dict(yarn, mscale=0.707, mscale_all_dim=0.707) if yarn else None,
        max_position_embeddings=128, initializer_range=0.1)
    return transformers.DeepseekV2ForCausalLM(cfg).eval()


def hf_logits(model, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
