"""orcinus vs Hugging Face transformers' DeepseekV3ForCausalLM on CPU, same weights, one process.

Training: one optimizer step (forward, backward, AdamW) on a [batch, seq] batch.
Generation: greedy decoding of `new` tokens for `batch` prompts (KV/latent cache on both sides).
Ratios > 1 mean orcinus is faster. Both sides float32; torch uses all cores of this machine.

    python -m benchmarks.hf_compare [--steps 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

import model
import serve
import train
from benchmarks.report import publish, table


def _median_time(fn, repeat: int) -> float:
    fn()                                                       # warm-up (compilation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def tiny_pair():
    """The `tiny` preset without MTP (transformers runs none), float32, and its transformers
    DeepseekV3 twin holding the same weights: (cfg, ours, theirs)."""
    cfg = model.ModelConfig.preset("tiny", mtp_depth=0, max_seq_len=512)
    ours = model.Transformer(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf_checkpoint(ours, tmp)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    return cfg, ours, theirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    cfg, ours, theirs = tiny_pair()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)

    # -- generation --
    theirs.eval()                                         # generation first: identical weights
    prompts = rng.integers(0, cfg.vocab_size, (args.gen_batch, args.prompt)).astype(np.int32)
    g_ours = _median_time(lambda: serve.generate(ours, [list(r) for r in prompts], args.new, 0.0, 0), 2)
    tprompts = torch.as_tensor(prompts, dtype=torch.long)

    def torch_generate():
        with torch.no_grad():
            return theirs.generate(tprompts, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                   attention_mask=torch.ones_like(tprompts))

    g_theirs = _median_time(torch_generate, 2)
    ours_ids = np.array(serve.generate(ours, [list(r) for r in prompts], args.new, 0.0, 0))
    theirs_ids = torch_generate()[:, args.prompt:].numpy()
    agree = float(np.mean(ours_ids == theirs_ids))
    # -- training step --
    opt = nnx.Optimizer(ours, optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    jbatch = jnp.asarray(batch)
    t_ours = _median_time(lambda: jax.block_until_ready(train.train_step(ours, opt, jbatch, 0.0, 0.0)["loss"]),
                          args.steps)
    theirs.train()
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tbatch = torch.as_tensor(batch, dtype=torch.long)

    def torch_step():
        topt.zero_grad()
        out = theirs(tbatch[:, :-1], labels=tbatch[:, :-1].clone())
        out.loss.backward()
        topt.step()

    t_theirs = _median_time(torch_step, args.steps)
    tokens = args.batch * args.seq

    generated = args.gen_batch * args.new
    rows = [["train step (fwd+bwd+AdamW)", f"{args.batch}x{args.seq}", tokens / t_ours, tokens / t_theirs,
             t_theirs / t_ours],
            ["greedy generation", f"{args.gen_batch} x ({args.prompt}+{args.new})", generated / g_ours,
             generated / g_theirs, g_theirs / g_ours]]
    body = (f"`tiny` preset ({model.param_count(ours):,} parameters, no MTP), float32, same weights; "
            f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads). "
            f"Greedy tokens identical: {agree:.0%}.\n\n"
            + table(["workload", "shape", "orcinus tok/s", "transformers tok/s", "orcinus / transformers"], rows))
    publish("orcinus vs transformers DeepseekV3 on CPU", body, write=not args.no_write)


if __name__ == "__main__":
    main()
