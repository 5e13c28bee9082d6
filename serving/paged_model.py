"""The transformer over the paged latent cache: naive-form prefill, absorbed-form decode.

Letters: B batch, T new tokens a row, M blocks per sequence, H heads, C kv_lora_rank,
R qk_rope_head_dim, V vocab, L MoE layers, E routed experts.

This mirrors `Transformer.extend` with block tables in place of a contiguous cache. Prefill
(a chunk of T tokens a row) writes the chunk's latents and attends over the sequence's blocks
gathered into a contiguous view, in the naive MLA form. Decode (T = 1) writes the new token's
latent and attends through the FlashMLA interface (`pallas_kernels.flash_mla.mla_decode`): the
query is absorbed (q_nope W_UK ++ q_rope, 576 wide in V3), the output is a latent [B,1,H,C]
that W_UV turns into per-head values.

Each call also counts the real tokens (not the bucket padding) routed to every logical expert of
every MoE layer, the serving side of EPLB's load statistics (sharding/eplb.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from model import mla
from model.common import cast, compute_dtype
from model.config import ModelConfig
from model.fp8 import project
from model.moe import MoE, ffn, moe
from model.rope import rope_tables
from model.transformer import Block, Transformer, run_stack
from pallas_kernels import flash_mla
from serving import cache as paged
from serving.cache import CacheSpec


@dataclasses.dataclass
class Batch:
    """One step's rows: new tokens at positions, the block tables, and the lengths after the step."""

    tokens: Int[Array, "B T"]
    positions: Int[Array, "B T"]
    valid: Array                     # [B, T] bool: real tokens (the rest is bucket padding)
    table: Int[Array, "B M"]         # block ids in [0, N); unused entries are 0
    lengths: Int[Array, " B"]        # tokens in the cache after this step (0 for padding rows)


jax.tree_util.register_dataclass(Batch, data_fields=["tokens", "positions", "valid", "table", "lengths"],
                                 meta_fields=[])


def slots_of(batch: Batch) -> Int[Array, "B T"]:
    """Cache slot (block * P + offset) of every new token; -1 for padding."""
    block = jnp.take_along_axis(batch.table, jnp.clip(batch.positions // paged.PAGE, 0, batch.table.shape[1] - 1),
                                axis=1)
    return jnp.where(batch.valid, block * paged.PAGE + batch.positions % paged.PAGE, -1)


def paged_attention(q: Float[Array, "B T H CR"], kv, table, lengths, scale: float, spec: CacheSpec):
    """Absorbed attention over the paged cache: the FlashMLA kernel where its shapes fit (V3:
    576 = 512 + 64, bf16 or FP8 cache), `latent_attention` (XLA, this cache's latent width) elsewhere."""
    fits = (spec.latent_dim, spec.rope_dim) == (flash_mla.D_V, flash_mla.D_ROPE) and spec.dtype != "float32"
    if spec.storage_dtype == jnp.uint16:                 # a bf16-bits pool (CPU): this batch's pages
        kv, table = paged.gathered_pool(kv, table, spec)
    if fits:
        out, _ = flash_mla.mla_decode(q.astype(jnp.bfloat16), kv, table, lengths, softmax_scale=scale)
    else:
        out = latent_attention(q, kv, table, lengths, scale, spec.latent_dim)
    return out.astype(q.dtype)                                                # [B, T, H, C]


def latent_attention(q: Float[Array, "B T H CR"], kv, table: Int[Array, "B M"], lengths: Int[Array, " B"],
                     scale: float, latent_dim: int) -> Float[Array, "B T H C"]:
    """Every query row of a sequence attends to its first `lengths` cached tokens (decode: T = 1),
    in float32: `flash_mla.flash_mla_reference`'s result (non-causal), leaner for XLA. The keys are
    the gathered blocks read once, for QK^T and for PV over the full width (the latent sliced from
    the product, not from the keys), and stale slots are not zeroed first: `cache.write` stores
    only finite values, so a masked slot (p = 0) adds exactly 0. An empty row gives 0."""
    B, T, H, W = q.shape
    keys = kv[jnp.clip(table, 0, kv.shape[0] - 1)].reshape(B, -1, W).astype(jnp.float32)   # [B, M*P, W]
    s = jnp.einsum("bqw,bsw->bqs", q.reshape(B, T * H, W).astype(jnp.float32), keys) * scale
    s = jnp.where(jnp.arange(keys.shape[1])[None, None] < lengths[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))                       # masked: exp(-inf) = 0
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bqs,bsw->bqw", p, keys)[..., :latent_dim] / jnp.where(total > 0, total, 1.0)
    return out.reshape(B, T, H, latent_dim)


def _attend_decode(p: mla.MLA, q_nope, q_rope, kv, layer, batch: Batch, cfg: ModelConfig, spec: CacheSpec):
    with jax.named_scope("mla/attention_paged"):
        q_latent = jnp.einsum("bthk,chk->bthc", q_nope, cast(p.w_uk, cfg))          # W_UK folded into q
        q = jnp.concatenate([q_latent, q_rope], axis=-1)                            # [B, 1, H, C+R]
        out_latent = paged_attention(q, kv, paged.layer_table(batch.table, layer, spec), batch.lengths,
                                     cfg.softmax_scale, spec)
        out = jnp.einsum("bthc,chv->bthv", out_latent, cast(p.w_uv, cfg))            # W_UV after attention
    with jax.named_scope("mla/o_proj"):
        return project(out, cast(p.wo, cfg), contract=2, fp8=cfg.fp8)


def _attend_prefill(p: mla.MLA, q_nope, q_rope, kv, layer, batch: Batch, cfg: ModelConfig, spec: CacheSpec):
    ckv, krope = paged.gather(kv, layer, batch.table, spec, q_nope.dtype)         # [B, M*P, C], [B, M*P, R]
    slots = jnp.broadcast_to(jnp.arange(ckv.shape[1], dtype=jnp.int32), ckv.shape[:2])
    mask = mla.causal_mask(batch.positions, slots, kv_valid=slots < batch.lengths[:, None])
    mask &= batch.valid[:, :, None]
    return mla.attend_naive(p, q_nope, q_rope, ckv, krope, mask, cfg)


def _ffn(p: Block, x, valid, cfg: ModelConfig):
    """x + FFN(x), and the expert counts of the real tokens (None for a dense layer)."""
    h = p.ffn_norm(x)
    if not isinstance(p.ffn, MoE):
        return x + ffn(p.ffn, h, cfg), None
    out, counts, _ = moe(p.ffn, h, cfg, valid)
    return x + out, counts


def paged_block(p: Block, x: Float[Array, "B T D"], layer, kv, rope, batch: Batch, absorbed: bool,
                cfg: ModelConfig, spec: CacheSpec):
    """One layer over new tokens: write their latents into the paged cache, attend, FFN.
    Returns (x, kv, expert counts [E] or None)."""
    cos, sin = rope
    h = p.attn_norm(x)
    q_nope, q_rope = mla.queries(p.attn, h, cos, sin, cfg)
    ckv, krope = mla.latents(p.attn, h, cos, sin, cfg)
    kv = paged.write(kv, layer, ckv, krope, slots_of(batch), spec)
    attend = _attend_decode if absorbed else _attend_prefill
    x = x + attend(p.attn, q_nope, q_rope, kv, layer, batch, cfg, spec)
    x, counts = _ffn(p, x, batch.valid, cfg)
    return x.astype(compute_dtype(cfg)), kv, counts


def _stacks(m: Transformer):
    return [s for s in (m.dense_layers, m.moe_layers) if s is not None]


def forward_paged(m: Transformer, kv, batch: Batch, *, absorbed: bool, spec: CacheSpec):
    """Logits at each row's last real token [B, V] (f32), the updated cache, and the real tokens
    routed to each expert of each MoE layer [L, E] (int32)."""
    cfg = m.cfg
    unrolled = dataclasses.replace(cfg, scan_layers=False, remat="none")    # straight-line: cache writes in place
    rope = rope_tables(batch.positions, cfg)
    h = m.embed_tokens(batch.tokens)
    start, counts = 0, jnp.zeros((0, max(cfg.num_routed_experts, 1)), jnp.int32)
    for stack in _stacks(m):
        count = jax.tree.leaves(nnx.state(stack))[0].shape[0]

        def step(layer, carry, index):
            x, kv = carry
            x, kv, c = paged_block(layer, x, index, kv, rope, batch, absorbed, cfg, spec)
            return (x, kv), c

        (h, kv), c = run_stack(stack, (h, kv), step, start + jnp.arange(count, dtype=jnp.int32), unrolled)
        if stack is m.moe_layers:
            counts = c.astype(jnp.int32)
        start += count
    last = jnp.maximum(batch.valid.sum(axis=1) - 1, 0)                             # [B]
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)                   # [B, 1, D]
    return m.logits_from(h_last, m.final_norm)[:, 0], kv, counts
