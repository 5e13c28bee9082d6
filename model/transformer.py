"""The DeepSeek-V3 transformer: stacked, scanned layers, MTP modules, a latent decode cache.

Letters: B batch, T tokens, S cache slots, D d_model, V vocab, L layers, E routed experts.

Layers of one kind (dense FFN / MoE) are stacked along a leading "layers" axis and run with
`jax.lax.scan`, so a 61-layer model compiles like a one-layer model. Parameters live in NNX
modules; the computations below are plain functions of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from model import mla
from model.common import cast, compute_dtype, param
from model.config import ModelConfig
from model.moe import FFN, MoE, ffn, moe
from model.norm import RMSNorm
from model.rope import rope_tables


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, use_moe: bool, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)
        self.attn = mla.MLA(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if use_moe else FFN(cfg, cfg.dense_ffn_dim, rngs=rngs)


class MTPModule(nnx.Module):
    """One multi-token-prediction depth: h' = W[RMSNorm(emb(t+k)); RMSNorm(h)], then a block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.enorm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)
        self.hnorm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)
        self.eh_proj = param(rngs, cfg, (2 * cfg.d_model, cfg.d_model), ("mtp_concat", "embed"))
        self.block = Block(cfg, cfg.num_moe_layers > 0, rngs=rngs)
        self.norm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)


def _stack(cfg: ModelConfig, count: int, use_moe: bool, rngs: nnx.Rngs) -> Block | None:
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> Block:
        return Block(cfg, use_moe, rngs=r)

    return make(rngs)


@dataclasses.dataclass
class LatentCache:
    """Contiguous MLA decode cache: only the latent and roped key, per layer and token."""

    ckv: Float[Array, "L B S C"]
    krope: Float[Array, "L B S R"]
    lengths: Int[Array, " B"]


jax.tree_util.register_dataclass(LatentCache, data_fields=["ckv", "krope", "lengths"], meta_fields=[])


@dataclasses.dataclass
class ModelOutput:
    logits: Float[Array, "B T V"]                 # main head, float32
    mtp_logits: Float[Array, "M B T V"] | None    # depth k predicts token t+k+1; last k rows are padding
    hidden: Float[Array, "B T D"]                 # final hidden state before the norm
    expert_counts: Int[Array, "Lm E"]             # tokens per routed expert, MoE layers then MTP blocks
    balance_loss: Float[Array, ""]                # sequence-wise balance loss, summed over MoE layers


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=["logits", "mtp_logits", "hidden", "expert_counts", "balance_loss"], meta_fields=[])


# ---- per-layer functions -----------------------------------------------------------------------

def _ffn_part(p: Block, x, cfg: ModelConfig):
    h = p.ffn_norm(x)
    if isinstance(p.ffn, MoE):
        out, counts, aux = moe(p.ffn, h, cfg)
    else:
        with jax.named_scope("dense_ffn"):
            out = ffn(p.ffn, h, cfg)
        counts, aux = jnp.zeros((max(cfg.num_routed_experts, 1),), jnp.int32), jnp.zeros((), jnp.float32)
    return x + out, counts, aux


def block_forward(p: Block, x: Float[Array, "B T D"], rope, mask: mla.Mask, cfg: ModelConfig):
    """Training / full-sequence block (naive MLA). Returns (x, expert counts, balance loss)."""
    cos, sin = rope
    h = p.attn_norm(x)
    q_nope, q_rope = mla.queries(p.attn, h, cos, sin, cfg)
    ckv, krope = mla.latents(p.attn, h, cos, sin, cfg)
    x = x + mla.attend_naive(p.attn, q_nope, q_rope, ckv, krope, mask, cfg)
    return _ffn_part(p, x, cfg)


def block_cached(p: Block, x, rope, mask, positions, layer_cache, absorbed: bool, cfg: ModelConfig):
    """A block over new tokens at `positions`, writing their latents into the layer's cache."""
    cos, sin = rope
    ckv_cache, krope_cache = layer_cache
    h = p.attn_norm(x)
    q_nope, q_rope = mla.queries(p.attn, h, cos, sin, cfg)
    ckv, krope = mla.latents(p.attn, h, cos, sin, cfg)
    rows = jnp.arange(x.shape[0])[:, None]
    ckv_cache = ckv_cache.at[rows, positions].set(ckv.astype(ckv_cache.dtype), mode="drop")
    krope_cache = krope_cache.at[rows, positions].set(krope.astype(krope_cache.dtype), mode="drop")
    attend = mla.attend_absorbed if absorbed else mla.attend_naive
    x = x + attend(p.attn, q_nope, q_rope, ckv_cache, krope_cache, mask, cfg)
    x, _, _ = _ffn_part(p, x, cfg)
    return x, (ckv_cache, krope_cache)


def run_stack(stack: Block, carry, fn: Callable, xs, cfg: ModelConfig):
    """Apply fn(layer, carry, x) -> (carry, y) over stacked layers: lax.scan or a python loop."""
    graphdef, state = nnx.split(stack)

    def body(c, layer_xs):
        layer_state, x = layer_xs
        return fn(nnx.merge(graphdef, layer_state), c, x)

    if cfg.remat != "none":
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
        body = jax.checkpoint(body, policy=policy)
    if cfg.scan_layers:
        return jax.lax.scan(body, carry, (state, xs))
    count = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(count):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


# ---- the model ---------------------------------------------------------------------------------

class Transformer(nnx.Module):
    """DeepSeek-V3. `model(tokens)` gives main-head logits; `model.forward` gives everything."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, cfg, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.dense_layers = _stack(cfg, cfg.num_dense_layers, False, rngs)
        self.moe_layers = _stack(cfg, cfg.num_moe_layers, True, rngs)
        self.final_norm = RMSNorm(cfg, cfg.d_model, "norm", rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = param(rngs, cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])

    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        return self.forward(tokens, with_mtp=False).logits

    # -- pieces --
    def embed_tokens(self, tokens):
        with jax.named_scope("embed"):
            return jnp.take(cast(self.embed, self.cfg), tokens, axis=0)

    def logits_from(self, h, norm: RMSNorm):
        with jax.named_scope("head"):
            head = cast(self.embed, self.cfg).T if self.cfg.tie_embeddings else cast(self.head, self.cfg)
            return jnp.einsum("btd,dv->btv", norm(h), head).astype(jnp.float32)

    def _stacks(self):
        return [s for s in (self.dense_layers, self.moe_layers) if s is not None]

    # -- full sequence (training, scoring) --
    def forward(self, tokens: Int[Array, "B T"], *, positions=None, segment_ids=None,
                with_mtp: bool = True) -> ModelOutput:
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        rope = rope_tables(positions, cfg)
        mask = mla.self_mask(positions, segment_ids)
        step = lambda layer, h, _: _scan_step(layer, h, rope, mask, cfg)  # noqa: E731
        h = self.embed_tokens(tokens)
        counts, aux = [], jnp.zeros((), jnp.float32)
        for stack in self._stacks():
            h, (c, a) = run_stack(stack, h, step, None, cfg)
            if stack is self.moe_layers:
                counts.append(c)
                aux += a.sum()
        logits = self.logits_from(h, self.final_norm)
        mtp_logits = None
        if with_mtp and cfg.mtp_depth > 0:
            mtp_logits, c, a = self._mtp(tokens, h, rope, mask)
            counts.append(c)
            aux += a
        counts = jnp.concatenate(counts) if counts else jnp.zeros((0, max(cfg.num_routed_experts, 1)), jnp.int32)
        return ModelOutput(logits, mtp_logits, h, counts, aux)

    def _mtp(self, tokens, h, rope, mask):
        all_logits, all_counts, aux = [], [], jnp.zeros((), jnp.float32)
        for k, module in enumerate(self.mtp, start=1):
            with jax.named_scope(f"mtp_{k}"):
                shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))            # t_{i+k}, padded at the end
                e = module.enorm(self.embed_tokens(shifted))
                joined = jnp.concatenate([e, module.hnorm(h)], axis=-1)
                h = jnp.einsum("bti,id->btd", joined, cast(module.eh_proj, self.cfg))
                h, c, a = block_forward(module.block, h, rope, mask, self.cfg)
                all_logits.append(self.logits_from(h, module.norm))
                all_counts.append(c)
                aux += a
        return jnp.stack(all_logits), jnp.stack(all_counts), aux

    # -- incremental (prefill / decode over a latent cache) --
    def init_cache(self, batch: int, max_len: int, dtype=None) -> LatentCache:
        cfg = self.cfg
        dt = jnp.dtype(dtype or cfg.dtype)
        return LatentCache(jnp.zeros((cfg.num_layers, batch, max_len, cfg.kv_lora_rank), dt),
                           jnp.zeros((cfg.num_layers, batch, max_len, cfg.qk_rope_head_dim), dt),
                           jnp.zeros((batch,), jnp.int32))

    def extend(self, tokens: Int[Array, "B T"], cache: LatentCache, *, num_new=None,
               absorbed: bool = True) -> tuple[Float[Array, "B T V"], LatentCache]:
        """Run new tokens after what the cache holds; `num_new[b]` of row b's tokens are real.

        absorbed=False is the naive form (prefill); True attends over the latent cache directly
        (decode, the FlashMLA computation).
        """
        cfg = self.cfg
        B, T = tokens.shape
        S = cache.ckv.shape[2]
        num_new = jnp.full((B,), T, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask = mla.causal_mask(positions, slots, kv_valid=slots < (cache.lengths + num_new)[:, None])
        rope = rope_tables(positions, cfg)

        def step(layer, h, layer_cache):
            return block_cached(layer, h, rope, mask, positions, layer_cache, absorbed, cfg)

        h = self.embed_tokens(tokens)
        ckv, krope, start = [], [], 0
        for stack in self._stacks():
            n = jax.tree.leaves(nnx.state(stack))[0].shape[0]
            h, (c, r) = run_stack(stack, h, step, (cache.ckv[start:start + n], cache.krope[start:start + n]), cfg)
            ckv.append(c)
            krope.append(r)
            start += n
        new_cache = LatentCache(jnp.concatenate(ckv), jnp.concatenate(krope), cache.lengths + num_new)
        return self.logits_from(h, self.final_norm), new_cache


def _scan_step(layer: Block, h, rope, mask, cfg: ModelConfig):
    h, counts, aux = block_forward(layer, h, rope, mask, cfg)
    return h.astype(compute_dtype(cfg)), (counts, aux)


def param_count(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(int(x.size) for x in jax.tree.leaves(state))
