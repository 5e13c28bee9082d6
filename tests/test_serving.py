"""The serving engine: paged cache, scheduler, sampler, and the engine against a no-cache greedy loop."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
import serve
from pallas_kernels import flash_mla
from serving import (PAGE, BlockAllocator, CacheSpec, DataParallelEngine, Engine, EngineConfig, SamplingParams,
                     Scheduler, Sequence, make_engine)
from serving import cache as paged
from serving import engine as engine_mod
from serving.paged_model import latent_attention, paged_attention
from serving.sampler import sample
from storage.corpus import ByteTokenizer
from cuda_lowering import lower_for_cuda, pretend_hopper

LENGTHS = (1, 3, 17, 62, 130)          # 62 + NEW crosses a block; 130 > 2 blocks and > 4 chunks of 32
NEW = 6
WIDTH = 144                            # the reference loop's padded length (>= 130 + 6)
# fixed buckets: one prefill and one decode shape per cache size, so the suite compiles little
SMALL = dict(max_running=4, chunk_tokens=32, min_token_bucket=32, min_batch_bucket=4, min_block_bucket=4,
             decode_steps=4)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def net():
    cfg = model.ModelConfig.preset("tiny")
    assert cfg.dtype == "float32" and cfg.param_dtype == "float32"
    return model.Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(0, 512, n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(net, prompts):
    """Greedy tokens and their logits from model(tokens) over the whole sequence each step, no cache."""
    full = nnx.jit(lambda m, t: m(t))
    seqs, logits = [list(p) for p in prompts], [[] for _ in prompts]
    for _ in range(NEW):
        padded = np.zeros((len(seqs), WIDTH), np.int32)              # causal: padding after never matters
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
        out = np.asarray(full(net, jnp.asarray(padded)))
        for i, s in enumerate(seqs):
            logits[i].append(out[i, len(s) - 1])
            s.append(int(out[i, len(s) - 1].argmax()))
    return [(s[len(p):], lg) for s, p, lg in zip(seqs, prompts, logits)]


@pytest.mark.parametrize("num_blocks, max_running", [(64, 4), (4, 4)], ids=["ample", "preempting"])
def test_engine_greedy_equals_full_recompute(net, prompts, reference, num_blocks, max_running):
    before = engine_mod.TRACES[0]
    steps = SMALL["decode_steps"] if num_blocks > 4 else 1      # multi-step decode in one run (compile less)
    cfg = EngineConfig(num_blocks=num_blocks, **{**SMALL, "max_running": max_running, "decode_steps": steps})
    engine = Engine(net, cfg, keep_logits=True)
    done = engine.run([(p, SamplingParams(max_tokens=NEW)) for p in prompts])
    assert [c.token_ids for c in done] == [ref for ref, _ in reference]
    for c, (_, ref_logits) in zip(done, reference):
        # logits of token 0 come from a prefill (naive form), the rest from paged absorbed decode
        # (or, after a preemption, from the recompute prefill)
        errs = [rel_err(a, b) for a, b in zip(engine.logits[c.rid], ref_logits)]
        assert max(errs) < 1e-5, (c.rid, int(np.argmax(errs)), max(errs))
    stats = engine.stats.summary()
    assert stats["generated_tokens"] == NEW * len(prompts) and stats["finished"] == len(prompts)
    assert engine.sequences == {}                            # finished requests leave (a long run stays bounded)
    if num_blocks == 4:       # 256 cache tokens for 5 prompts of up to 136: someone must be preempted
        assert stats["preemptions"] > 0 and sum(c.preemptions for c in done) == stats["preemptions"]
    assert stats["cache_utilisation_peak"] <= 1.0
    assert engine.scheduler.allocator.num_free == num_blocks          # every block returned
    assert engine_mod.TRACES[0] - before <= 3              # one prefill, one decode, one 4-step decode shape


def test_paged_decode_logits_equal_naive_forward(net, prompts, reference):
    """Absorbed decode through the FlashMLA interface, alone: prefill one chunk, then decode only."""
    engine = Engine(net, EngineConfig(num_blocks=64, **{**SMALL, "chunk_tokens": 256, "min_token_bucket": 256}),
                    keep_logits=True)
    rid = engine.add(prompts[3], SamplingParams(max_tokens=NEW))
    engine.step()                                                     # the whole prompt in one prefill
    seq = engine.sequences[rid]
    assert seq.pending == 1 and len(seq.generated) == 1
    while engine.has_work():
        plan_decode_only = all(s.pending == 1 for s in engine.scheduler.running)
        assert plan_decode_only
        engine.step()
    assert engine.stats.steps == 3        # prefill, then multi-step decode calls of 4 tokens and of 1
    _, ref_logits = reference[3]
    errs = [rel_err(a, b) for a, b in zip(engine.logits[rid][1:], ref_logits[1:])]
    assert len(errs) == NEW - 1 and max(errs) < 1e-5, errs


def test_multi_step_rows_with_different_budgets(net, prompts, reference):
    """One multi-step call serves rows that need fewer tokens than its K: each row stops at its own
    max_tokens inside the call (no cache write or expert count after), the others go on."""
    budgets = (2, 6, 3, 5, 1)
    engine = Engine(net, EngineConfig(num_blocks=64, **{**SMALL, "max_running": 8, "min_batch_bucket": 8,
                                                         "chunk_tokens": 256, "min_token_bucket": 256}))
    done = engine.run([(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, budgets)])
    assert [c.token_ids for c in done] == [ref[:n] for (ref, _), n in zip(reference, budgets)]
    assert [c.finish_reason for c in done] == ["length"] * len(budgets)
    # one prefill step (every prompt in one chunk of 256), then calls of up to 4 tokens: 5 more tokens at most
    assert engine.stats.steps == 3
    load = engine.expert_load.load()                                   # real tokens only, each routed to k experts
    decoded = sum(budgets) - len(budgets)                              # the first token of each comes from prefill
    assert load.sum() == (sum(LENGTHS) + decoded) * net.cfg.num_experts_per_tok * net.cfg.num_moe_layers


def test_data_parallel_engine_equals_reference(net, prompts, reference):
    """Two replicas stepping concurrently: the same greedy tokens and logits as the no-cache loop,
    every request on one replica (both used), statistics and expert loads pooled, and a rebalance
    that re-places the experts of both replicas without changing what they generate."""
    config = EngineConfig(num_blocks=64, **{**SMALL, "max_running": 4}, replicas=2)
    with pytest.raises(ValueError, match="make_engine"):
        Engine(net, config)
    engine = make_engine(net, config, keep_logits=True)
    assert isinstance(engine, DataParallelEngine) and len(engine.replicas) == 2
    done = engine.run([(p, SamplingParams(max_tokens=NEW)) for p in prompts])
    assert [c.rid for c in done] == list(range(len(prompts)))
    assert [c.token_ids for c in done] == [ref for ref, _ in reference]
    for c, (_, ref_logits) in zip(done, reference):
        assert max(rel_err(a, b) for a, b in zip(engine.logits[c.rid], ref_logits)) < 1e-5
    assert all(e.stats.requests > 0 for e in engine.replicas)
    stats = engine.stats.summary()
    assert stats["finished"] == stats["requests"] == len(prompts) and stats["generated_tokens"] == NEW * len(prompts)
    assert stats["prompt_tokens"] == sum(LENGTHS) and stats["cache_utilisation_peak"] <= 1.0
    load = engine.expert_load.load()
    routed = net.cfg.num_experts_per_tok * net.cfg.num_moe_layers
    assert load.sum() == (sum(LENGTHS) + (NEW - 1) * len(prompts)) * routed
    report = engine.rebalance(num_gpus=2, redundant=2)
    assert report["mean_after"] <= report["mean_before"]
    assert {e.placement(2).num_physical for e in engine.replicas} == {net.cfg.num_routed_experts + 2}
    assert not any(engine._group_rid) and not engine._cost      # finished requests leave the group's maps
    again = engine.run([(p, SamplingParams(max_tokens=NEW)) for p in prompts[:3]])
    assert [c.token_ids for c in again] == [ref for ref, _ in reference[:3]]
    assert [c.rid for c in again] == [5, 6, 7]                   # group rids stay unique
    assert max(rel_err(a, b) for a, b in zip(engine.logits[7], reference[2][1])) < 1e-5


def test_data_parallel_replicas_on_their_own_devices(net, prompts, reference):
    """Replicas placed on named devices (here two of the suite's simulated CPU devices, as on a
    multi-GPU host): each holds its parameters and cache on its device and computes there, and the
    tokens are still the no-cache loop's; make_engine places one engine the same way."""
    devices = jax.local_devices()[1:3]
    assert len(devices) == 2, "conftest simulates 8 CPU devices"
    config = EngineConfig(num_blocks=64, **{**SMALL, "max_running": 4}, replicas=2)
    with pytest.raises(ValueError, match="at least one device"):
        DataParallelEngine(net, config, devices=[])
    engine = make_engine(net, config, devices=devices)
    for replica, device in zip(engine.replicas, devices):
        assert replica.kv.devices() == {device}
        assert {d for leaf in replica.leaves for d in leaf.devices()} == {device}
    done = engine.run([(p, SamplingParams(max_tokens=NEW)) for p in prompts])
    assert [c.token_ids for c in done] == [ref for ref, _ in reference]
    assert all(e.stats.requests > 0 for e in engine.replicas)
    assert [e.kv.devices() for e in engine.replicas] == [{d} for d in devices]      # the cache stayed put
    engine.rebalance(num_gpus=2, redundant=2)                          # rebuilt replicas stay on their devices
    for replica, device in zip(engine.replicas, devices):
        assert {d for leaf in replica.leaves for d in leaf.devices()} == {device}
    again = engine.run([(p, SamplingParams(max_tokens=NEW)) for p in prompts[:2]])
    assert [c.token_ids for c in again] == [ref for ref, _ in reference[:2]]
    single = make_engine(net, EngineConfig(num_blocks=64, **SMALL), devices=devices[1:])   # one engine, placed
    assert isinstance(single, Engine) and single.kv.devices() == {devices[1]}
    assert [c.token_ids for c in single.run([(prompts[2], SamplingParams(max_tokens=NEW))])] == [reference[2][0]]
    assert single.kv.devices() == {devices[1]}


def test_seeded_sampling_reproducible_across_batches(net, prompts):
    params = [SamplingParams(max_tokens=NEW, temperature=1.0, top_k=50, top_p=0.9, seed=s) for s in (1, 2, 1)]
    cfg = EngineConfig(num_blocks=64, **SMALL)
    together = Engine(net, cfg).run([(prompts[2], p) for p in params])
    alone = Engine(net, cfg).run([(prompts[2], params[0])])
    with_others = Engine(net, cfg).run([(prompts[4], params[1]), (prompts[2], params[0])])
    assert together[0].token_ids == together[2].token_ids == alone[0].token_ids == with_others[1].token_ids
    assert together[0].token_ids != together[1].token_ids


def test_sampler_filters():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)), jnp.float32)
    B = logits.shape[0]
    ones, zeros = jnp.ones(B), jnp.zeros(B, jnp.int32)
    seeds = jnp.arange(B, dtype=jnp.uint32)
    draw = jax.jit(sample)
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert (draw(logits, 0 * ones, zeros, ones, seeds, zeros) == greedy).all()
    assert (draw(logits, ones, zeros + 1, ones, seeds, zeros) == greedy).all()          # top_k = 1
    assert (draw(logits, ones, zeros, ones * 1e-6, seeds, zeros) == greedy).all()       # top_p -> 0
    top2 = np.asarray(jnp.argsort(-logits, -1)[:, :2])
    draws = np.stack([draw(logits, ones * 5, zeros + 2, ones, seeds, zeros + c) for c in range(16)])
    assert ((draws[..., None] == top2[None]).any(-1)).all()                            # only the top 2
    assert (draws != greedy).any() and (draws == greedy).any()                         # and it does sample
    again = np.stack([draw(logits, ones * 5, zeros + 2, ones, seeds, zeros + c) for c in range(16)])
    assert (draws == again).all()                                                      # seeded


@pytest.mark.parametrize("fields, words", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=1.5), "top_k"), (dict(seed=-3), "seed"), (dict(stop=[""]), "stop"), (dict(bogus=1), "unknown"),
])
def test_sampling_params_reject(fields, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams.from_dict(fields)


def _seq(rid, n, max_tokens=4):
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=max_tokens), 0.0)


def test_scheduler_chunks_admits_fcfs_and_preempts_newest():
    s = Scheduler(num_blocks=4, max_running=2, chunk_tokens=100)
    a, b, c = _seq(0, 150), _seq(1, 30), _seq(2, 10)
    for q in (a, b, c):
        s.add(q)
    plan = s.schedule()                       # a takes the whole budget: chunked prefill
    assert [(q.rid, n) for q, n in plan.prefill] == [(0, 100)] and len(a.blocks) == 2
    a.cached += 100
    plan = s.schedule()                       # a's last 50 tokens, then b; c waits (max_running = 2)
    assert [(q.rid, n) for q, n in plan.prefill] == [(0, 50), (1, 30)]
    assert s.allocator.num_free == 0 and [q.rid for q in s.waiting] == [2]
    a.tokens, a.cached = list(range(193)), 192           # a's 3 blocks are full: its next token needs a 4th
    b.tokens, b.cached = list(range(31)), 30
    plan = s.schedule()                       # no block free: the newest (b) is preempted for a
    assert [q.rid for q in plan.preempted] == [1] and [q.rid for q in plan.decode] == [0]
    assert [q.rid for q in s.waiting] == [1, 2] and b.cached == 0 and b.preemptions == 1 and len(a.blocks) == 4
    with pytest.raises(ValueError, match="cache blocks"):
        s.add(_seq(3, 200, max_tokens=100))


def test_allocator():
    alloc = BlockAllocator(4)
    first = alloc.allocate(3)
    assert first == [0, 1, 2] and alloc.allocate(2) is None and alloc.num_free == 1
    alloc.free(first)
    assert alloc.num_used == 0 and alloc.allocate(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype, tol, bits", [("bfloat16", 1e-2, False), ("bfloat16", 1e-2, True),
                                             ("fp8", 8e-2, False)])
def test_paged_cache_roundtrip_and_flash_mla(dtype, tol, bits):
    """Write latents into scattered blocks, read them back, and attend over them with FlashMLA's
    shapes (512 + 64): against attention over the unpaged values."""
    spec = CacheSpec(num_layers=2, num_blocks=6, latent_dim=512, rope_dim=64, dtype=dtype, bf16_bits=bits)
    rng = np.random.default_rng(1)
    ckv = jnp.asarray(rng.normal(size=(2, 100, 512)), jnp.float32)
    krope = jnp.asarray(rng.normal(size=(2, 100, 64)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(2, 1, 8, 576)), jnp.float32)
    table = jnp.asarray([[4, 1], [0, 5]], jnp.int32)
    lengths = jnp.asarray([100, 90], jnp.int32)

    @jax.jit
    def paged_roundtrip(ckv, krope, q):
        positions = jnp.broadcast_to(jnp.arange(100), (2, 100))
        slots = jnp.take_along_axis(table, positions // PAGE, 1) * PAGE + positions % PAGE
        kv = paged.write(paged.init_cache(spec), 1, ckv, krope, slots.at[1, 90:].set(-1), spec)
        got_c, got_r = paged.gather(kv, 1, table, spec, jnp.float32)
        return got_c, got_r, paged_attention(q, kv, paged.layer_table(table, 1, spec), lengths, 0.05, spec)

    @jax.jit
    def unpaged(ckv, krope, q):
        dense = jnp.concatenate([ckv, krope], -1)[:, None, :, None]      # [B, 1 page of 100, Hkv, D]
        return jnp.stack([flash_mla.flash_mla_reference(q[i:i + 1], dense[i], jnp.zeros((1, 1), jnp.int32),
                                                        lengths[i:i + 1], softmax_scale=0.05)[0][0]
                          for i in range(2)])

    got_c, got_r, out = paged_roundtrip(ckv, krope, q)
    assert rel_err(got_c[0, :100], ckv[0]) < tol and rel_err(got_r[1, :90], krope[1, :90]) < tol
    assert float(jnp.abs(got_c[1, 90:]).max()) == 0                 # dropped slots stay empty
    assert rel_err(out, unpaged(ckv, krope, q)) < tol


@pytest.mark.parametrize("latent, rope", [(64, 16), (512, 64)])
def test_bf16_cache_writes_in_place_on_cpu(latent, rope):
    """A bfloat16 cache on CPU is stored as uint16 bits: XLA:CPU compiles a bf16 scatter as a float32
    round trip of the whole pool (every layer's, every token), an integer scatter in place. The
    compiled write holds no pool-sized float32 array, and an engine's reads see the same values."""
    spec = CacheSpec(num_layers=2, num_blocks=64, latent_dim=latent, rope_dim=rope, bf16_bits=True)
    pool = paged.init_cache(spec)
    assert pool.dtype == jnp.uint16 and spec.bytes_per_token == 2 * 2 * (latent + rope)
    ckv, krope = jnp.ones((2, 1, latent)), jnp.ones((2, 1, rope))
    write = jax.jit(lambda kv, c, r, s: paged.write(kv, 1, c, r, s, spec), donate_argnums=0)
    hlo = write.lower(pool, ckv, krope, jnp.array([[3], [70]], jnp.int32)).compile().as_text()
    assert f"f32[{pool.shape[0]},64,1,{latent + rope}]" not in hlo
    assert "u16[" in hlo and "input_output_alias" in hlo
    engine = Engine(model.Transformer(model.ModelConfig.preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0)),
                    EngineConfig(num_blocks=4))
    assert engine.kv.dtype == (jnp.uint16 if jax.default_backend() == "cpu" else jnp.bfloat16)


def test_latent_attention_equals_reference_and_ignores_stale_slots():
    """Serving's XLA decode attention equals FlashMLA's reference (varlen, several blocks, an empty
    row), and what a block's previous owner left behind never reaches the new owner: the cache
    stores non-finite values as 0, so masked slots add exactly 0 without a zeroing pass."""
    spec = CacheSpec(num_layers=1, num_blocks=6, latent_dim=64, rope_dim=16, dtype="float32")
    rng = np.random.default_rng(2)
    table = jnp.asarray([[3, 1, 5], [0, 2, 4], [2, 0, 0]], jnp.int32)
    lengths = jnp.asarray([150, 70, 0], jnp.int32)
    q = jnp.asarray(rng.normal(size=(3, 1, 4, 80)), jnp.float32)
    poison = jnp.full((1, 6 * PAGE, 64), jnp.nan).at[0, ::7].set(jnp.inf)            # a NaN-producing owner
    kv = paged.write(paged.init_cache(spec), 0, poison, poison[..., :16], jnp.arange(6 * PAGE)[None], spec)
    assert bool(jnp.isfinite(kv).all()) and float(jnp.abs(kv).max()) == 0
    ckv = jnp.asarray(rng.normal(size=(3, 3 * PAGE, 64)), jnp.float32)
    krope = jnp.asarray(rng.normal(size=(3, 3 * PAGE, 16)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(3 * PAGE), (3, 3 * PAGE))
    slots = jnp.where(pos < lengths[:, None], jnp.take_along_axis(table, pos // PAGE, 1) * PAGE + pos % PAGE, -1)
    kv = paged.write(kv, 0, ckv, krope, slots, spec)                                     # the new owners
    got = latent_attention(q, kv, table, lengths, 0.1, 64)
    clean = paged.write(paged.init_cache(spec), 0, ckv, krope, slots, spec)
    want, _ = flash_mla.flash_mla_reference(q, clean, table, lengths, head_dim_v=64, softmax_scale=0.1)
    assert bool(jnp.isfinite(got).all()) and float(jnp.abs(got[2]).max()) == 0            # empty row: 0
    assert rel_err(got[:2], want[:2]) < 1e-6


def test_cache_spec_rejects():
    with pytest.raises(ValueError, match="FP8"):
        CacheSpec(num_layers=1, num_blocks=4, latent_dim=64, rope_dim=16, dtype="fp8")
    with pytest.raises(ValueError, match="num_blocks"):
        CacheSpec(num_layers=1, num_blocks=0, latent_dim=64, rope_dim=16)


@pytest.mark.parametrize("replicas", [1, 2])
def test_serve_bad_lines_fail_alone(net, tmp_path, monkeypatch, replicas):
    """A bad line gets an error record and the rest complete; the input is read as the run goes, at
    most `window` requests in the engine at once, with the same records."""
    lines = [json.dumps(dict(prompt="def f(", max_tokens=3)), "{not json", json.dumps(dict(prompt="")),
             json.dumps(dict(prompt="x" * 1200)), json.dumps(dict(prompt="ab", temperature=-2)),
             json.dumps(dict(prompt="ab", max_tokens=4, temperature=0.8, seed=5, stop=["\n"])), json.dumps([1])]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff"}\n' + lines[0].encode())

    class Tok(ByteTokenizer):
        eos_ids = (ByteTokenizer.eos_id,)

    config = EngineConfig(num_blocks=64, **SMALL, replicas=replicas)
    records, stats = serve.serve(net, Tok(), serve.read_requests(str(path)), SamplingParams(max_tokens=5),
                                 config, progress=False)
    assert [("error" in r) for r in records] == [False, True, True, True, True, False, True, True, False]
    assert "line 2" in records[1]["error"] and "empty prompt" in records[2]["error"]
    assert "max_seq_len" in records[3]["error"] and "temperature" in records[4]["error"]
    assert "line 8" in records[7]["error"] and "utf-8" in records[7]["error"]
    assert records[0]["tokens"] == 3 and records[5]["tokens"] <= 4 and "\n" not in records[5]["completion"]
    assert records[8]["completion"] == records[0]["completion"]                   # a last line without "\n"
    assert stats["requests"] == 3 and stats["finished"] == 3 and stats["usd_per_m_output_tokens"] > 0
    assert serve.count_lines(str(path)) == 9

    reads, held, done = [], [], []                # requests read; admitted-but-unfinished at each step
    make = serve.make_engine

    def spy(*a, **kw):
        engine = make(*a, **kw)
        step = engine.step

        def watched():
            held.append((engine.stats.requests - len(done), len(reads)))
            out = step()
            done.extend(out)
            return out
        engine.step = watched
        return engine
    monkeypatch.setattr(serve, "make_engine", spy)

    def source():
        for i, r in enumerate(serve.read_requests(str(path))):
            reads.append(i)
            yield r
    windowed, _ = serve.serve(net, Tok(), source(), SamplingParams(max_tokens=5), config, progress=False, window=2)
    assert _untimed(windowed) == _untimed(records)
    assert max(n for n, _ in held) <= 2 and held[0][1] == 6 and len(reads) == 9      # read as it went
    done.clear(), held.clear(), reads.clear()     # a long request first: the short ones after it keep the batch
    long_first = [dict(id=0, prompt="def f(", fields=dict(max_tokens=12))]
    long_first += [dict(id=i, prompt="ab", fields=dict(max_tokens=1)) for i in range(1, 9)]

    def listed():
        for i, r in enumerate(long_first):
            reads.append(i)
            yield r
    records, _ = serve.serve(net, Tok(), listed(), SamplingParams(), config, progress=False, window=2)
    assert [r["id"] for r in records] == list(range(9)) and records[0]["tokens"] == 12
    assert all(n == 2 for n, read in held if read < 9)    # never one in the engine while the input lasts
    errors_first = [dict(id=i, error="bad") for i in range(20)] + [dict(id=20, prompt="ab", fields={})]
    records, _ = serve.serve(net, Tok(), iter(errors_first), SamplingParams(max_tokens=2), config, progress=False,
                             window=1)             # 16 x window error records fill it, then pass on
    assert len(records) == 21 and records[-1]["tokens"] == 2


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    """Records without their timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in ("ttft_s", "tpot_s")} for r in records]


def test_serve_output_streams_survives_an_interrupt_and_resumes(net, tmp_path, monkeypatch, capsys):
    """--output: records reach OUTPUT.partial in input order as they finish, the statistics last,
    then the file replaces OUTPUT; an interrupted run leaves OUTPUT as it was and the finished
    records in OUTPUT.partial, which --resume continues (and nothing else overwrites); a bad path
    fails before the model loads."""
    lines = [json.dumps(dict(prompt="def f(", max_tokens=1)), "{not json", json.dumps(dict(prompt="ab", max_tokens=2)),
             json.dumps(dict(prompt="import", max_tokens=4))]           # the first finishes in the prefill step
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(serve, "load", lambda checkpoint, dtype: (net, serve.Bytes()))
    small = ["--max-running", "4", "--chunk-tokens", "32", "--no-progress", "--input", str(inp), "--output", str(out)]
    seen = []                                     # the partial file's lines at each write
    write = serve.Output.write

    def watch(self, records):
        write(self, records)
        seen.append(len(self.partial.read_text().splitlines()))
    monkeypatch.setattr(serve.Output, "write", watch)
    records, _ = serve.main(small)
    rows = _jsonl(out)
    assert [r.get("id") for r in rows[:-1]] == [0, 1, 2, 3] and "stats" in rows[-1]
    assert records == [] and "4 records written to" in capsys.readouterr().out        # not held in memory
    assert "line 2" in rows[1]["error"] and rows[3]["tokens"] == 4
    assert seen[:2] == [0, 2] and seen[-1] == 4               # streamed: the first two after the prefill step
    assert not (tmp_path / "out.jsonl.partial").exists()

    def interrupted(self, records):                # killed once two records are written
        write(self, records)
        if self.written >= 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(serve.Output, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve.main(small)
    assert _jsonl(out) == rows                                     # the old output is untouched
    kept = _jsonl(tmp_path / "out.jsonl.partial")
    assert len(kept) >= 2 and _untimed(kept) == _untimed(rows)[:len(kept)]
    assert "records that finished are in" in capsys.readouterr().err

    monkeypatch.setattr(serve.Output, "write", write)
    with pytest.raises(SystemExit, match="pass --resume"):        # an interrupted run is never overwritten
        serve.main(small)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(SystemExit, match="same input"):
        serve.main([*small[:-3], str(other), "--output", str(out), "--resume"])
    with open(tmp_path / "out.jsonl.partial", "a") as f:
        f.write('{"id": 2, "prom')                                  # killed mid-write: a torn last line
    _, stats = serve.main([*small, "--resume"])
    resumed = _jsonl(out)
    said = capsys.readouterr().out
    assert "2 records written to" in said and "after the 2 an earlier run wrote" in said
    assert _untimed(resumed[:-1]) == _untimed(rows[:-1])
    assert resumed[-1]["stats"]["resumed_after"] == len(kept) == 2 and stats["requests"] == 2
    with pytest.raises(SystemExit) as done:                          # a finished run is not redone
        serve.main([*small, "--resume"])
    assert done.value.code == 0 and _jsonl(out) == resumed and "is complete" in capsys.readouterr().err

    monkeypatch.setattr(serve, "load", lambda *a: pytest.fail("the model loaded before the output path was checked"))
    with pytest.raises(SystemExit, match="create the directory"):
        serve.main([*small[:-1], str(tmp_path / "missing" / "o.jsonl")])
    with pytest.raises(SystemExit, match="is a directory"):
        serve.main([*small[:-1], str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot read --input"):
        serve.main(["--input", str(tmp_path / "nope.txt")])


def test_engine_v3_latent_shapes_fp8_cache():
    """A model with V3's latent widths (512 + 64), so decode takes FlashMLA's own path
    (`mla_decode`: the kernel on a GPU, its reference here) over the FP8 paged cache."""
    cfg = model.ModelConfig.preset("tiny", num_layers=1, kv_lora_rank=512, qk_rope_head_dim=64, d_model=64,
                                   mtp_depth=0, max_seq_len=128)
    net = model.Transformer(cfg, rngs=nnx.Rngs(1))
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, cfg.vocab_size, 20)]
    engine = Engine(net, EngineConfig(num_blocks=4, cache_dtype="fp8", decode_steps=1), keep_logits=True)
    done = engine.run([(prompt, SamplingParams(max_tokens=3))])
    tokens = prompt + done[0].token_ids
    want = np.asarray(net(jnp.asarray([tokens[:-1]]))[0, len(prompt) - 1:])         # [3, V]
    errs = [rel_err(a, b) for a, b in zip(engine.logits[0], want)]
    assert engine.kv.dtype == jnp.uint8 and engine.kv.shape[-1] == flash_mla.FP8_TOKEN_BYTES
    assert len(errs) == 3 and max(errs) < 5e-2, errs          # e4m3 latents: ~2e-2 measured


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "fp8"])
def test_engine_steps_lower_for_cuda_with_flash_mla(cache_dtype, monkeypatch):
    """The very prefill and multi-step decode calls an engine made here, traced again as a GPU traces
    them (decode through the FlashMLA kernel, `mla_decode`'s GPU branch) and lowered for CUDA with
    every TMA copy's SMEM alignment checked: serving's kernel path is compiled only on a GPU."""
    cfg = model.ModelConfig.preset("tiny", num_layers=2, kv_lora_rank=512, qk_rope_head_dim=64, d_model=64,
                                   mtp_depth=0, max_seq_len=256)
    net = model.Transformer(cfg, rngs=nnx.Rngs(1))
    engine = Engine(net, EngineConfig(num_blocks=8, cache_dtype=cache_dtype, decode_steps=2, bake_params=False))
    calls = {}

    def recorded(key, fn):
        def call(*args):
            calls.setdefault(key, args)
            return fn(*args)
        return call

    engine._steps = {key: recorded(key, fn) for key, fn in engine._steps.items()}
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (20, 70)]
    engine.run([(p, SamplingParams(max_tokens=5)) for p in prompts])
    assert set(calls) == {False, "multi"}                 # prefill, then decode 2 tokens a call
    assert engine.kv.dtype == (jnp.uint8 if cache_dtype == "fp8" else jnp.uint16)   # bf16 as bits on CPU
    pretend_hopper(monkeypatch)
    monkeypatch.setattr(engine_mod, "_STEPS", {})
    engine.spec = dataclasses.replace(engine.spec, bf16_bits=False)    # a GPU engine's pool is bfloat16
    engine._build(net)                                    # the step functions a GPU engine builds
    for key, args in calls.items():
        kv = args[1]                                      # donated (deleted): its shape is what lowers
        args = (args[0], jax.ShapeDtypeStruct(kv.shape, jnp.bfloat16 if kv.dtype == jnp.uint16 else kv.dtype),
                *args[2:])
        has_kernel = "mosaic_gpu" in lower_for_cuda(engine._steps[key], *args)
        assert has_kernel == (key == "multi"), key        # prefill attends with XLA (naive form)


def test_stop_strings_and_tokens(net, prompts):
    tok = ByteTokenizer()
    cfg = EngineConfig(num_blocks=64, **SMALL)
    prompt = [tok.bos_id] + list(b"def main(")
    free = Engine(net, cfg, detokenize=tok.decode).run([(prompt, SamplingParams(max_tokens=NEW))])[0]
    ids = free.token_ids
    stop = tok.decode(ids)[1:2]                                          # a character after the first
    k = next(k for k in range(1, NEW + 1) if stop in tok.decode(ids[:k]))  # the token that completes it
    done = Engine(net, cfg, detokenize=tok.decode).run([
        (prompt, SamplingParams(max_tokens=NEW, stop=(stop,))),
        (prompt, SamplingParams(max_tokens=NEW, stop_token_ids=(ids[2],)))])
    text = tok.decode(ids[:k])
    assert done[0].text == text[:text.index(stop)] and done[0].token_ids == ids[:k]
    assert done[0].finish_reason == "stop"
    assert done[1].token_ids == ids[:ids.index(ids[2]) + 1] and done[1].finish_reason == "stop"
    assert free.finish_reason == "length" and len(ids) == NEW


def test_hf_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<bos>": 0, "<eos>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<bos>", "<eos>"])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(dict(bos_token_id=0, eos_token_id=[1])))
    tok = serve.HFTokenizer(tmp_path)
    assert tok.encode("hello world") == [0, 2, 3] and tok.eos_ids == (1,)
    assert tok.decode([0, 2, 3, 1]) == "hello world"
