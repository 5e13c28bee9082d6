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


def hf_pair(cfg: model.ModelConfig):
    """Our model for `cfg` (float32) and its transformers DeepseekV3 twin holding the same weights."""
    ours = model.Transformer(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf_checkpoint(ours, tmp)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    return ours, theirs


def tiny_pair():
    """The `tiny` preset without MTP (transformers runs none), float32, and its transformers
    DeepseekV3 twin holding the same weights: (cfg, ours, theirs)."""
    cfg = model.ModelConfig.preset("tiny", mtp_depth=0, max_seq_len=512)
    return (cfg, *hf_pair(cfg))


def matmul_ceiling(n: int = 2048, repeat: int = 5) -> float:
    """FLOP/s of XLA's float32 n x n x n matmul on this machine: the peak MFU is measured against."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / _median_time(lambda: jax.block_until_ready(f(a)), repeat)


def compare_train(cfg: model.ModelConfig, batch: int, seq: int, steps: int, ceiling: float, label: str) -> list:
    """One optimizer step (forward, backward, AdamW (0.9, 0.95), wd 0.1) on both sides: a table row."""
    ours, theirs = hf_pair(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    opt = nnx.Optimizer(ours, optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
    jbatch = jnp.asarray(tokens)
    t_ours = _median_time(lambda: jax.block_until_ready(train.train_step(ours, opt, jbatch, 0.0, 0.0)["loss"]), steps)
    theirs.train()
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tbatch = torch.as_tensor(tokens, dtype=torch.long)

    def torch_step():
        topt.zero_grad()
        out = theirs(tbatch[:, :-1], labels=tbatch[:, :-1].clone())
        out.loss.backward()
        topt.step()

    t_theirs = _median_time(torch_step, steps)
    n = batch * seq
    fpt = train.flops_per_token(cfg, seq)
    return [label, f"{model.param_count(ours) / 1e6:.1f} M", f"{batch}x{seq}", n / t_ours, n / t_theirs,
            f"{n / t_ours * fpt / ceiling:.1%}", f"{n / t_theirs * fpt / ceiling:.1%}", t_theirs / t_ours]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--small-batch", type=int, default=2)
    p.add_argument("--small-seq", type=int, default=256)
    p.add_argument("--small-layers", type=int, default=2,
                   help="layers of the `small` preset kept (its 12 do not fit two training copies in this host)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    load = os.getloadavg()[0]
    ceiling = matmul_ceiling()
    cfg, ours, theirs = tiny_pair()
    rng = np.random.default_rng(0)

    # -- generation --
    theirs.eval()
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
    generated = args.gen_batch * args.new
    del ours, theirs

    # -- training steps: tiny, and `small` cut to a few layers (float32 on both sides) --
    small = model.ModelConfig.preset("small", mtp_depth=0, num_layers=args.small_layers, max_seq_len=4096,
                                     dtype="float32", param_dtype="float32")
    rows = [compare_train(cfg, args.batch, args.seq, args.steps, ceiling, "tiny"),
            compare_train(small, args.small_batch, args.small_seq, max(2, args.steps // 2), ceiling,
                          f"small, {args.small_layers} layers")]
    body = (f"float32 on both sides, same weights, no MTP (transformers runs none); transformers "
            f"{transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads). Train step = "
            f"forward + backward + AdamW; MFU = tokens/s x training FLOPs a token (`train.flops_per_token`) / this "
            f"machine's XLA float32 2048^3 matmul rate, {ceiling / 1e9:.0f} GFLOP/s, measured in the same run. "
            f"1-minute load average at the start: {load:.2f} on {os.cpu_count()} cores.\n\n"
            + table(["train step", "params", "batch", "orcinus tok/s", "transformers tok/s", "orcinus MFU",
                     "transformers MFU", "orcinus / transformers"], rows)
            + "\n\n" + table(["greedy generation (tiny)", "orcinus tok/s", "transformers tok/s",
                               "orcinus / transformers", "tokens identical"],
                              [[f"{args.gen_batch} x ({args.prompt}+{args.new})", generated / g_ours,
                                generated / g_theirs, g_theirs / g_ours, f"{agree:.0%}"]]))
    publish("orcinus vs transformers DeepseekV3 on CPU", body, write=not args.no_write)


if __name__ == "__main__":
    main()
