"""Batch inference. `python serve.py` completes built-in prompts with the default train.py checkpoint.

Prefill runs the naive MLA form and writes the latent cache; decode runs the absorbed form over
it (the FlashMLA computation), one token per step for the whole batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model
from storage.corpus import ByteTokenizer

PROMPTS = ["import os\n", "def main(", "class Path", "    return "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="runs/tiny", help="a train.py output or HF DeepSeek checkpoint dir")
    p.add_argument("--input", help="a file with one prompt per line (default: built-in prompts)")
    p.add_argument("--output", help="write completions as JSONL here")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_tokens <= 0 or args.temperature < 0:
        p.error("--max-tokens must be positive and --temperature non-negative")
    return args


@nnx.jit(static_argnames="absorbed")
def _extend(m, tokens, cache, num_new, absorbed):
    return m.extend(tokens, cache, num_new=num_new, absorbed=absorbed)


def generate(m: model.Transformer, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int,
             stop_id: int | None = None) -> list[list[int]]:
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() == 0:
        raise ValueError("empty prompt: every prompt needs at least one token")
    width = int(lengths.max())
    if width + max_tokens > m.cfg.max_seq_len:
        raise ValueError(f"prompt ({width}) + max_tokens ({max_tokens}) exceeds max_seq_len={m.cfg.max_seq_len}")
    padded = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    cache = m.init_cache(len(prompts), width + max_tokens)
    logits, cache = _extend(m, jnp.asarray(padded), cache, jnp.asarray(lengths, jnp.int32), absorbed=False)
    last = logits[jnp.arange(len(prompts)), jnp.asarray(lengths) - 1]
    key = jax.random.key(seed)
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(max_tokens):
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, last / temperature) if temperature > 0 else jnp.argmax(last, -1)
        for i, t in enumerate(np.asarray(nxt)):
            if not done[i]:
                out[i].append(int(t))
                done[i] = stop_id is not None and int(t) == stop_id
        if done.all():
            break
        logits, cache = _extend(m, nxt[:, None].astype(jnp.int32), cache, None, absorbed=True)
        last = logits[:, 0]
    return out


def main(argv=None):
    args = parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no checkpoint at {ckpt}: run `python train.py` first or pass --checkpoint")
    m = model.load_hf_checkpoint(ckpt)
    tok = ByteTokenizer()
    texts = Path(args.input).read_text().splitlines() if args.input else PROMPTS
    start = time.perf_counter()
    completions = generate(m, [tok.encode(t) for t in texts], args.max_tokens, args.temperature, args.seed,
                           stop_id=tok.eos_id)
    elapsed = time.perf_counter() - start
    generated = sum(len(c) for c in completions)
    sink = open(args.output, "w") if args.output else None
    for text, ids in zip(texts, completions):
        print(f"--- {text!r}\n{text}{tok.decode(ids)}")
        if sink:
            sink.write(json.dumps(dict(prompt=text, completion=tok.decode(ids), tokens=len(ids))) + "\n")
    print(f"{len(texts)} requests, {generated} tokens in {elapsed:.1f}s ({generated / elapsed:.1f} tok/s, "
          f"compile included)")


if __name__ == "__main__":
    main()
