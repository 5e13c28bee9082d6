"""Multi-head Latent Attention (DeepSeek-V2 §2.1), naive and absorbed forms.

Letters: B batch, T query length, S key length, D d_model, H heads, K qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, Q q_lora_rank.

Naive form (training, prefill): expand the latent into per-head keys and values.
Absorbed form (decode): fold W_UK into the query and W_UV after attention, so attention runs
directly over the cached latent [S, C] and roped key [S, R] (576 values a token in V3). This
is the computation FlashMLA performs; the two forms agree to rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from model.common import cast, param
from model.config import ModelConfig
from model.fp8 import project
from model.norm import RMSNorm
from model.rope import apply_rope

Mask = Bool[Array, "B T S"]


@dataclasses.dataclass(frozen=True)
class SelfMask:
    """The mask of full-sequence self-attention (training, scoring) with what it was built from:
    the Pallas kernel (`cfg.attention == "pallas"`) masks from the segment ids and causality by
    index instead of reading `dense`. The two agree when positions count up by one inside each
    segment (as the packing loader and the default positions do)."""

    dense: Mask
    segment_ids: Int[Array, "B T"] | None = None


jax.tree_util.register_dataclass(SelfMask, data_fields=["dense", "segment_ids"], meta_fields=[])


def self_mask(positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None = None) -> SelfMask:
    """Causal (by position) self-attention inside each segment."""
    return SelfMask(causal_mask(positions, positions, segment_ids, segment_ids), segment_ids)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, C, R = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.wq = param(rngs, cfg, (D, H, cfg.qk_head_dim), ("embed", "heads", "qk_head"))
        else:
            self.wq_a = param(rngs, cfg, (D, cfg.q_lora_rank), ("embed", "q_lora"))
            self.q_norm = RMSNorm(cfg, cfg.q_lora_rank, "q_lora", rngs=rngs)
            self.wq_b = param(rngs, cfg, (cfg.q_lora_rank, H, cfg.qk_head_dim), ("q_lora", "heads", "qk_head"))
        self.wkv_a = param(rngs, cfg, (D, C), ("embed", "kv_lora"))
        self.wk_rope = param(rngs, cfg, (D, R), ("embed", "qk_rope"))
        self.kv_norm = RMSNorm(cfg, C, "kv_lora", rngs=rngs)
        self.w_uk = param(rngs, cfg, (C, H, cfg.qk_nope_head_dim), ("kv_lora", "heads", "qk_nope"))
        self.w_uv = param(rngs, cfg, (C, H, cfg.v_head_dim), ("kv_lora", "heads", "v_head"))
        self.wo = param(rngs, cfg, (H, cfg.v_head_dim, D), ("heads", "v_head", "embed"))


def queries(p: MLA, x: Float[Array, "B T D"], cos, sin, cfg: ModelConfig):
    """q_nope [B,T,H,K] and roped q_rope [B,T,H,R]."""
    with jax.named_scope("mla/q_proj"):
        if cfg.q_lora_rank is None:
            q = project(x, cast(p.wq, cfg), fp8=cfg.fp8)                             # [B,T,H,K+R]
        else:
            cq = p.q_norm(project(x, cast(p.wq_a, cfg), fp8=cfg.fp8))                # [B,T,Q]
            q = project(cq, cast(p.wq_b, cfg), fp8=cfg.fp8)
    q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, apply_rope(q_rope, cos, sin)


def latents(p: MLA, x: Float[Array, "B T D"], cos, sin, cfg: ModelConfig):
    """What the decode cache stores: normalised latent [B,T,C] and roped shared key [B,T,R]."""
    with jax.named_scope("mla/kv_proj"):
        ckv = p.kv_norm(project(x, cast(p.wkv_a, cfg), fp8=cfg.fp8))                 # [B,T,C]
        k_rope = project(x, cast(p.wk_rope, cfg), fp8=cfg.fp8)                       # [B,T,R]
    return ckv, apply_rope(k_rope, cos, sin)


def _softmax(scores: Float[Array, "B H T S"], mask: Mask) -> Float[Array, "B H T S"]:
    scores = jnp.where(mask[:, None], scores.astype(jnp.float32), -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)   # a row with nothing to attend gives zeros


def attend_naive(p: MLA, q_nope, q_rope, ckv, k_rope, mask: Mask | SelfMask,
                 cfg: ModelConfig) -> Float[Array, "B T D"]:
    with jax.named_scope("mla/attention_naive"):
        # kv_b (W_UK, W_UV): a linear layer, so FP8 under the V3 recipe; the attention core stays
        # in the compute dtype. The absorbed (inference) form folds these into q and out instead.
        k_nope = project(ckv, cast(p.w_uk, cfg), fp8=cfg.fp8)                        # [B,S,H,K]
        v = project(ckv, cast(p.w_uv, cfg), fp8=cfg.fp8)                             # [B,S,H,V]
        # One QK^T over [nope | rope] (the shared roped key broadcast to every head): the (q, k, v)
        # form of FlashAttention-style kernels (192 / 192 / 128 in V3), and in head-major layout
        # about 2x faster on XLA:CPU than two [B,T,H,*] einsums summed (fwd + bwd).
        H, R = q_rope.shape[2], q_rope.shape[3]
        q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)                # [B,T,H,K+R]
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_rope.shape[:2], H, R))
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)               # [B,S,H,K+R]
        if isinstance(mask, SelfMask) and cfg.attention == "pallas":
            from pallas_kernels.mla_attention import mla_attention
            bf16 = jnp.bfloat16
            out = mla_attention(q.astype(bf16), k.astype(bf16), v.astype(bf16), causal=True,
                                segment_ids=mask.segment_ids, softmax_scale=cfg.softmax_scale,
                                interpret=_INTERPRET[0]).astype(v.dtype)
        else:
            dense = mask.dense if isinstance(mask, SelfMask) else mask
            scores = jnp.einsum("bhtd,bhsd->bhts", q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3))
            probs = _softmax(scores * cfg.softmax_scale, dense).astype(v.dtype)
            out = jnp.einsum("bhts,bhsv->bhtv", probs, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    with jax.named_scope("mla/o_proj"):
        return project(out, cast(p.wo, cfg), contract=2, fp8=cfg.fp8)               # [B,T,D]


_INTERPRET = [False]      # tests: run the Pallas attention kernels in the GPU interpreter on CPU


def attend_absorbed(p: MLA, q_nope, q_rope, ckv_cache, krope_cache, mask: Mask,
                    cfg: ModelConfig) -> Float[Array, "B T D"]:
    """Attention over the latent cache: ckv_cache [B,S,C], krope_cache [B,S,R]."""
    with jax.named_scope("mla/attention_absorbed"):
        q_latent = jnp.einsum("bthk,chk->bthc", q_nope, cast(p.w_uk, cfg))          # W_UK folded into q
        scores = (jnp.einsum("bthc,bsc->bhts", q_latent, ckv_cache)
                  + jnp.einsum("bthr,bsr->bhts", q_rope, krope_cache)) * cfg.softmax_scale
        probs = _softmax(scores, mask).astype(ckv_cache.dtype)
        out_latent = jnp.einsum("bhts,bsc->bthc", probs, ckv_cache)                  # [B,T,H,C]
        out = jnp.einsum("bthc,chv->bthv", out_latent, cast(p.w_uv, cfg))             # W_UV after attention
    with jax.named_scope("mla/o_proj"):
        return project(out, cast(p.wo, cfg), contract=2, fp8=cfg.fp8)               # [B,T,D]


def causal_mask(q_positions, kv_positions, q_segments=None, kv_segments=None, kv_valid=None) -> Mask:
    """mask[b, t, s]: key s is visible to query t (causal, same segment, valid slot)."""
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask
