"""Train a DeepSeek-V3-style model. `python train.py` trains the tiny preset on the embedded corpus.

The DeepSeek-V3 recipe: AdamW (0.9, 0.95), weight decay 0.1, warmup then cosine, clipping at 1.0,
MTP loss weight, the sequence-wise balance loss, and the aux-loss-free bias update (gamma).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import model
from storage.corpus import ByteTokenizer, embedded_corpus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free bias update speed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tiny", help="where the final checkpoint (HF layout) goes")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def cross_entropy(logits, targets, valid):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def loss_fn(m: model.Transformer, batch, mtp_weight: float):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = m.forward(inputs)
    T = inputs.shape[1]
    main = cross_entropy(out.logits, targets, jnp.ones_like(targets, jnp.float32))
    mtp = jnp.zeros(())
    for k in range(m.cfg.mtp_depth):                       # depth k+1 predicts targets shifted by k+1
        shifted = jnp.pad(targets[:, k + 1:], ((0, 0), (0, k + 1)))
        valid = (jnp.arange(T) < T - k - 1).astype(jnp.float32)[None].repeat(targets.shape[0], 0)
        mtp += cross_entropy(out.mtp_logits[k], shifted, valid) / m.cfg.mtp_depth
    return main + mtp_weight * mtp + out.balance_loss, (main, mtp, out.expert_counts)


@nnx.jit(static_argnames=("mtp_weight", "gamma"))
def train_step(m, opt, batch, mtp_weight: float, gamma: float):
    (loss, (main, mtp, counts)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m, batch, mtp_weight)
    opt.update(m, grads)
    # aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded
    load = counts.astype(jnp.float32)
    delta = gamma * jnp.sign(load.mean(axis=1, keepdims=True) - load)
    n_moe = m.cfg.num_moe_layers
    if n_moe:
        m.moe_layers.ffn.bias.set_value(m.moe_layers.ffn.bias[...] + delta[:n_moe])
    for k, mod in enumerate(m.mtp):
        mod.block.ffn.bias.set_value(mod.block.ffn.bias[...] + delta[n_moe + k])
    imbalance = jnp.max(load, axis=1) / jnp.maximum(jnp.mean(load, axis=1), 1e-9)
    return dict(loss=loss, main=main, mtp=mtp, grad_norm=optax.global_norm(grads), imbalance=imbalance.mean())


def save_atomically(m: model.Transformer, out: Path):
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf_checkpoint(m, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None):
    args = parse_args(argv)
    cfg = model.ModelConfig.preset(args.preset, max_seq_len=max(args.seq_len, 16))
    tok = ByteTokenizer()
    if cfg.vocab_size < tok.vocab_size:
        raise SystemExit(f"preset {args.preset} has vocab_size={cfg.vocab_size} < {tok.vocab_size} byte tokens")
    corpus = embedded_corpus()
    print(f"corpus: {len(corpus):,} tokens (Python {'.'.join(map(str, __import__('sys').version_info[:2]))} stdlib)")
    m = model.Transformer(cfg, rngs=nnx.Rngs(args.seed))
    print(f"model: {args.preset}, {model.param_count(m):,} parameters, devices: {jax.devices()}")
    warmup = min(args.warmup, args.steps // 10)        # short runs keep most steps for the cosine
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".jsonl"), "w")
    start, tokens_seen = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(corpus) - args.seq_len - 1, args.batch)
        batch = jnp.asarray(np.stack([corpus[s:s + args.seq_len + 1] for s in starts]))
        metrics = train_step(m, opt, batch, args.mtp_weight, args.bias_gamma)
        tokens_seen += args.batch * args.seq_len
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(metrics["loss"]):
                raise SystemExit(f"step {step}: loss is {metrics['loss']}; stopping (nothing saved this run)")
            elapsed = time.perf_counter() - start
            record = dict(step=step, lr=float(schedule(step)), tokens_per_s=tokens_seen / elapsed, **metrics)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"step {step:5d}  loss {metrics['main']:.3f}  mtp {metrics['mtp']:.3f}  "
                  f"|g| {metrics['grad_norm']:.2f}  load max/mean {metrics['imbalance']:.2f}  "
                  f"{record['tokens_per_s']:.0f} tok/s")
    save_atomically(m, out)
    print(f"saved {out} (Hugging Face layout; load with model.load_hf_checkpoint)")


if __name__ == "__main__":
    main()
