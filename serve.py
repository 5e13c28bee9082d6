"""Batch inference. `python serve.py` completes built-in prompts with the default train.py checkpoint.

Requests run through serving.Engine: a paged latent cache (64-token blocks), continuous batching
with chunked prefill and preempt-and-recompute, naive-MLA prefill and FlashMLA-style absorbed
decode; --replicas N runs N such engines side by side (data-parallel, requests to the least
loaded). --input takes one prompt per line, or JSONL (a .jsonl file) with a "prompt" and any of
the sampling fields max_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids (and an
optional "id"). A bad line (malformed JSON, empty or over-long prompt, invalid field) gets an
error record in the output; the others complete. The last output line holds the statistics.
--output streams: each record is written (in input order) as soon as it and those before it are
final, into OUTPUT.partial, which replaces OUTPUT when the run ends; an interrupted run keeps
the records that finished there, and an existing OUTPUT is untouched until then. --resume
continues such a run: the requests already in OUTPUT.partial are skipped (same --input); a
complete OUTPUT is left as it is (exit 0), so a retry loop may always pass --resume. The input is
read as the run goes and, with --output, records are not held once written, so memory holds a
window of requests (8 running batches, at least 256, in the engine; up to 16 times as many finished
records waiting for a longer one before them) however long the input (the statistics add 16 bytes
a request).

--eplb-report DIR: the engine counts the real tokens each MoE layer routes to each expert; at the
end EPLB re-places the experts over --eplb-gpus simulated GPUs (with --eplb-redundant replicas),
prints the per-layer GPU max/mean load before and after, adds it to the statistics, and saves
DIR/eplb.png (expert load per layer, GPU load per layer before and after).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

import model
from serving import EngineConfig, SamplingParams, format_summary, make_engine
from sharding import eplb
from storage.corpus import ByteTokenizer

PROMPTS = ["import os\n", "def main(", "class Path", "    return "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/tiny",
                   help="a train.py output or a Hugging Face DeepSeek-V2/V3 dir (with tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter/compute dtype")
    p.add_argument("--input", help="one prompt per line, or a .jsonl file of requests (default: built-in prompts)")
    p.add_argument("--output", help="write one JSON record per request (streamed, in input order), then the "
                   "statistics, here")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --output run: keep the records in OUTPUT.partial, skip their "
                   "requests (nothing to do when OUTPUT is complete; a fresh run when neither file exists)")
    p.add_argument("--max-running", type=int, default=16, help="sequences in the running batch")
    p.add_argument("--num-blocks", type=int, default=256, help="cache blocks of 64 tokens")
    p.add_argument("--chunk-tokens", type=int, default=256, help="prefill tokens per step (chunked prefill)")
    p.add_argument("--replicas", type=int, default=1,
                   help="data-parallel engine replicas stepping concurrently (DeepSeek's DP attention; on CPU, "
                        "one per core keeps the cores busy); the budgets above are each replica's")
    p.add_argument("--cache-dtype", choices=["auto", "float32", "bfloat16", "fp8"], default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="$ per accelerator-hour for the cost line")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eplb-report", metavar="DIR", help="write the EPLB report of the served expert loads and "
                   "DIR/eplb.png (a heatmap of expert and GPU load per layer)")
    p.add_argument("--eplb-gpus", type=int, default=8, metavar="G", help="EPLB: simulated GPUs to place experts on")
    p.add_argument("--eplb-redundant", type=int, default=0, metavar="R", help="EPLB: redundant expert slots")
    args = p.parse_args(argv)
    if args.eplb_gpus <= 0 or args.eplb_redundant < 0:
        p.error(f"--eplb-gpus must be positive (got {args.eplb_gpus}) and --eplb-redundant >= 0 "
                f"(got {args.eplb_redundant})")
    args.eplb = EPLBReport(Path(args.eplb_report), args.eplb_gpus, args.eplb_redundant) if args.eplb_report else None
    try:
        args.defaults = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
        args.engine = EngineConfig(num_blocks=args.num_blocks, max_running=args.max_running,
                                   chunk_tokens=args.chunk_tokens, replicas=args.replicas,
                                   cache_dtype=None if args.cache_dtype == "auto" else args.cache_dtype)
    except ValueError as e:
        p.error(str(e))
    return args


@dataclasses.dataclass(frozen=True)
class EPLBReport:
    """--eplb-report: after serving, rebalance the collected expert loads over num_gpus GPUs."""

    directory: Path
    num_gpus: int = 8
    redundant: int = 0

    def check(self, cfg: model.ModelConfig) -> None:
        """ValueError, before any work, when this model's experts cannot be placed so."""
        E, G = cfg.num_routed_experts, self.num_gpus
        if cfg.num_moe_layers == 0:
            raise ValueError("--eplb-report: the model has no MoE layers, so no expert loads to balance")
        if E % G:
            raise ValueError(f"--eplb-gpus {G}: the {E} experts do not divide over {G} GPUs")
        if (E + self.redundant) % G:
            raise ValueError(f"--eplb-redundant {self.redundant}: {E} experts + {self.redundant} redundant = "
                             f"{E + self.redundant} slots do not divide over --eplb-gpus {G}")

    def write(self, engine) -> dict:
        """Rebalance the engine's experts by its load window, save the heatmap; the report's numbers."""
        load = engine.expert_load.load()
        rep = engine.rebalance(self.num_gpus, self.redundant)
        self.directory.mkdir(parents=True, exist_ok=True)
        png = eplb.save_heatmap(load, engine.placement(self.num_gpus), self.directory / "eplb.png")
        return dict(num_gpus=self.num_gpus, redundant=self.redundant, steps=len(engine.expert_load),
                    tokens=float(load[0].sum()) / engine.cfg.num_experts_per_tok,      # each layer sees them all
                    mean_before=rep["mean_before"], mean_after=rep["mean_after"],
                    imbalance_before=rep["imbalance_before"].tolist(),
                    imbalance_after=rep["imbalance_after"].tolist(), heatmap=str(png))


def format_eplb(rep: dict) -> str:
    return (f"EPLB over {rep['num_gpus']} GPUs (+{rep['redundant']} redundant experts), loads of "
            f"{rep['tokens']:.0f} tokens in {rep['steps']} engine steps:\n"
            + eplb.format_report({k: rep[k] for k in ("imbalance_before", "imbalance_after", "mean_before",
                                                      "mean_after")})
            + f"\nheatmap: {rep['heatmap']}")


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


def read_requests(path: str | None) -> Iterator[dict]:
    """One dict a line, read as the run goes (never the whole file at once): {"prompt", "fields",
    "id"} or {"error"}; JSONL when the file ends in .jsonl. The file opens here, so a bad path fails
    before anything else; a line that is not UTF-8 gets an error record."""
    if path is None:
        return iter([dict(id=i, prompt=t, fields={}) for i, t in enumerate(PROMPTS)])
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SystemExit(f"serve.py: cannot read --input {path}: {e}") from e
    return _parse(f, jsonl=path.endswith(".jsonl"))


def _parse(f, jsonl: bool) -> Iterator[dict]:
    with f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode().removesuffix("\n").removesuffix("\r")
                if not jsonl:
                    yield dict(id=i, prompt=line, fields={})
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError('a JSONL request must be an object with a string "prompt"')
                rid = obj.pop("id", i)
                prompt = obj.pop("prompt")
                yield dict(id=rid, prompt=prompt, fields=obj)
            except ValueError as e:       # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                yield dict(id=i, error=f"line {i + 1}: {e}")


def count_lines(path: str | None) -> int:
    """Requests in --input (for the progress bar), counted without holding the file."""
    if path is None:
        return len(PROMPTS)
    with open(path, "rb") as f:
        n, last = 0, b"\n"
        while block := f.read(1 << 20):
            n, last = n + block.count(b"\n"), block[-1:]
    return n + (last != b"\n")


def serve(m: model.Transformer, tok, requests: Iterable[dict], defaults: SamplingParams, config: EngineConfig,
          *, price_per_hour: float = 2.0, progress: bool | int = True, eplb_report: EPLBReport | None = None,
          output: Output | None = None, window: int | None = None) -> tuple[list[dict], dict]:
    """Run the requests; returns one record per request (input order) and the statistics (with
    the EPLB report under "eplb" when asked for). With `output`, each record goes there as soon as it
    and those before it are final, then the statistics, and the records are not kept (returns []):
    memory stays bounded however long the input. Requests are read from `requests` as the run goes:
    at most `window` of them (default: 8 running batches, at least 256) in the engine at a time, and
    reading pauses while 16 x `window` finished records wait for an earlier, longer request (so one
    long request at the head does not starve the batch). `progress`: True, or the number of requests
    (the bar's total)."""
    if eplb_report is not None:
        eplb_report.check(m.cfg)
    engine = make_engine(m, config, detokenize=tok.decode)
    window = window or max(256, 8 * config.max_running * config.replicas)
    source = enumerate(requests)
    waiting: dict[int, dict] = {}        # index -> record of an admitted request (to be completed)
    rids: dict[int, int] = {}            # engine rid -> index
    final: dict[int, dict] = {}          # index -> final record not yet passed on
    kept: list[dict] = []
    passed = 0                           # records passed on (to output, or kept)

    def admit() -> bool:
        """Read and admit requests while the window has room; False once the input is exhausted."""
        while len(waiting) < window and len(final) < 16 * window:
            item = next(source, None)
            if item is None:
                return False
            i, r = item
            if "error" in r:
                final[i] = dict(id=r["id"], error=r["error"])
                bar.update(1)
                continue
            try:
                if not r["prompt"]:
                    raise ValueError("empty prompt")
                params = SamplingParams.from_dict(r["fields"], defaults)
                params = SamplingParams.from_dict(dict(stop_token_ids=params.stop_token_ids + tok.eos_ids), params)
                rids[engine.add(tok.encode(r["prompt"]), params)] = i
                waiting[i] = dict(id=r["id"], prompt=r["prompt"])
            except (ValueError, TypeError) as e:
                final[i] = dict(id=r["id"], error=str(e))
                bar.update(1)
        return True

    def pass_on() -> None:
        nonlocal passed
        ready = []
        while passed in final:
            ready.append(final.pop(passed))
            passed += 1
        if output is not None:
            output.write(ready)
        else:
            kept.extend(ready)

    bar = tqdm(total=None if progress is True else progress, unit="req", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    more = True
    while True:
        more = more and admit()
        pass_on()
        if not engine.has_work():
            if more:                     # the window filled with error records only, now passed on
                continue
            break
        for c in engine.step():
            i = rids.pop(c.rid)
            final[i] = dict(waiting.pop(i), completion=c.text, tokens=len(c.token_ids),
                            finish_reason=c.finish_reason, ttft_s=round(c.ttft_s, 6),
                            tpot_s=None if c.tpot_s is None else round(c.tpot_s, 6), preemptions=c.preemptions)
            bar.update(1)
        bar.set_postfix_str(f"{engine.generated_tokens / (time.perf_counter() - start):.1f} tok/s",
                            refresh=False)
    bar.close()
    stats = engine.stats.summary(price_per_hour)
    if eplb_report is not None:
        stats["eplb"] = eplb_report.write(engine)
    if output is not None:
        output.close(stats)
    return kept, stats


class Output:
    """--output as a stream: records go to PATH.partial in input order, each written and flushed
    once it and every record before it are final (an error, or a completion), so an interrupted
    run keeps what finished; `close` adds the statistics line and renames the file to PATH (an
    existing PATH survives until then). Opened before any work, so a bad path fails first.
    resume=True keeps the records an interrupted run left in PATH.partial (`kept`, its first
    requests'); without it an existing PATH.partial is an error, never silently overwritten."""

    def __init__(self, path: str, resume: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.path.is_dir():
            raise SystemExit(f"serve.py: --output {path} is a directory; name a file (e.g. {self.path / 'out.jsonl'})")
        self.kept = self._kept() if resume else []
        if not resume and self.partial.exists():
            raise SystemExit(f"serve.py: {self.partial} holds the records of an interrupted run: pass --resume to "
                             "continue it, or delete it to start over")
        try:
            self.file = open(self.partial, "a" if self.kept else "w")
        except OSError as e:
            raise SystemExit(f"serve.py: cannot write --output {path} ({self.partial}: {e.strerror}); "
                             "create the directory or pick another path") from e
        self.written = 0                              # records written by this run

    def _kept(self) -> list[dict]:
        """The complete records in PATH.partial; a torn last line (killed mid-write) is cut off."""
        if not self.partial.exists():
            if self.path.exists():                    # that run finished: nothing to resume, nothing redone
                print(f"serve.py: --resume: {self.path} is complete (no {self.partial.name} to resume); "
                      "nothing to do", file=sys.stderr)
                raise SystemExit(0)
            return []
        data = self.partial.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        try:
            kept = [json.loads(line) for line in whole.decode().splitlines()]
        except ValueError as e:
            raise SystemExit(f"serve.py: --resume: {self.partial} is not serve.py output ({e}); delete it") from e
        if kept and "stats" in kept[-1]:
            raise SystemExit(f"serve.py: --resume: {self.partial} is a finished run (it ends with the statistics)")
        if len(whole) < len(data):
            self.partial.write_bytes(whole)
        return kept

    def check(self, requests: Iterable[dict]) -> Iterator[dict]:
        """The requests still to run: those after the kept records, which must be the same input's."""
        requests = iter(requests)
        for k in self.kept:
            r = next(requests, None)
            if r is None or k.get("id") != r["id"] or ("prompt" in k and k["prompt"] != r.get("prompt")):
                raise SystemExit(f"serve.py: --resume: the {len(self.kept)} records in {self.partial} are not the "
                                 "first requests of this --input; resume with the same input, or delete the file")
        return requests

    def write(self, records: list[dict]) -> None:
        """Append final records (the next ones in input order) and flush."""
        for r in records:
            self.file.write(json.dumps(r) + "\n")
        self.written += len(records)
        self.file.flush()

    def close(self, stats: dict) -> None:
        if self.kept:
            stats = dict(stats, resumed_after=len(self.kept))     # the statistics cover this run's requests
        self.file.write(json.dumps(dict(stats=stats)) + "\n")
        self.file.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> None:
        """A failed run: keep the partial file if it holds records, say where."""
        if self.file.closed:
            return
        self.file.close()
        if self.written + len(self.kept):
            print(f"serve.py: the run stopped; the {self.written + len(self.kept)} records that finished are in "
                  f"{self.partial} (--resume continues)", file=sys.stderr)
        else:
            self.partial.unlink(missing_ok=True)


def generate(m: model.Transformer, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int,
             stop_id: int | None = None, config: EngineConfig = EngineConfig()) -> list[list[int]]:
    """Token ids for each prompt, through the engine (kept for the notebook and benchmarks)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=() if stop_id is None else (stop_id,))
    return [c.token_ids for c in make_engine(m, config).run([(p, params) for p in prompts])]


def main(argv=None):
    args = parse_args(argv)
    requests = read_requests(args.input)                  # bad paths fail before the model loads
    if args.resume and not args.output:
        raise SystemExit("serve.py: --resume continues an --output run; name its --output")
    output = Output(args.output, resume=args.resume) if args.output else None
    total = count_lines(args.input)
    if output is not None:
        requests = output.check(requests)
        total -= len(output.kept)
    try:
        m, tok = load(args.checkpoint, args.dtype)
        records, stats = serve(m, tok, requests, args.defaults, args.engine, price_per_hour=args.price_per_hour,
                               progress=False if args.no_progress else total, eplb_report=args.eplb, output=output)
    except ValueError as e:               # an engine setting this model cannot take (e.g. fp8 cache shape)
        raise SystemExit(f"serve.py: {e}") from e
    finally:
        if output is not None:
            output.abandon()                  # a no-op once serve() has closed it
    for r in records:
        if "error" in r:
            print(f"--- request {r['id']}: error: {r['error']}")
        else:
            print(f"--- {r['prompt']!r}\n{r['prompt']}{r['completion']}")
    if output is not None:
        print(f"{output.written} records written to {output.path}"
              + (f" after the {len(output.kept)} an earlier run wrote" if output.kept else ""))
    print(format_summary(stats) + "\n(wall time and TTFT include compiling the step functions)")
    if "eplb" in stats:
        print(format_eplb(stats["eplb"]))
    return records, stats


if __name__ == "__main__":
    main()
