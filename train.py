"""Train a DeepSeek-V3-style model. `python train.py` trains the tiny preset on the embedded corpus.

The DeepSeek-V3 recipe: AdamW (0.9, 0.95), weight decay 0.1, warmup -> constant -> cosine, gradient
clipping at 1.0, the MTP loss, the sequence-wise balance loss, optional z-loss, and the aux-loss-free
bias update (gamma) on expert loads. Data comes packed from the Grain pipeline (storage/); Orbax
checkpoints hold model, optimizer, data-iterator state and config, and a run resumes from the latest
one automatically. The final model is also exported in the Hugging Face layout for serve.py.
A preemption notice (SIGTERM, as schedulers send before they kill a job) saves a checkpoint at the
next step boundary and exits with 143; on several processes (jax.distributed) JAX's preemption
service picks one step for every process, so their checkpoint is the same step. Ctrl-C also saves.
With --mesh pipe=P and --pipeline-schedule, the MoE blocks run through the pipeline executor
(sharding.pipeline_train).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import socket
import signal
import sys
import threading
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import model
import sharding

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0}      # dense bf16, for MFU


class Preempted(Exception):
    """Raised at a step boundary once a preemption notice has arrived; `step` is the last step done."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class Preemption:
    """SIGTERM as a preemption notice, checked at step boundaries (`check(last_step_done)`).

    One process: a handler records the signal (the previous handler comes back on exit). Several
    processes: JAX's preemption service, started by jax.distributed.initialize, catches SIGTERM on
    any process and picks the same sync step for all (multihost_utils.reached_preemption_sync_point,
    called at every step), so every process saves that step's checkpoint together."""

    def __init__(self):
        self.signalled = False
        self.distributed = jax.process_count() > 1
        self._previous = None

    def __enter__(self):
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _notice(self, signum, frame):
        self.signalled = True

    def check(self, step: int) -> None:
        if self.distributed:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                raise Preempted(step)
        elif self.signalled:
            raise Preempted(step)


# ---- flags -------------------------------------------------------------------------------------------

def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs over {sharding.MESH_AXES}, e.g. data=2,expert=4")
        sizes[name] = int(value)
    return sizes


def _coerce(field: dataclasses.Field, text: str):
    kind = typing.get_type_hints(model.ModelConfig)[field.name]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), str)
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set model.{field.name}={text}: expected true or false")
        return text.lower() in ("true", "1")
    return base(text)


def config_from_args(args) -> model.ModelConfig:
    """The preset, the precision/remat flags, then every --set model.FIELD=VALUE; validated."""
    cfg = model.ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, 16))
    cfg = cfg.replace(remat=args.remat, fp8=args.precision == "fp8",
                      dtype="bfloat16" if args.precision in ("bf16", "fp8") else "float32")
    fields = {f.name: f for f in dataclasses.fields(model.ModelConfig)}
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        name = key.removeprefix("model.")
        if not key.startswith("model.") or name not in fields or not value:
            raise ValueError(f"--set {item!r}: expected model.FIELD=VALUE with FIELD one of {sorted(fields)}")
        if name == "rope_scaling":
            raise ValueError("--set model.rope_scaling is not settable from the command line; use a preset")
        changes[name] = _coerce(fields[name], value)
    return cfg.replace(**changes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=sorted(model.PRESETS))
    a("--set", action="append", default=[], metavar="model.FIELD=VALUE", help="override a config field")
    a("--steps", type=int, default=250)
    a("--batch", type=int, default=8, help="global batch (sequences)")
    a("--seq-len", type=int, default=128)
    a("--lr", type=float, default=3e-3)
    a("--warmup", type=int, default=25)
    a("--constant", type=float, default=0.0, help="fraction of steps at peak lr before the cosine")
    a("--min-lr-ratio", type=float, default=0.1)
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=1.0)
    a("--mtp-weight", type=float, default=0.3)
    a("--bias-gamma", type=float, default=1e-3, help="aux-loss-free bias update speed")
    a("--z-loss", type=float, default=0.0)
    a("--precision", default="fp32", choices=["fp32", "bf16", "fp8"],
      help="compute dtype (bf16 / fp8 keep float32 master weights unless --set model.param_dtype=bfloat16)")
    a("--moments", default="fp32", choices=["fp32", "bf16"],
      help="dtype the AdamW moments are stored in (DeepSeek-V3 keeps them in bf16)")
    a("--remat", default="none", choices=["none", "full", "dots"])
    a("--mesh", default="", help="e.g. data=2,expert=4 (default: data over all devices)")
    a("--pipeline-schedule", default="none", choices=["none", *sharding.schedules.KINDS],
      help="pipeline the MoE blocks over the mesh's pipe axis (needs --mesh pipe=P, P > 1)")
    a("--micro-batches", type=int, default=0, metavar="M", help="pipeline micro-batches (default 2 x pipe)")
    a("--eplb-every", type=int, default=0, metavar="N",
      help="EPLB: every N steps, re-place experts by the last N steps' loads (0: off; needs --mesh expert>1)")
    a("--eplb-redundant", type=int, default=0, metavar="R", help="EPLB: redundant expert slots (replicas)")
    a("--data", default="", help="a prepared corpus directory (storage.prepare); default: the embedded corpus")
    a("--out", default="runs/tiny", help="final model, Hugging Face layout (for serve.py)")
    a("--ckpt-dir", default="", help="Orbax checkpoints (default: OUT-ckpt)")
    a("--ckpt-every", type=int, default=50)
    a("--keep", type=int, default=2)
    a("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    a("--on-nan", default="stop", choices=["stop", "skip"])
    a("--log-every", type=int, default=25)
    a("--profile", action="store_true", help="write a JAX profiler trace of steps 3-5 to OUT-profile")
    a("--seed", type=int, default=0)
    a("--coordinator", default=os.environ.get("ORCINUS_COORDINATOR", ""), help="host:port for jax.distributed")
    a("--num-processes", type=int, default=int(os.environ.get("ORCINUS_NUM_PROCESSES", "1")))
    a("--process-id", type=int, default=int(os.environ.get("ORCINUS_PROCESS_ID", "0")))
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "log_every", "ckpt_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.micro_batches < 0:
        p.error(f"--micro-batches must be positive, got {args.micro_batches}")
    if not 0 <= args.constant < 1 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--constant must be in [0, 1) and --min-lr-ratio in [0, 1]")
    try:
        args.mesh_sizes = _parse_mesh(args.mesh)
        args.cfg = config_from_args(args)
        args.micro_batches = args.micro_batches or 2 * args.mesh_sizes.get("pipe", 1)
        args.pipe_schedule = sharding.pipeline_train.check_config(
            args.cfg, args.mesh_sizes, args.pipeline_schedule, args.micro_batches)
    except ValueError as err:
        p.error(str(err))
    if args.cfg.attention == "pallas" and args.seq_len % 128:
        p.error(f"--set model.attention=pallas: the kernel takes sequences in tiles of 128, but --seq-len is "
                f"{args.seq_len}; use a multiple of 128")
    if args.eplb_every or args.eplb_redundant:
        expert = args.mesh_sizes.get("expert", 1)
        slots = args.cfg.num_routed_experts + args.eplb_redundant
        if args.eplb_every <= 0 or args.eplb_redundant < 0:
            p.error(f"--eplb-every must be positive (got {args.eplb_every}) and --eplb-redundant >= 0")
        if expert <= 1 or args.cfg.num_moe_layers == 0:
            p.error("--eplb-every places experts over the `expert` mesh axis: it needs MoE layers and "
                    "--mesh with expert > 1, e.g. --mesh data=2,expert=4")
        if slots % expert:
            p.error(f"--eplb-redundant {args.eplb_redundant}: {slots} expert slots do not divide over expert={expert}")
    return args


# ---- the step ------------------------------------------------------------------------------------------

def batch_from_tokens(tokens) -> dict:
    """An unpacked [B, T+1] token array as a loader batch (one document per row)."""
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape[0], tokens.shape[1] - 1
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
                segment_ids=jnp.zeros((B, T), jnp.int32), weights=jnp.ones((B, T), jnp.float32))


def _cross_entropy(logits, targets, weights, z_loss: float):
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    total = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(nll * weights) / total, jnp.sum(lse ** 2 * weights) / total * z_loss


def loss_fn(m: model.Transformer, batch: dict, mtp_weight: float, z_loss: float = 0.0):
    out = m.forward(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    main, z = _cross_entropy(out.logits, batch["targets"], batch["weights"], z_loss)
    mtp = jnp.zeros(())
    T = batch["targets"].shape[1]
    for k in range(1, m.cfg.mtp_depth + 1):            # depth k at position i predicts targets[i + k]
        shift = lambda a: jnp.pad(a[:, k:], ((0, 0), (0, k)))  # noqa: E731
        same_doc = shift(batch["segment_ids"]) == batch["segment_ids"]
        valid = shift(batch["weights"]) * same_doc * (jnp.arange(T) < T - k)
        mtp += _cross_entropy(out.mtp_logits[k - 1], shift(batch["targets"]), valid, 0.0)[0] / m.cfg.mtp_depth
    return main + mtp_weight * mtp + out.balance_loss + z, (main, mtp, out.expert_counts)


@nnx.jit(static_argnames=("mtp_weight", "gamma", "z_loss", "pipeline"))
def train_step(m, opt, batch, mtp_weight: float, gamma: float, z_loss: float = 0.0,
               pipeline: sharding.pipeline_train.PipelinePlan | None = None):
    """One optimizer step; with `pipeline` the loss and gradients come from the pipeline executor."""
    if not isinstance(batch, dict):
        batch = batch_from_tokens(batch)
    if pipeline is None:
        (loss, (main, mtp, counts)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, batch, mtp_weight, z_loss)
    else:
        (loss, (main, mtp, counts)), grads = sharding.pipeline_train.value_and_grad(m, batch, pipeline, z_loss)
    opt.update(m, grads)
    # aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded ones
    load = counts.astype(jnp.float32)
    delta = gamma * jnp.sign(load.mean(axis=1, keepdims=True) - load)
    n_moe = m.cfg.num_moe_layers
    if n_moe and m.cfg.router_bias:
        m.moe_layers.ffn.bias.set_value(m.moe_layers.ffn.bias[...] + delta[:n_moe])
    for k, mod in enumerate(m.mtp):
        if m.cfg.router_bias and m.cfg.num_moe_layers:
            mod.block.ffn.bias.set_value(mod.block.ffn.bias[...] + delta[n_moe + k])
    imbalance = jnp.max(load, axis=1) / jnp.maximum(jnp.mean(load, axis=1), 1e-9)
    return dict(loss=loss, main=main, mtp=mtp, grad_norm=optax.tree.norm(grads), imbalance=imbalance.mean(),
                load=load)


# ---- the run -------------------------------------------------------------------------------------------

def adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
          moments_dtype=None) -> optax.GradientTransformation:
    """AdamW; with `moments_dtype` (V3 §3.3: bfloat16) both moments are stored in that dtype between
    steps while the update arithmetic stays float32 (optax's own `mu_dtype` covers the first moment
    only). The state is optax's `ScaleByAdamState`, so checkpoints and EPLB see the usual layout."""
    if moments_dtype is None:
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)

    def init(params):
        zeros = lambda p: jnp.zeros_like(p, dtype=moments_dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), grads, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), grads, state.nu)
        c = count.astype(jnp.float32)
        step = jax.tree.map(lambda m, v, g: (m / (1 - b1 ** c) / (jnp.sqrt(v / (1 - b2 ** c)) + eps)).astype(g.dtype),
                            mu, nu, grads)
        low = lambda t: jax.tree.map(lambda x: x.astype(moments_dtype), t)  # noqa: E731
        return step, optax.ScaleByAdamState(count=count, mu=low(mu), nu=low(nu))

    return optax.chain(optax.GradientTransformation(init, update), optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def schedule_for(args) -> optax.Schedule:
    """Warmup -> constant -> cosine (DeepSeek-V3's shape)."""
    warmup = min(args.warmup, args.steps // 10)
    constant = int(args.constant * args.steps)
    decay = max(args.steps - warmup - constant, 1)
    return optax.join_schedules([optax.linear_schedule(0.0, args.lr, max(warmup, 1)),
                                 optax.constant_schedule(args.lr),
                                 optax.cosine_decay_schedule(args.lr, decay, alpha=args.min_lr_ratio)],
                                [max(warmup, 1), max(warmup, 1) + constant])


def flops_per_token(cfg: model.ModelConfig, seq_len: int) -> float:
    """Training FLOPs a token: 6 x active parameters + attention scores and values."""
    d, h = cfg.d_model, cfg.num_heads
    attn_params = d * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim) + \
        (cfg.q_lora_rank or d) * h * cfg.qk_head_dim + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + \
        h * cfg.v_head_dim * d
    moe_active = 3 * d * cfg.moe_ffn_dim * (cfg.num_experts_per_tok + cfg.num_shared_experts) + d * cfg.num_routed_experts
    dense = 3 * d * cfg.dense_ffn_dim
    active = (cfg.num_layers * attn_params + cfg.num_dense_layers * dense + cfg.num_moe_layers * moe_active
              + 2 * cfg.vocab_size * d)
    attention = 6 * cfg.num_layers * h * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * active + attention


def _device_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _prepare_once(corpus_dir: Path, prepare) -> None:
    """The embedded corpus at corpus_dir, prepared by whichever process gets there first: each
    prepares into its own temporary directory and renames it into place (atomic; the losers drop
    theirs), so processes sharing a disk never write or read a half-written shard."""
    if (corpus_dir / "manifest.json").exists():
        return
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{corpus_dir.name}.tmp-{socket.gethostname()}-"
    for left in corpus_dir.parent.glob(prefix + "*"):    # an interrupted preparation's, on this host
        pid = left.name.removeprefix(prefix).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    tmp = corpus_dir.with_name(f"{prefix}{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prepare(tmp, progress=jax.process_index() == 0)
    try:
        os.rename(tmp, corpus_dir)                       # onto a missing or empty directory only
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (corpus_dir / "manifest.json").exists():
            raise SystemExit(f"{corpus_dir} holds files but no manifest.json (an interrupted preparation?): "
                             "remove it and rerun") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                              # another user's: alive
        pass
    return True


def _export_atomically(m: model.Transformer, out: Path):
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf_checkpoint(m, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _eplb_step(balancer: sharding.eplb.Balancer, step: int, counts) -> dict | None:
    """Feed one step's expert counts to EPLB; when a rebalance is due, it moves weights and Adam moments
    and returns the metrics for that step's record (GPU max/mean load, mean over the expert layers)."""
    balancer.observe(counts)
    rep = balancer.step(step)
    if rep is None:
        return None
    print(f"EPLB step {step}: GPU load max/mean {rep['mean_before']:.3f} -> {rep['mean_after']:.3f} "
          f"(mean over {len(rep['imbalance_before'])} expert layers, last {len(balancer.stats)} steps)", flush=True)
    return dict(eplb_imbalance_before=rep["mean_before"], eplb_imbalance_after=rep["mean_after"],
                eplb_worst_before=float(rep["imbalance_before"].max()),
                eplb_worst_after=float(rep["imbalance_after"].max()))


class MetricsLog:
    """The run's metrics: JSONL (OUT.jsonl), TensorBoard events (OUT-tb/, tensorboardX) and a
    progress bar (tqdm, on a terminal). Only process 0 writes; the others' calls do nothing."""

    def __init__(self, out: Path, start: int, steps: int):
        self.main = jax.process_index() == 0
        self.jsonl = open(str(out) + ".jsonl", "a") if self.main else None
        if self.main:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(out) + "-tb")
        from tqdm import tqdm
        self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=None if self.main else True)        # None: only on a terminal

    def advance(self):
        self.bar.update(1)

    def write(self, record: dict):
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and value is not None:
                self.tb.add_scalar(f"train/{key}", value, record["step"])
        self.tb.flush()
        self.bar.set_postfix(loss=f"{record['main']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def print(self, text: str):
        if self.main:
            self.bar.write(text)
            sys.stdout.flush()

    def close(self):
        self.bar.close()
        if self.main and self.jsonl is not None:
            self.jsonl.close()
            self.tb.close()
            self.jsonl = None


def _plots(records: list[dict], loads: np.ndarray | None, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    steps = [r["step"] for r in records]
    ax1.plot(steps, [r["main"] for r in records], label="main")
    ax1.plot(steps, [r["mtp"] for r in records], label="MTP")
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax1.legend()
    if loads is not None and loads.size:
        image = ax2.imshow(loads / loads.sum(1, keepdims=True), aspect="auto", cmap="viridis")
        ax2.set(xlabel="routed expert", ylabel="MoE layer", title="expert load share (last window)")
        fig.colorbar(image, ax=ax2)
    fig.savefig(out.with_name(out.name + "-train.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from storage import Checkpointer, LoaderConfig, make_loader, open_corpus, prepare_embedded_corpus
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    cfg = args.cfg
    mesh = sharding.make_mesh(**args.mesh_sizes) if args.mesh_sizes else sharding.make_mesh()
    if args.batch % (mesh.shape["data"] * mesh.shape["expert"]):
        raise SystemExit(f"--batch {args.batch} must divide over data x expert = "
                         f"{mesh.shape['data'] * mesh.shape['expert']} devices")
    plan = None
    if args.pipe_schedule is not None:
        if args.batch % (args.micro_batches * mesh.shape["data"]):
            raise SystemExit(f"--batch {args.batch} must divide into --micro-batches {args.micro_batches} "
                             f"x data = {mesh.shape['data']} devices")
        plan = sharding.pipeline_train.PipelinePlan(args.pipe_schedule, mesh)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus_dir = Path(args.data) if args.data else out.parent / "data" / "embedded"
    if not args.data:
        _prepare_once(corpus_dir, prepare_embedded_corpus)
    corpus = open_corpus(corpus_dir)
    loader = make_loader(corpus, LoaderConfig(seq_len=args.seq_len, batch_size=args.batch // jax.process_count(),
                                              seed=args.seed))
    m = sharding.shard_model(model.Transformer(cfg, rngs=nnx.Rngs(args.seed)), mesh)
    schedule = schedule_for(args)
    tx = optax.chain(optax.clip_by_global_norm(args.clip),
                     adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay,
                           moments_dtype=jnp.bfloat16 if args.moments == "bf16" else None))
    if args.on_nan == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=10)
    opt = sharding.shard_model(nnx.Optimizer(m, tx, wrt=nnx.Param), mesh)    # moments follow their params
    balancer = (sharding.eplb.Balancer(m, opt, mesh, every=args.eplb_every, redundant=args.eplb_redundant)
                if args.eplb_every else None)                                 # before restore: slot shapes
    ckpt = Checkpointer(args.ckpt_dir or str(out) + "-ckpt", max_to_keep=args.keep, save_interval_steps=1)
    start = 0
    if not args.no_resume and ckpt.latest_step() is not None:
        start = ckpt.restore(m, opt, loader)
        print(f"resumed from step {start} ({ckpt.directory})")
    print(f"model: {args.preset}, {model.param_count(m):,} parameters, mesh {dict(mesh.shape)}, "
          f"precision {args.precision}, {args.moments} moments; corpus {corpus_dir} ({corpus.num_tokens:,} tokens)")
    log = MetricsLog(out, start, args.steps)
    records, peak, fpt = [], _device_peak(), flops_per_token(cfg, args.seq_len)
    window_tokens, window_start, loads, step = 0, time.perf_counter(), None, start
    try:
        with jax.set_mesh(mesh), Preemption() as preemption:
            for step in range(start + 1, args.steps + 1):
                preemption.check(step - 1)                            # every process, every step
                if args.profile and step == 3:
                    jax.profiler.start_trace(str(out) + "-profile")
                batch = {k: sharding.shard_batch(v, mesh) for k, v in next(loader).items()}
                metrics = train_step(m, opt, batch, args.mtp_weight, args.bias_gamma, args.z_loss, plan)
                log.advance()
                rebalanced = _eplb_step(balancer, step, metrics["load"]) if balancer is not None else None
                window_tokens += args.batch * args.seq_len
                if args.profile and step == 5:
                    jax.block_until_ready(metrics["loss"])
                    jax.profiler.stop_trace()
                if step % args.log_every and step not in (start + 1, args.steps) and rebalanced is None:
                    if step % args.ckpt_every == 0:
                        ckpt.save(step, m, opt, loader)
                    continue
                loads = np.asarray(metrics.pop("load"))
                metrics = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(metrics["loss"]) and args.on_nan == "stop":
                    raise FloatingPointError(f"step {step}: loss is {metrics['loss']}")
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed
                record = dict(step=step, lr=float(schedule(step)), tokens_per_s=tps,
                              mfu=(tps * fpt / (peak * jax.device_count())) if peak else None, **metrics,
                              **(rebalanced or {}))
                records.append(record)
                log.write(record)
                mfu = f"  MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
                log.print(f"step {step:5d}  loss {metrics['main']:.3f}  mtp {metrics['mtp']:.3f}  "
                      f"|g| {metrics['grad_norm']:.2f}  lr {record['lr']:.2e}  load max/mean "
                      f"{metrics['imbalance']:.2f}  {tps:.0f} tok/s{mfu}")
                window_tokens, window_start = 0, time.perf_counter()
                if step % args.ckpt_every == 0:
                    ckpt.save(step, m, opt, loader)
    except (KeyboardInterrupt, Preempted) as stop:
        preempted = isinstance(stop, Preempted)
        step = stop.step if preempted else step
        log.close()
        ckpt.wait()
        if ckpt.latest_step() != step and step > start:
            ckpt.save(step, m, opt, loader, force=True)
        ckpt.close()
        why = "preempted (SIGTERM)" if preempted else "interrupted"
        print(f"\n{why} at step {step}: checkpoint saved in {ckpt.directory}; rerun to resume", flush=True)
        sys.exit(143 if preempted else 130)
    except FloatingPointError as err:
        log.close()
        ckpt.close()
        raise SystemExit(f"{err}; stopping. The last good checkpoint is step {ckpt.latest_step()} in "
                         f"{ckpt.directory}; rerun with a lower --lr, or --on-nan skip") from None
    if ckpt.latest_step() != args.steps:
        ckpt.save(args.steps, m, opt, loader, force=True)
    ckpt.close()
    loader.close()
    log.close()
    if balancer is not None:
        sharding.eplb.apply_placement(m, None, None)             # back to E logical experts for export
    if jax.process_index() == 0:
        _export_atomically(m, out)
        _plots(records, loads, out)
        plots = f"{out}-train.png"
        if balancer is not None and balancer.last is not None:   # the last rebalance: loads, old and new GPU loads
            load, old, new = balancer.last
            sharding.eplb.save_heatmap(load, new, out.with_name(out.name + "-eplb.png"), previous=old)
            plots += f", {out}-eplb.png"
        print(f"saved {out} (Hugging Face layout) and {plots}; checkpoints in {ckpt.directory}")


if __name__ == "__main__":
    main()
