"""The batch-inference engine: scheduler + paged cache + jitted, bucketed step functions.

Each step runs at most two jitted calls: a prefill call (a chunk for each prefilling sequence,
naive MLA, [B, T] padded to power-of-two buckets) and a decode call (one token for each decoding
sequence, absorbed MLA through FlashMLA, [B, 1]; or up to `decode_steps` tokens in one call when
nothing waits, each row stopping at its own token budget inside the call). Block tables are
padded to a power-of-two number of blocks too, so a long run compiles a bounded number of step
functions: (log2 max_running + 1) x (log2 blocks per sequence + 1) shapes for each of decode and
multi-step decode, times (log2 chunk_tokens + 1) token buckets for prefill. Sampling runs inside
the same call; only token ids come back to the host, with the real tokens each MoE layer routed
to each expert ([layers, experts] int32), which feed the engine's EPLB load window
(`Engine.expert_load`; `Engine.rebalance` re-places the experts). `DataParallelEngine` runs
several such engines side by side (`EngineConfig.replicas`).
"""

from __future__ import annotations

import array
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import Transformer
from serving import cache as paged
from serving.paged_model import Batch, forward_paged
from serving.sampler import SamplingParams, find_stop, sample
from serving.scheduler import Scheduler, Sequence
from serving.stats import ServingStats
from sharding import eplb

TRACES = [0]          # step-function traces (compilations) in this process


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_blocks: int = 256            # cache blocks of 64 tokens (per layer)
    max_running: int = 16            # sequences in the running batch
    chunk_tokens: int = 256          # prefill tokens a step (chunked prefill)
    cache_dtype: paged.CacheDType | None = None   # None: bfloat16, or float32 for a float32 model
    min_token_bucket: int = 16       # smallest prefill chunk bucket
    min_batch_bucket: int = 1        # raise these to compile fewer shapes (e.g. tests)
    min_block_bucket: int = 1
    decode_steps: int = 16           # decode iterations a call when nothing waits (multi-step); 1 = off
    bake_params: bool | None = None  # parameters as compile-time constants; None: on CPU for models <= 64 MiB
    load_window: int = 1024          # engine steps in the expert-load window (EPLB)
    replicas: int = 1                # data-parallel replicas (`DataParallelEngine`); budgets above are per replica

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"EngineConfig.replicas={self.replicas} must be >= 1")


@dataclasses.dataclass
class Completion:
    rid: int
    prompt_tokens: int
    token_ids: list[int]
    text: str | None
    finish_reason: str               # "stop" (stop token or string) or "length" (max_tokens, max_seq_len)
    ttft_s: float
    tpot_s: float | None             # mean time per output token after the first
    preemptions: int


def bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


_STEPS: dict = {}
BAKE_LIMIT_BYTES = 64 << 20


def _step_fn(graphdef, treedef, leaves, spec: paged.CacheSpec, absorbed: bool, bake: bool, steps: int = 1):
    """The jitted step for one model and cache: (leaves, kv, batch, sampling, limits) -> (tokens,
    logits, counts, kv), tokens [steps, B], logits [steps, B, V] and counts [L, E] (the real tokens
    each MoE layer routed to each expert, summed over the steps).

    steps > 1 (decode only) runs up to that many decode iterations in one call, each feeding back
    the token it sampled (multi-step scheduling: one dispatch and one host round trip per `steps`
    tokens). Row b takes part in the first limits[b] iterations only (then it is padding: no cache
    write, no expert count), and the loop ends when no row has an iteration left, so rows near
    their token budget share a call with the rest (their tokens past the limit are not read).
    steps == 1 ignores limits. Cached here, so the graphdef is hashed once per engine, not per
    call. bake=True closes over the parameters, making them compile-time constants: XLA:CPU then
    lays out and slices the stacked weights once at compile time instead of copying them every
    step (3-6x faster decode for the tiny model on CPU); such a step is specific to these
    parameter arrays.
    """
    key = (graphdef, treedef, spec, absorbed, steps, tuple(map(id, leaves)) if bake else None)
    if key not in _STEPS:
        def step(leaves, kv, batch: Batch, sampling, limits):
            TRACES[0] += 1
            m = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            temperature, top_k, top_p, seeds, counters = sampling

            def one(i, kv, tokens, valid):
                b = Batch(tokens, batch.positions + i, valid, batch.table,
                          jnp.where(valid[:, 0], batch.lengths + i, 0))
                logits, kv, counts = forward_paged(m, kv, b, absorbed=absorbed, spec=spec)
                return sample(logits, temperature, top_k, top_p, seeds, counters + i), logits, counts, kv

            if steps == 1:
                tokens, logits, counts, kv = one(0, kv, batch.tokens, batch.valid)
                return tokens[None], logits[None], counts, kv

            def body(carry):
                i, kv, tokens, out, out_logits, total = carry
                nxt, logits, counts, kv = one(i, kv, tokens, batch.valid & (i < limits)[:, None])
                return i + 1, kv, nxt[:, None], out.at[i].set(nxt), out_logits.at[i].set(logits), total + counts

            def more(carry):
                return (carry[0] < steps) & jnp.any(carry[0] < jnp.where(batch.valid[:, 0], limits, 0))

            B, cfg = batch.tokens.shape[0], m.cfg
            init = (jnp.int32(0), kv, batch.tokens, jnp.zeros((steps, B), jnp.int32),
                    jnp.zeros((steps, B, cfg.vocab_size), jnp.float32),
                    jnp.zeros((cfg.num_moe_layers, max(cfg.num_routed_experts, 1)), jnp.int32))
            _, kv, _, tokens, logits, counts = jax.lax.while_loop(more, body, init)
            return tokens, logits, counts, kv

        if bake:
            fn = jax.jit(lambda _, kv, batch, sampling, limits: step(leaves, kv, batch, sampling, limits),
                         donate_argnums=1)
        else:
            fn = jax.jit(step, donate_argnums=1)
        _STEPS[key] = (fn, leaves)           # the leaves stay referenced, so their ids stay theirs
    return _STEPS[key][0]


class _Serving:
    """What both engines share: run() over add() and step()."""

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far (cheap: a progress bar reads it every step)."""
        return self.stats.generated_tokens

    def run(self, requests: Iterable[tuple[list[int], SamplingParams]], progress=None) -> list[Completion]:
        """Complete every request; results in submission order. `progress(done, generated)` per step."""
        rids = [self.add(p, s) for p, s in requests]
        done: dict[int, Completion] = {}
        while self.has_work():
            for c in self.step():
                done[c.rid] = c
            if progress:
                progress(len(done), self.generated_tokens)
        return [done[r] for r in rids]


class Engine(_Serving):
    """engine = Engine(model); engine.add(prompt_ids, params); while engine.has_work(): engine.step().

    One replica; `make_engine` builds a `DataParallelEngine` when config.replicas > 1."""

    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(), *,
                 detokenize: Callable[[list[int]], str] | None = None, keep_logits: bool = False):
        if config.replicas != 1:
            raise ValueError(f"EngineConfig.replicas={config.replicas}: Engine is one replica; use "
                             "serving.make_engine (or DataParallelEngine) for several")
        cfg = model.cfg
        dtype = config.cache_dtype or ("float32" if cfg.dtype == "float32" else "bfloat16")
        self.cfg, self.config = cfg, config
        self.spec = paged.CacheSpec(cfg.num_layers, config.num_blocks, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype,
                                    bf16_bits=jax.default_backend() == "cpu")
        self._bake = config.bake_params
        self._build(model)
        self.kv = paged.init_cache(self.spec)
        self.scheduler = Scheduler(config.num_blocks, config.max_running, config.chunk_tokens)
        self.detokenize = detokenize
        self.keep_logits = keep_logits
        self.logits: dict[int, list[np.ndarray]] = {}     # rid -> logits of each sampled token (keep_logits)
        self.sequences: dict[int, Sequence] = {}          # rid -> unfinished request (finished ones leave)
        self.stats = ServingStats(num_blocks=config.num_blocks)
        # real tokens per (MoE layer, routed expert) over the last `load_window` steps; None without MoE layers
        self.expert_load = (eplb.ExpertLoad(cfg.num_moe_layers, cfg.num_routed_experts, config.load_window)
                            if cfg.num_moe_layers > 0 else None)
        self._step_counts = None
        self._next_rid = 0

    def _build(self, model: Transformer) -> None:
        """Hold the model as flat parameter leaves and build (or find) its jitted step functions;
        on a rebuild the old ones leave the cache (with the parameters they may have baked in)."""
        old = set(getattr(self, "_steps", {}).values())
        for key in [k for k, (fn, _) in _STEPS.items() if fn in old]:
            del _STEPS[key]
        graphdef, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self._graphdef, self._treedef = graphdef, treedef
        bake = self._bake
        if bake is None:
            size = sum(x.size * x.dtype.itemsize for x in self.leaves)
            bake = jax.default_backend() == "cpu" and size <= BAKE_LIMIT_BYTES
        self._steps = {a: _step_fn(graphdef, treedef, self.leaves, self.spec, a, bake) for a in (False, True)}
        if self.config.decode_steps > 1:
            self._steps["multi"] = _step_fn(graphdef, treedef, self.leaves, self.spec, True, bake,
                                            self.config.decode_steps)

    @property
    def device(self) -> jax.Device:
        """Where the engine computes: its cache's device."""
        (device,) = self.kv.devices()
        return device

    def model(self) -> Transformer:
        """The served model (a new module over the engine's parameter arrays)."""
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, self.leaves))

    # -- EPLB --
    def placement(self, num_gpus: int) -> eplb.Placement:
        """Where the served MoE layers' experts live now over num_gpus (identity before any rebalance)."""
        if self.expert_load is None:
            raise ValueError("the model has no MoE layers: EPLB has no experts to place")
        return eplb.placement_of(self.model(), num_gpus).layers(self.cfg.num_moe_layers)

    def rebalance(self, num_gpus: int, redundant: int = 0, *, num_groups: int | None = None,
                  num_nodes: int = 1, load: np.ndarray | None = None) -> dict:
        """Re-place the routed experts over num_gpus GPUs by the expert-load window (EPLB).

        The parameters move to E + redundant physical slots (replicas copy their expert, so outputs
        do not change) and the step functions are rebuilt; requests in flight carry on (the cache
        holds no expert state). num_groups defaults to the model's expert groups (hierarchical
        placement when they divide over num_nodes). Returns `eplb.report` for the served MoE layers:
        GPU max/mean load per layer under the placement held before and the new one.
        """
        E = self.cfg.num_routed_experts
        if self.expert_load is None:
            raise ValueError("the model has no MoE layers: EPLB has no experts to place")
        if num_gpus <= 0 or redundant < 0:
            raise ValueError(f"num_gpus={num_gpus} must be positive and redundant={redundant} non-negative")
        if (E + redundant) % num_gpus:
            raise ValueError(f"{E} experts + {redundant} redundant = {E + redundant} slots do not divide over "
                             f"{num_gpus} GPUs")
        m = self.model()
        old = eplb.placement_of(m, num_gpus)
        if old.num_physical % num_gpus:
            raise ValueError(f"the {old.num_physical} expert slots held now do not divide over {num_gpus} GPUs")
        load = self.expert_load.load() if load is None else load                   # [L, E]
        L = load.shape[0]
        mtp = np.ones((old.logcnt.shape[0] - L, E))          # MTP blocks do not run in serving: uniform load
        new = eplb.rebalance(np.concatenate([load, mtp]), E + redundant, num_groups or self.cfg.num_expert_groups,
                             num_nodes, num_gpus)
        eplb.apply_placement(m, None, new)
        self._build(_on_device(m, self.device))                        # new slot arrays: onto the engine's device
        return eplb.report(load, new.layers(L), previous=old.layers(L))

    # -- requests --
    def add(self, prompt: list[int], params: SamplingParams = SamplingParams(), *, arrival: float | None = None) -> int:
        """Queue a request; ValueError (nothing queued) for an empty or too-long prompt."""
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenize function (Engine(..., detokenize=tok.decode))")
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one token")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if len(prompt) + params.max_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's max_seq_len={self.cfg.max_seq_len}")
        seq = Sequence(self._next_rid, list(prompt), params, time.perf_counter() if arrival is None else arrival)
        self.scheduler.add(seq)
        self._next_rid += 1
        self.sequences[seq.rid] = seq
        self.stats.requests += 1
        self.stats.prompt_tokens += len(prompt)
        return seq.rid

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping --
    def step(self) -> list[Completion]:
        """One scheduler step; returns the requests that finished in it."""
        start = time.perf_counter()
        self.stats.start(start)
        plan = self.scheduler.schedule()
        finished = []
        self._step_counts = None
        if plan.prefill:
            rows = [(seq, seq.cached, n) for seq, n in plan.prefill]
            t0 = time.perf_counter()
            tokens = self._run(rows, absorbed=False)
            self.stats.prefill_s += time.perf_counter() - t0
            for (seq, _, n), tok in zip(rows, tokens):
                seq.cached += n
                if seq.pending == 0:
                    finished += self._append(seq, tok)
        if plan.decode:
            rows = [(seq, seq.cached, 1) for seq in plan.decode]
            limits = None if plan.prefill else self._multi_step_limits(plan.decode)
            tokens = self._run(rows, absorbed=True if limits is None else "multi", limits=limits)
            for seq, toks in zip(plan.decode, tokens):
                for tok in toks:
                    seq.cached += 1
                    done = self._append(seq, tok)
                    finished += done
                    if done:
                        break
        if self.expert_load is not None and self._step_counts is not None:
            self.expert_load.update(self._step_counts)
        self.stats.step(time.perf_counter(), self.scheduler.allocator.num_used, len(plan.preempted))
        return finished

    def _multi_step_limits(self, decode: list[Sequence]) -> list[int] | None:
        """Tokens each row generates in one multi-step call (up to K = decode_steps: its budget of
        max_tokens and max_seq_len may end sooner), or None when the call cannot run: something
        waits to be admitted, or a row's blocks cannot be reserved (reserved here)."""
        K = self.config.decode_steps
        if K <= 1 or self.scheduler.waiting:
            return None
        limits = [min(K, s.params.max_tokens - len(s.generated), self.cfg.max_seq_len - len(s.tokens))
                  for s in decode]
        if not all(self.scheduler.reserve(s, n) for s, n in zip(decode, limits)):
            return None
        return limits

    def _run(self, rows: list[tuple[Sequence, int, int]], absorbed, limits: list[int] | None = None) -> list:
        """Prefill rows -> one token each; decode rows -> a list of tokens each ([1], or up to K
        with per-row `limits` in a multi-step call)."""
        batch, sampling = self._pack(rows)
        row_limits = np.zeros(batch.tokens.shape[0], np.int32)
        row_limits[:len(rows)] = limits or 1
        tokens, logits, counts, self.kv = self._steps[absorbed](self.leaves, self.kv, batch, sampling, row_limits)
        tokens, counts = jax.device_get((tokens, counts))                         # [steps, B], [L, E]
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        if self.keep_logits:
            logits = np.asarray(logits)
            for i, (seq, start, n) in enumerate(rows):
                if start + n == len(seq.tokens):
                    self.logits.setdefault(seq.rid, []).extend(logits[:, i])
        if absorbed is False:
            return [int(t) for t in tokens[0, :len(rows)]]
        return [[int(t) for t in tokens[:, i]] for i in range(len(rows))]

    def _pack(self, rows: list[tuple[Sequence, int, int]]):
        B = bucket(len(rows), self.config.min_batch_bucket)
        T = 1 if rows[0][2] == 1 and all(n == 1 for _, _, n in rows) else \
            bucket(max(n for _, _, n in rows), self.config.min_token_bucket)
        M = bucket(max(len(seq.blocks) for seq, _, _ in rows), self.config.min_block_bucket)
        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        valid = np.zeros((B, T), bool)
        table = np.zeros((B, M), np.int32)
        lengths = np.zeros((B,), np.int32)
        temperature, top_p = np.zeros((B,), np.float32), np.ones((B,), np.float32)
        top_k, seeds, counters = np.zeros((B,), np.int32), np.zeros((B,), np.uint32), np.zeros((B,), np.int32)
        for i, (seq, start, n) in enumerate(rows):
            tokens[i, :n] = seq.tokens[start:start + n]
            positions[i, :n] = np.arange(start, start + n)
            valid[i, :n] = True
            table[i, :len(seq.blocks)] = seq.blocks
            lengths[i] = start + n
            p = seq.params
            temperature[i], top_k[i], top_p[i], seeds[i] = p.temperature, p.top_k, p.top_p, p.seed
            counters[i] = len(seq.generated)
        return Batch(tokens, positions, valid, table, lengths), (temperature, top_k, top_p, seeds, counters)

    def _append(self, seq: Sequence, token: int) -> list[Completion]:
        now = time.perf_counter()
        seq.tokens.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
        self.stats.generated_tokens += 1
        p = seq.params
        reason = None
        if token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.generated) >= p.max_tokens or len(seq.tokens) >= self.cfg.max_seq_len:
            reason = "length"
        if p.stop and self.detokenize is not None:
            cut = find_stop(self._text(seq), p.stop)
            if cut is not None:
                seq.text, reason = self._text(seq)[:cut], "stop"
        if reason is None:
            return []
        if seq.text is None and self.detokenize is not None:
            seq.text = self._text(seq)
        seq.finish_reason, seq.finished_at = reason, now
        self.scheduler.finish(seq)
        del self.sequences[seq.rid]                    # a long run holds only its live requests
        return [self._completion(seq)]

    def _text(self, seq: Sequence) -> str:
        return self.detokenize([t for t in seq.generated if t not in seq.params.stop_token_ids])

    def _completion(self, seq: Sequence) -> Completion:
        n = len(seq.generated)
        ttft = seq.first_token_at - seq.arrival
        tpot = (seq.finished_at - seq.first_token_at) / (n - 1) if n > 1 else None
        self.stats.finish(ttft, tpot, seq.preemptions)
        if seq.rid in self.logits:                     # a multi-step call may run past a stop
            del self.logits[seq.rid][n:]
        return Completion(seq.rid, len(seq.prompt), seq.generated, seq.text, seq.finish_reason, ttft, tpot,
                          seq.preemptions)


class _MergedLoad:
    """The replicas' expert-load windows as one (`eplb.ExpertLoad`'s reading side)."""

    def __init__(self, loads: list[eplb.ExpertLoad]):
        self._loads = loads

    def load(self) -> np.ndarray:
        return np.sum([w.load() for w in self._loads], axis=0)

    def __len__(self) -> int:
        return max(len(w) for w in self._loads)


class DataParallelEngine(_Serving):
    """config.replicas engines, each with its own paged cache, scheduler and running batch, stepping
    concurrently: DeepSeek's data-parallel attention (ANCHORS, day 6), where each DP rank serves its
    own requests and KV cache. A request goes to the replica with the fewest tokens outstanding
    (prompt + max_tokens of its unfinished requests); `step()` steps every replica with work, one
    thread each, and returns what finished in any. Replicas go round-robin over the local
    accelerators; on CPU they share the one device, and their concurrent XLA executions keep the
    cores busy where one execution's thunks leave them idle (threads, not processes: replicas in
    their own processes, each pinned to a core, were 15-25% slower on 2 cores; BENCHMARKS.md).
    Same API as `Engine` (rids are the group's); `rebalance` re-places experts by the summed load
    and rebuilds every replica.
    """

    def __init__(self, model: Transformer, config: EngineConfig, *,
                 detokenize: Callable[[list[int]], str] | None = None, keep_logits: bool = False,
                 devices: Sequence[jax.Device] | None = None):
        """devices: where the replicas go, round-robin (each holds the model and its cache there);
        default every local accelerator, or on CPU the first device (replicas share the cores)."""
        if config.replicas < 2:
            raise ValueError(f"EngineConfig.replicas={config.replicas}: a DataParallelEngine needs >= 2 (else Engine)")
        one = dataclasses.replace(config, replicas=1)
        if devices is None:
            devices = jax.local_devices() if jax.default_backend() != "cpu" else jax.local_devices()[:1]
        if not devices:
            raise ValueError("DataParallelEngine(devices=[]): name at least one device (or None for the default)")
        self.replicas = [_engine_on(devices[r % len(devices)], model, one, detokenize=detokenize,
                                    keep_logits=keep_logits) for r in range(config.replicas)]
        self.cfg, self.config = model.cfg, config
        self._pool = ThreadPoolExecutor(max_workers=config.replicas, thread_name_prefix="orcinus-replica")
        self._group_rid: list[dict[int, int]] = [{} for _ in self.replicas]   # unfinished requests only
        self._outstanding = [0] * config.replicas              # tokens still to process, per replica
        self._cost: dict[int, int] = {}                        # group rid -> prompt + max_tokens (unfinished)
        self._finished_logits: dict[int, list[np.ndarray]] = {}   # group rid -> logits (keep_logits)
        self._next_rid = 0
        self._steps = 0
        self._blocks_used_sum = self._blocks_used_peak = 0

    def add(self, prompt: list[int], params: SamplingParams = SamplingParams(), *, arrival: float | None = None) -> int:
        """Queue a request on the least-loaded replica; ValueError (nothing queued) as `Engine.add`."""
        r = min(range(len(self.replicas)), key=lambda i: self._outstanding[i])
        local = self.replicas[r].add(prompt, params, arrival=arrival)
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        self._group_rid[r][local] = rid
        self._cost[rid] = len(prompt) + params.max_tokens
        self._outstanding[r] += self._cost[rid]
        return rid

    def has_work(self) -> bool:
        return any(e.has_work() for e in self.replicas)

    def step(self) -> list[Completion]:
        """One step of every replica with work (concurrently); the requests that finished in it."""
        busy = [r for r, e in enumerate(self.replicas) if e.has_work()]
        if len(busy) == 1:
            results = [self.replicas[busy[0]].step()]
        else:
            results = list(self._pool.map(lambda r: self.replicas[r].step(), busy))
        self._steps += 1
        used = sum(e.scheduler.allocator.num_used for e in self.replicas)
        self._blocks_used_sum += used
        self._blocks_used_peak = max(self._blocks_used_peak, used)
        finished = []
        for r, done in zip(busy, results):
            for c in done:
                rid = self._group_rid[r].pop(c.rid)
                self._outstanding[r] -= self._cost.pop(rid)
                if c.rid in self.replicas[r].logits:
                    self._finished_logits[rid] = self.replicas[r].logits.pop(c.rid)
                finished.append(dataclasses.replace(c, rid=rid))
        return finished

    @property
    def generated_tokens(self) -> int:
        return sum(e.stats.generated_tokens for e in self.replicas)

    @property
    def stats(self) -> ServingStats:
        """The replicas' statistics as one (built on each read): counts and latencies pooled, wall time from the first
        start to the last step, cache use over all replicas' blocks, and prefill time as the
        replicas' sum over their count (they share the machine, so that is its share of the wall)."""
        parts = [e.stats for e in self.replicas]
        started = [s.started for s in parts if s.started is not None]
        last = [s.last for s in parts if s.last is not None]
        return ServingStats(
            num_blocks=sum(s.num_blocks for s in parts), steps=self._steps,
            **{f: sum(getattr(s, f) for s in parts)
               for f in ("requests", "finished", "prompt_tokens", "generated_tokens", "preemptions")},
            prefill_s=sum(s.prefill_s for s in parts) / len(parts),
            started=min(started) if started else None, last=max(last) if last else None,
            blocks_used_sum=self._blocks_used_sum, blocks_used_peak=self._blocks_used_peak,
            ttft=array.array("d", b"".join(s.ttft.tobytes() for s in parts)),
            tpot=array.array("d", b"".join(s.tpot.tobytes() for s in parts)))

    @property
    def logits(self) -> dict[int, list[np.ndarray]]:
        """Group rid -> logits of each sampled token (keep_logits)."""
        live = {self._group_rid[r][local]: lg for r, e in enumerate(self.replicas) for local, lg in e.logits.items()}
        return {**self._finished_logits, **live}

    @property
    def expert_load(self) -> _MergedLoad | None:
        return None if self.replicas[0].expert_load is None else _MergedLoad([e.expert_load for e in self.replicas])

    def model(self) -> Transformer:
        return self.replicas[0].model()

    def placement(self, num_gpus: int) -> eplb.Placement:
        return self.replicas[0].placement(num_gpus)

    def rebalance(self, num_gpus: int, redundant: int = 0, *, num_groups: int | None = None,
                  num_nodes: int = 1) -> dict:
        """`Engine.rebalance` by the load summed over the replicas, applied to every replica."""
        merged = self.expert_load
        if merged is None:
            raise ValueError("the model has no MoE layers: EPLB has no experts to place")
        report = self.replicas[0].rebalance(num_gpus, redundant, num_groups=num_groups, num_nodes=num_nodes,
                                            load=merged.load())
        for e in self.replicas[1:]:                                     # parameters stay on each replica's device
            e._build(_on_device(self.replicas[0].model(), e.device))
        return report


def _on_device(model: Transformer, device: jax.Device) -> Transformer:
    """The model with its parameters on `device`: the model itself when they are there already, so
    engines on one device share their compiled, parameter-baked step functions."""
    graphdef, state = nnx.split(model)
    if all(x.devices() == {device} for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
        return model
    return nnx.merge(graphdef, jax.device_put(state, device))


def _engine_on(device: jax.Device, model: Transformer, config: EngineConfig, **engine_kw) -> Engine:
    """An `Engine` whose parameters and cache live on `device`."""
    engine = Engine(_on_device(model, device), config, **engine_kw)
    engine.kv = jax.device_put(engine.kv, device)
    return engine


def make_engine(model: Transformer, config: EngineConfig = EngineConfig(), *,
                devices: Sequence[jax.Device] | None = None, **engine_kw) -> Engine | DataParallelEngine:
    """An `Engine`, or a `DataParallelEngine` when config.replicas > 1; `devices` places the
    replicas (round-robin), or one engine on devices[0]."""
    if config.replicas > 1:
        return DataParallelEngine(model, config, devices=devices, **engine_kw)
    if devices is None:
        return Engine(model, config, **engine_kw)
    if not devices:
        raise ValueError("make_engine(devices=[]): name at least one device (or None for the default)")
    return _engine_on(devices[0], model, config, **engine_kw)


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
             config: EngineConfig = EngineConfig(), **engine_kw) -> list[list[int]]:
    """Token ids generated for each prompt (continuous batching; replicas as config says)."""
    engine = make_engine(model, config, **engine_kw)
    return [c.token_ids for c in engine.run([(p, params) for p in prompts])]
