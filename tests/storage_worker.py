"""Subprocess helpers for the storage tests (run as a script; the tests kill it with SIGKILL).

  train CORPUS CKPT STEPS   a training-like loop: a small tiny-preset model, packed Grain batches,
                            AdamW, an async checkpoint after every step; resumes from CKPT's latest
                            step if there is one. Prints one JSON line per step: the step, the sha256
                            of its batch and the loss as a float hex string.
  bigsave CKPT              saves step 1 (waits), then starts step 2 of a ~256 MB state and sleeps:
                            the test kills it while step 2 is being written.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
from storage import Checkpointer, LoaderConfig, make_loader  # noqa: E402

CFG = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2,
                               max_seq_len=64, mtp_depth=0)
LOADER = LoaderConfig(seq_len=32, batch_size=2, seed=7)


def loss_fn(m, batch):
    out = m.forward(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                    with_mtp=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    return jnp.sum(losses * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


@nnx.jit
def train_step(m, opt, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
    opt.update(m, grads)
    return loss


def train(corpus: str, ckpt_dir: str, steps: int):
    m = model.Transformer(CFG, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    loader = make_loader(corpus, LOADER)
    ckpt = Checkpointer(ckpt_dir, max_to_keep=2)
    start = ckpt.restore(m, opt, loader) if ckpt.latest_step() is not None else 0
    print(json.dumps(dict(resumed_from=start)), flush=True)
    for step in range(start + 1, steps + 1):
        batch = next(loader)
        digest = hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
        loss = float(train_step(m, opt, {k: jnp.asarray(v) for k, v in batch.items()}))
        ckpt.save(step, m, opt, loader)
        print(json.dumps(dict(step=step, batch=digest, loss=loss.hex())), flush=True)
    ckpt.close()


class Big(nnx.Module):
    def __init__(self, value: float, n: int = 64 << 20):
        self.cfg = CFG
        self.w = nnx.Param(jnp.full((n,), value, jnp.float32))           # 256 MB


def bigsave(ckpt_dir: str):
    ckpt = Checkpointer(ckpt_dir, max_to_keep=3)
    ckpt.save(1, Big(1.0))
    ckpt.wait()
    big = Big(2.0)
    jax.block_until_ready(big.w[...])
    print("saving step 2", flush=True)
    ckpt.save(2, big)
    time.sleep(600)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "bigsave":
        bigsave(sys.argv[2])
    else:
        raise SystemExit(__doc__)
