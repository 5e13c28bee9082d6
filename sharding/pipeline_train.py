"""The Transformer's training loss and gradients through the pipeline executor (`pipeline`).

The MoE block stack is cut into the schedule's S stages (num_moe_layers / S blocks each) and run
by `pipeline.pipeline_value_and_grad` over the mesh's `pipe` axis. The embedding and the dense
blocks run in front of the pipeline on the whole batch (replicated over `pipe`) and are
differentiated through the executor's input gradient; the final norm and the head are the loss's
parameters, so the cross-entropy and z-loss sit in the last stage's F. Each stage's sequence-wise
balance loss is its aux loss and its expert counts are its stats.

`value_and_grad(m, batch, plan, z_loss)` returns what `nnx.value_and_grad(train.loss_fn,
has_aux=True)` returns for a model without MTP: (loss, (main, mtp, expert counts)), grads.

Packed batches: the stages need each row's positions and segment ids (RoPE and the
document mask), but the executor moves one activation array per micro-batch. So they travel with
it as extra feature channels, each int32 as four base-256 digits (exact in bfloat16, float16 and
float32); every stage rebuilds RoPE and the mask from them and passes them on unchanged.

Loss weights: the executor averages `loss_fn` over micro-batches and batch shards; the per-token
weights are pre-scaled by (M x shards) / sum(weights), so that average is the batch's weighted
token mean, as in train.py. The cross-entropy and z-loss parts are read back as the gradients of
two unit multipliers in the loss parameters (the loss is linear in each).

Letters: B batch, T tokens, D d_model, E routed experts, M micro-batches, b rows per micro-batch,
S stages, C = D + 8 channels (hidden state, positions, segment ids).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from model import ModelConfig, Transformer, mla
from model.common import cast
from model.rope import rope_tables
from model.transformer import _scan_step, run_stack
from sharding import pipeline
from sharding.schedules import KINDS, Schedule, make_schedule

DIGITS = 4                      # base-256 digits per int32 side channel


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """A schedule and the mesh it runs on: a static (hashable) argument of the jitted step."""

    schedule: Schedule
    mesh: Mesh


def num_stages(kind: str, ranks: int) -> int:
    return 2 * ranks if kind == "dualpipev" else ranks


def check_config(cfg: ModelConfig, mesh_sizes: dict[str, int], kind: str, micro_batches: int) -> Schedule | None:
    """Validate a pipeline request before any work; returns the schedule (None without a pipeline).
    Raises ValueError saying what to change."""
    ranks = mesh_sizes.get("pipe", 1)
    if kind == "none":
        if ranks > 1:
            raise ValueError(f"--mesh pipe={ranks} needs --pipeline-schedule, one of {KINDS}")
        return None
    if kind not in KINDS:
        raise ValueError(f"--pipeline-schedule {kind!r}: expected none or one of {KINDS}")
    if ranks <= 1:
        raise ValueError(f"--pipeline-schedule {kind} needs a pipe mesh axis > 1, e.g. --mesh pipe=2")
    busy = {a: mesh_sizes[a] for a in ("expert", "tensor") if mesh_sizes.get(a, 1) > 1}
    if busy:
        raise ValueError(f"--pipeline-schedule composes with the data axis only, not with {busy}")
    stages = num_stages(kind, ranks)
    if cfg.num_moe_layers == 0 or cfg.num_moe_layers % stages:
        raise ValueError(f"--pipeline-schedule {kind} on pipe={ranks} has {stages} stages: the "
                         f"{cfg.num_moe_layers} MoE layers (num_layers - num_dense_layers) must divide into them")
    if cfg.mtp_depth:
        raise ValueError(f"--pipeline-schedule runs without MTP modules: use --set model.mtp_depth=0 "
                         f"(got mtp_depth={cfg.mtp_depth})")
    return make_schedule(kind, ranks, micro_batches)


# ---- side channels ----------------------------------------------------------------------------

def encode_ints(v: Int[Array, "B T"], dtype) -> Float[Array, "B T 4"]:
    """int32 -> four base-256 digits (most significant first) as floats."""
    u = v.astype(jnp.uint32)
    return jnp.stack([(u >> (8 * k)) & 255 for k in reversed(range(DIGITS))], axis=-1).astype(dtype)


def decode_ints(d: Float[Array, "B T 4"]) -> Int[Array, "B T"]:
    u = jnp.round(jax.lax.stop_gradient(d).astype(jnp.float32)).astype(jnp.uint32)
    return sum(u[..., i] << (8 * (DIGITS - 1 - i)) for i in range(DIGITS)).astype(jnp.int32)


# ---- the pieces -------------------------------------------------------------------------------

def _stage_fn(stack_gd, cfg: ModelConfig):
    """One stage: its share of the MoE blocks on x [b, T, C]. Returns (y, balance loss, counts)."""
    D = cfg.d_model

    def stage(sp, x):
        h, side = x[..., :D], x[..., D:]
        positions, segments = decode_ints(side[..., :DIGITS]), decode_ints(side[..., DIGITS:])
        rope = rope_tables(positions, cfg)
        mask = mla.self_mask(positions, segments)
        stack = nnx.merge(stack_gd, sp["params"], sp["rest"])
        h, (counts, aux) = run_stack(stack, h, lambda layer, h, _: _scan_step(layer, h, rope, mask, cfg), None, cfg)
        return jnp.concatenate([h.astype(x.dtype), side], axis=-1), aux.sum(), counts      # counts [layers, E]

    return stage


def _loss_fn(norm_gd, cfg: ModelConfig, z_loss: float):
    """Final norm, head, weighted cross-entropy + z-loss of one micro-batch (weights pre-scaled)."""

    def loss(lp, y, tgt):
        h = y[..., :cfg.d_model]
        head = cast(lp["embed"], cfg).T if cfg.tie_embeddings else cast(lp["head"], cfg)
        logits = jnp.einsum("btd,dv->btv", nnx.merge(norm_gd, lp["norm"])(h), head).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, tgt["targets"][..., None], axis=-1)[..., 0]
        main, z = jnp.sum(nll * tgt["weights"]), z_loss * jnp.sum(lse ** 2 * tgt["weights"])
        return lp["unit"][0] * main + lp["unit"][1] * z

    return loss


def _front(m: Transformer, batch: dict):
    """Embedding and dense blocks on the whole batch: (h [B, T, D], vjp over (embed, dense params))."""
    cfg = m.cfg
    dense = m.dense_layers
    dense_gd, dense_params, dense_rest = nnx.split(dense, nnx.Param, ...) if dense is not None else (None, {}, None)
    positions, segments = batch["positions"], batch["segment_ids"]
    rope, mask = rope_tables(positions, cfg), mla.self_mask(positions, segments)

    def front(embed, dense_params):
        h = jnp.take(cast(embed, cfg), batch["tokens"], axis=0)
        if dense_gd is not None:
            stack = nnx.merge(dense_gd, dense_params, dense_rest)
            h, _ = run_stack(stack, h, lambda layer, h, _: _scan_step(layer, h, rope, mask, cfg), None, cfg)
        return h

    return jax.vjp(front, m.embed[...], dense_params)


def _micro(a, M: int):
    """[B, ...] -> [M, B/M, ...]: micro-batch m holds rows m*B/M .. (m+1)*B/M - 1."""
    return a.reshape(M, a.shape[0] // M, *a.shape[1:])


def value_and_grad(m: Transformer, batch: dict, plan: PipelinePlan, z_loss: float = 0.0):
    """(loss, (main, mtp, expert counts [Lm, E])), grads (an nnx.State of the model's Params);
    the same quantities as jax.value_and_grad of train.loss_fn for a model without MTP.
    Call under jit with the mesh set."""
    cfg, sched, mesh = m.cfg, plan.schedule, plan.mesh
    S, M = sched.stages, sched.micro_batches
    shards = mesh.shape["data"]
    B = batch["tokens"].shape[0]
    if cfg.mtp_depth or cfg.num_moe_layers % S or B % (M * shards) or mesh.shape["expert"] * mesh.shape["tensor"] > 1:
        raise ValueError(f"pipeline step: needs mtp_depth=0, {cfg.num_moe_layers} MoE layers divisible by {S} "
                         f"stages, batch {B} divisible by {M} micro-batches x data={shards}, expert = tensor = 1")
    with jax.named_scope("pipeline/front"):
        h, front_vjp = _front(m, batch)
    side = [encode_ints(batch[k], h.dtype) for k in ("positions", "segment_ids")]
    xs = _micro(jnp.concatenate([h, *side], axis=-1), M)                          # [M, b, T, C]
    scale = (M * shards) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    targets = {"targets": _micro(batch["targets"], M), "weights": _micro(batch["weights"] * scale, M)}

    stack_gd, layer_params, layer_rest = nnx.split(m.moe_layers, nnx.Param, ...)
    stage_params = jax.tree.map(lambda a: a.reshape(S, -1, *a.shape[1:]), {"params": layer_params, "rest": layer_rest})
    norm_gd, norm_params = nnx.split(m.final_norm)
    loss_params = {"norm": norm_params, "unit": jnp.ones((2,), jnp.float32),
                   **({"embed": m.embed[...]} if cfg.tie_embeddings else {"head": m.head[...]})}
    out = pipeline.pipeline_value_and_grad(_stage_fn(stack_gd, cfg), _loss_fn(norm_gd, cfg, z_loss), sched, mesh,
                                           pipeline.to_rank_layout(sched, stage_params), loss_params, xs, targets,
                                           has_aux=True)
    d_embed, d_dense = front_vjp(out.input_grads[..., :cfg.d_model].reshape(h.shape))
    stage_grads = pipeline.from_rank_layout(sched, out.grads)["params"]
    counts = pipeline.from_rank_layout(sched, out.stats).reshape(cfg.num_moe_layers, -1)
    lg = out.loss_grads
    grads = {"embed": d_embed + (lg["embed"] if cfg.tie_embeddings else 0), "final_norm": nnx.to_pure_dict(lg["norm"]),
             "moe_layers": nnx.to_pure_dict(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stage_grads))}
    if not cfg.tie_embeddings:
        grads["head"] = lg["head"]
    if m.dense_layers is not None:
        grads["dense_layers"] = nnx.to_pure_dict(d_dense)
    state = jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param))
    nnx.replace_by_pure_dict(state, grads)
    main = lg["unit"][0]
    return (out.loss, (main, jnp.zeros(()), counts)), state
