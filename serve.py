"""Batch inference. `python serve.py` completes built-in prompts with the default train.py checkpoint.

Requests run through serving.Engine: a paged latent cache (64-token blocks), continuous batching
with chunked prefill and preempt-and-recompute, naive-MLA prefill and FlashMLA-style absorbed
decode. --input takes one prompt per line, or JSONL (a .jsonl file) with a "prompt" and any of
the sampling fields max_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids (and an
optional "id"). A bad line (malformed JSON, empty or over-long prompt, invalid field) gets an
error record in the output; the others complete. The last output line holds the statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

import model
from serving import Engine, EngineConfig, SamplingParams, format_summary
from storage.corpus import ByteTokenizer

PROMPTS = ["import os\n", "def main(", "class Path", "    return "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/tiny",
                   help="a train.py output or a Hugging Face DeepSeek-V2/V3 dir (with tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    p.add_argument("--input", help="one prompt per line, or a .jsonl file of requests (default: built-in prompts)")
    p.add_argument("--output", help="write one JSON record per request, then the statistics, here")
    p.add_argument("--max-running", type=int, default=16, help="sequences in the running batch")
    p.add_argument("--num-blocks", type=int, default=256, help="cache blocks of 64 tokens")
    p.add_argument("--chunk-tokens", type=int, default=256, help="prefill tokens per step (chunked prefill)")
    p.add_argument("--cache-dtype", choices=["auto", "float32", "bfloat16", "fp8"], default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="$ per accelerator-hour for the cost line")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
        args.engine = EngineConfig(num_blocks=args.num_blocks, max_running=args.max_running,
                                   chunk_tokens=args.chunk_tokens,
                                   cache_dtype=None if args.cache_dtype == "auto" else args.cache_dtype)
    except ValueError as e:
        p.error(str(e))
    return args


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` package), with the checkpoint's BOS/EOS."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        cfg = json.loads((directory / "config.json").read_text())
        eos = cfg.get("eos_token_id")
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.bos_id = cfg.get("bos_token_id")

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text).ids
        return ids if self.bos_id is None or ids[:1] == [self.bos_id] else [self.bos_id] + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class Bytes(ByteTokenizer):
    eos_ids = (ByteTokenizer.eos_id,)


def load(checkpoint: str, dtype: str = "float32"):
    ckpt = Path(checkpoint)
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no checkpoint at {ckpt}: run `python train.py` first or pass --checkpoint")
    tok = HFTokenizer(ckpt) if (ckpt / "tokenizer.json").exists() else Bytes()
    return model.load_hf_checkpoint(ckpt, dtype=dtype), tok


def read_requests(path: str | None) -> list[dict]:
    """One dict a line: {"prompt", "fields", "id"} or {"error"}; JSONL when the file ends in .jsonl."""
    if path is None:
        return [dict(id=i, prompt=t, fields={}) for i, t in enumerate(PROMPTS)]
    lines = Path(path).read_text().splitlines()
    if not path.endswith(".jsonl"):
        return [dict(id=i, prompt=t, fields={}) for i, t in enumerate(lines)]
    out = []
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError('a JSONL request must be an object with a string "prompt"')
            rid = obj.pop("id", i)
            prompt = obj.pop("prompt")
            out.append(dict(id=rid, prompt=prompt, fields=obj))
        except ValueError as e:       # json.JSONDecodeError is a ValueError
            out.append(dict(id=i, error=f"line {i + 1}: {e}"))
    return out


def serve(m: model.Transformer, tok, requests: list[dict], defaults: SamplingParams, config: EngineConfig,
          *, price_per_hour: float = 2.0, progress: bool = True) -> tuple[list[dict], dict]:
    """Run the requests; returns one record per request (input order) and the statistics."""
    engine = Engine(m, config, detokenize=tok.decode)
    records: list[dict] = [{} for _ in requests]
    rids = {}
    for i, r in enumerate(requests):
        if "error" in r:
            records[i] = dict(id=r["id"], error=r["error"])
            continue
        try:
            if not r["prompt"]:
                raise ValueError("empty prompt")
            params = SamplingParams.from_dict(r["fields"], defaults)
            params = SamplingParams.from_dict(dict(stop_token_ids=params.stop_token_ids + tok.eos_ids), params)
            rids[engine.add(tok.encode(r["prompt"]), params)] = i
            records[i] = dict(id=r["id"], prompt=r["prompt"])
        except (ValueError, TypeError) as e:
            records[i] = dict(id=r["id"], error=str(e))
    bar = tqdm(total=len(rids), unit="req", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    while engine.has_work():
        for c in engine.step():
            records[rids[c.rid]].update(completion=c.text, tokens=len(c.token_ids), finish_reason=c.finish_reason,
                                        ttft_s=round(c.ttft_s, 6), tpot_s=None if c.tpot_s is None else
                                        round(c.tpot_s, 6), preemptions=c.preemptions)
            bar.update(1)
        bar.set_postfix_str(f"{engine.stats.generated_tokens / (time.perf_counter() - start):.1f} tok/s",
                            refresh=False)
    bar.close()
    return records, engine.stats.summary(price_per_hour)


def generate(m: model.Transformer, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int,
             stop_id: int | None = None, config: EngineConfig = EngineConfig()) -> list[list[int]]:
    """Token ids for each prompt, through the engine (kept for the notebook and benchmarks)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=() if stop_id is None else (stop_id,))
    return [c.token_ids for c in Engine(m, config).run([(p, params) for p in prompts])]


def main(argv=None):
    args = parse_args(argv)
    m, tok = load(args.checkpoint, args.dtype)
    requests = read_requests(args.input)
    try:
        records, stats = serve(m, tok, requests, args.defaults, args.engine, price_per_hour=args.price_per_hour,
                               progress=not args.no_progress)
    except ValueError as e:               # an engine setting this model cannot take (e.g. fp8 cache shape)
        raise SystemExit(f"serve.py: {e}") from e
    for r in records:
        if "error" in r:
            print(f"--- request {r['id']}: error: {r['error']}")
        else:
            print(f"--- {r['prompt']!r}\n{r['prompt']}{r['completion']}")
    print(format_summary(stats) + "\n(wall time and TTFT include compiling the step functions)")
    if args.output:
        with open(args.output, "w") as sink:
            for r in records:
                sink.write(json.dumps(r) + "\n")
            sink.write(json.dumps(dict(stats=stats)) + "\n")
    return records, stats


if __name__ == "__main__":
    main()
