"""EPLB: DeepSeek's README example exactly, properties on random loads, stats, permutation, report."""

import numpy as np
import pytest

from sharding import eplb
from sharding.eplb import ExpertLoad, Placement, rebalance_experts

README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def _check_consistent(phy2log, log2phy, logcnt):
    L, E, _ = log2phy.shape
    for layer in range(L):
        for e in range(E):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == logcnt[layer, e]
            assert np.all(phy2log[layer, slots] == e)
            assert np.all(log2phy[layer, e, logcnt[layer, e]:] == -1)


def test_readme_example_exactly():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)
    _check_consistent(phy2log, log2phy, logcnt)
    assert log2phy[0, 5].tolist() == [0, 2]               # expert 5 lives in slots 0 and 2 of layer 0


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("E, P, groups, nodes, gpus", [
    (16, 24, 4, 2, 8),     # hierarchical
    (16, 32, 8, 4, 8),     # hierarchical, more nodes
    (12, 16, 3, 2, 4),     # groups % nodes != 0 -> global policy
    (64, 80, 8, 2, 16),
])
def test_properties_on_random_loads(seed, E, P, groups, nodes, gpus):
    rng = np.random.default_rng(seed)
    weight = rng.pareto(1.5, size=(3, E)) * 100                     # skewed, like real expert loads
    phy2log, log2phy, logcnt = rebalance_experts(weight, P, groups, nodes, gpus)
    assert np.all(logcnt >= 1) and np.all(logcnt.sum(1) == P)
    assert phy2log.shape == (3, P)                                    # equal slots per GPU by construction
    _check_consistent(phy2log, log2phy, logcnt)
    per_gpu = P // gpus
    for layer in range(3):
        counts = np.bincount(phy2log[layer], minlength=E)
        assert np.array_equal(counts, logcnt[layer])
        if groups % nodes == 0:                                       # each node holds whole groups
            node_of_slot = np.arange(P) // (P // nodes)
            group_of_slot = phy2log[layer] // (E // groups)
            for g in range(groups):
                assert len(set(node_of_slot[group_of_slot == g])) == 1
        for gpu in range(gpus):                                       # no expert twice on one GPU is not required,
            assert len(phy2log[layer, gpu * per_gpu:(gpu + 1) * per_gpu]) == per_gpu   # but slots per GPU are equal
    placement = Placement(phy2log, log2phy, logcnt, gpus)
    rep = eplb.report(weight, placement)
    assert np.all(rep["imbalance_after"] <= rep["imbalance_before"] + 1e-12)
    np.testing.assert_allclose(rep["gpu_load_after"].sum(1), weight.sum(1))       # no load lost


def test_deterministic():
    weight = np.random.default_rng(0).integers(0, 5, size=(4, 32))                # many ties
    first = rebalance_experts(weight, 48, 8, 2, 8)
    for _ in range(3):
        for a, b in zip(first, rebalance_experts(weight, 48, 8, 2, 8)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("args, words", [
    ((np.ones((2, 12)), 10, 4, 2, 8), "below the 12 logical experts"),
    ((np.ones((2, 12)), 16, 5, 1, 8), "not divisible into num_groups"),
    ((np.ones((2, 12)), 16, 4, 3, 8), "not divisible by num_nodes"),
    ((np.ones((2, 12)), 18, 4, 2, 8), "not divisible by num_gpus"),
    ((-np.ones((2, 12)), 16, 4, 2, 8), "non-negative"),
    ((np.ones(12), 16, 4, 2, 8), "layers, logical_experts"),
    ((np.ones((2, 12)), 16, 0, 2, 8), "num_groups=0"),
])
def test_impossible_arguments(args, words):
    with pytest.raises(ValueError, match=words):
        rebalance_experts(*args)


def test_expert_load_window():
    stats = ExpertLoad(2, 4, window=3)
    for step in range(5):
        stats.update(np.full((2, 4), step))
    assert len(stats) == 3 and np.all(stats.load() == 2 + 3 + 4)
    with pytest.raises(ValueError, match="expected"):
        stats.update(np.ones((3, 4)))


def test_slot_permutation_moves_weights_with_their_expert():
    weight = np.random.default_rng(1).pareto(1.5, size=(2, 16)) * 100
    identity = Placement.identity(2, 16, 8)
    new = eplb.rebalance(weight, 24, 4, 2, 8)
    w_logical = np.random.default_rng(2).normal(size=(2, 16, 3, 5)).astype(np.float32)
    perm = eplb.slot_permutation(identity, new)
    moved = np.asarray(eplb.permute_slots({"w": w_logical}, perm)["w"])
    for layer in range(2):
        np.testing.assert_array_equal(moved[layer], w_logical[layer, new.phy2log[layer]])
    again = eplb.rebalance(weight[::-1].copy(), 24, 4, 2, 8)                    # a second rebalance
    perm2 = eplb.slot_permutation(new, again)
    moved2 = np.asarray(eplb.permute_slots({"w": moved}, perm2)["w"])
    for layer in range(2):
        np.testing.assert_array_equal(moved2[layer], w_logical[layer, again.phy2log[layer]])


def test_report_and_heatmap(tmp_path, report):
    weight = np.random.default_rng(3).pareto(1.2, size=(6, 64)) * 100
    placement = eplb.rebalance(weight, 80, 8, 2, 16)
    rep = eplb.report(weight, placement)
    text = eplb.format_report(rep)
    assert text.splitlines()[0].startswith("layer") and len(text.splitlines()) == 8
    report(f"EPLB (6 layers, 64 experts -> 80 slots, 2 nodes x 8 GPUs, Pareto loads): GPU max/mean "
           f"{rep['mean_before']:.2f} -> {rep['mean_after']:.2f}")
    png = eplb.save_heatmap(weight, placement, tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ---- redundant experts in the model: EP MoE layer, optimizer state, training ------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
import sharding  # noqa: E402
from model.moe import MoE, moe, physical_routing, route  # noqa: E402

CFG = model.ModelConfig.preset("tiny", d_model=32, moe_ffn_dim=16)        # 16 experts, top-4, 4 groups
E = CFG.num_routed_experts


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _skewed_layer(seed=0):
    """A MoE layer whose router bias sends most tokens to a few experts (as real loads are skewed)."""
    layer = MoE(CFG, rngs=nnx.Rngs(seed))
    layer.bias.set_value(jnp.zeros(E).at[jnp.array([0, 1, 5, 9])].set(0.06))
    return layer


def _device_tokens(layer, x, devices):
    """Token copies each EP device computes: the physical slots' counts, summed per device."""
    flat = x.reshape(-1, CFG.d_model)
    r = route(jnp.einsum("nd,de->ne", flat, layer.router[...]), layer.bias[...], CFG)
    slots = np.asarray(physical_routing(layer, r).experts).reshape(-1)
    per_slot = np.bincount(slots, minlength=layer.w_gate.shape[0])
    return per_slot.reshape(devices, -1).sum(-1)


def test_rebalance_leaves_ep_layer_outputs_unchanged(report):
    mesh = sharding.make_mesh(data=1, expert=8)
    layer = _skewed_layer()
    x = jax.random.normal(jax.random.key(0), (4, 32, CFG.d_model))
    f = nnx.jit(lambda p, x: moe(p, x, CFG))
    with jax.set_mesh(mesh):
        want, counts, _ = f(layer, x)
    tokens_before = _device_tokens(layer, x, 8)
    new = eplb.rebalance(np.asarray(counts)[None], E + 8, CFG.num_expert_groups, 1, 8)
    assert np.any(new.logcnt > 1)                                                    # real replicas
    eplb.apply_placement(layer, None, new, mesh)
    assert layer.w_gate.shape == (E + 8, CFG.d_model, CFG.moe_ffn_dim)
    for p, e in enumerate(new.phy2log[0]):                                           # slots are copies
        np.testing.assert_array_equal(layer.w_down[...][p], layer.w_down[...][new.log2phy[0, e, 0]])
    with jax.set_mesh(mesh):
        got, got_counts = f(layer, x)[:2]
    single_device = f(layer, x)[0]
    tokens_after = _device_tokens(layer, x, 8)
    diff = np.abs(np.asarray(got) - np.asarray(want))
    err = float(diff.max() / np.max(np.abs(np.asarray(want))))
    assert err < 1e-6, f"max |diff| / max |out| = {err:.2e} at {np.unravel_index(np.argmax(diff), diff.shape)}"
    assert rel_err(single_device, want) < 1e-6
    np.testing.assert_array_equal(got_counts, counts)                                # loads stay logical
    assert tokens_after.sum() == tokens_before.sum() == x.shape[0] * x.shape[1] * CFG.num_experts_per_tok
    before, after = (float(t.max() / t.mean()) for t in (tokens_before, tokens_after))
    assert after < before and after < 1.3
    again = eplb.rebalance(np.asarray(counts)[None][:, ::-1].copy(), E + 8, CFG.num_expert_groups, 1, 8)
    eplb.apply_placement(layer, None, again, mesh)                                   # slots -> other slots
    with jax.set_mesh(mesh):
        assert rel_err(f(layer, x)[0], want) < 1e-6
    report(f"EPLB on an EP MoE layer (8 devices, 16 experts + 8 redundant): output max rel diff {err:.1e}; "
           f"tokens per device max/mean {before:.2f} -> {after:.2f}")


@nnx.jit
def _opt_step(layer, opt, x, cot):
    opt.update(layer, nnx.grad(lambda p: jnp.sum(moe(p, x, CFG)[0] * cot))(layer))


def _moments(opt):
    return {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(opt))
            if path[-1] in ("w_gate", "w_up", "w_down") and path[-2] != "shared"}


def test_optimizer_state_follows_its_expert():
    """Rebalance between two Adam steps: the balanced run equals the plain run, replicas stay copies."""
    mesh = sharding.make_mesh(data=2, expert=4)
    x = jax.random.normal(jax.random.key(1), (4, 16, CFG.d_model))
    cot = jax.random.normal(jax.random.key(2), x.shape)
    layer = sharding.shard_model(_skewed_layer(1), mesh)
    opt = sharding.shard_model(nnx.Optimizer(layer, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param), mesh)
    with jax.set_mesh(mesh):
        _opt_step(layer, opt, x, cot)
        layer_b, opt_b = nnx.clone((layer, opt))
        plain = _moments(opt)
        r = route(jnp.einsum("btd,de->bte", x, layer.router[...]).reshape(-1, E), layer.bias[...], CFG)
        load = np.bincount(np.asarray(r.experts).reshape(-1), minlength=E)[None]
        new = eplb.rebalance(load, E + 4, CFG.num_expert_groups, 1, 4)
        assert np.any(new.logcnt > 1)
        eplb.apply_placement(layer_b, opt_b, new, mesh)
        moved = _moments(opt_b)
        assert len(moved) == 6                                                # mu, nu of three weights
        for path, value in moved.items():                                     # moments moved with weights
            np.testing.assert_array_equal(value, plain[path][new.phy2log[0]])
        _opt_step(layer, opt, x, cot)
        _opt_step(layer_b, opt_b, x, cot)
    for name in ("w_gate", "w_up", "w_down"):                                 # replicas got equal updates
        w = np.asarray(getattr(layer_b, name)[...])
        np.testing.assert_array_equal(w, w[new.log2phy[0, new.phy2log[0], 0]])
    eplb.apply_placement(layer_b, opt_b, None, mesh)                           # back to E logical experts
    assert not any(hasattr(layer_b, f) for f in ("phy2log", "log2phy", "logcnt"))
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(layer, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(layer_b, nnx.Param))):
        assert rel_err(b.get_value(), a.get_value()) < 1e-6, path
    for path, a in _moments(opt).items():
        assert rel_err(_moments(opt_b)[path], a) < 1e-5, path


TRAIN = ["--batch", "8", "--seq-len", "32", "--log-every", "1", "--ckpt-every", "2", "--mesh", "data=2,expert=4",
         "--set", "model.num_layers=2", "--set", "model.d_model=64", "--set", "model.moe_ffn_dim=32",
         "--set", "model.mtp_depth=0"]           # test_entrypoints' model (shared compiles), without MTP


def test_train_rebalances_every_n_steps_and_resumes(tmp_path, capsys):
    import json
    import re

    import train
    from storage import prepare_embedded_corpus
    corpus = tmp_path / "data"
    prepare_embedded_corpus(corpus, max_tokens=1 << 18, progress=False)
    out = tmp_path / "tiny"
    flags = ["--out", str(out), "--data", str(corpus), "--eplb-every", "1", "--eplb-redundant", "4", *TRAIN]
    train.main(["--steps", "2", *flags])
    train.main(["--steps", "3", *flags])                                    # resumes: slots come back from Orbax
    text = capsys.readouterr().out
    steps = [int(s) for s in re.findall(r"EPLB step (\d+)", text)]
    ratios = [(float(a), float(b)) for a, b in re.findall(r"max/mean (\d+\.\d+) -> (\d+\.\d+)", text)]
    assert steps == [1, 2, 3] and "resumed from step 2" in text
    assert all(after <= before for before, after in ratios) and ratios[-1][1] < 1.2, ratios
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["eplb_imbalance_before"], r["eplb_imbalance_after"]) for r in records]
    assert logged == [(s, pytest.approx(b, abs=1e-3), pytest.approx(a, abs=1e-3)) for s, (b, a) in zip(steps, ratios)]
    assert all(r["eplb_worst_after"] >= r["eplb_imbalance_after"] for r in records)
    assert (tmp_path / "tiny-eplb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exported = model.load_hf_checkpoint(out)              # raises on extra tensors: E logical experts, not slots
    assert exported.moe_layers.ffn.w_gate.shape[1] == E


@pytest.mark.parametrize("flags, words", [
    (["--eplb-every", "4"], "needs MoE layers and --mesh with expert > 1"),
    (["--eplb-redundant", "2", "--mesh", "data=2,expert=4"], "--eplb-every must be positive"),
    (["--eplb-every", "4", "--eplb-redundant", "2", "--mesh", "data=2,expert=4"], "18 expert slots do not divide"),
])
def test_eplb_flags_fail_before_work(flags, words, capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(flags)
    assert words in capsys.readouterr().err


# ---- serving: expert loads from the engine, rebalancing a live engine --------------------------------

from serving import Engine, EngineConfig, SamplingParams  # noqa: E402

SERVE = EngineConfig(num_blocks=16, max_running=4, chunk_tokens=32, min_token_bucket=32, min_batch_bucket=4,
                     min_block_bucket=4, decode_steps=4)       # fixed buckets: few compiles


def _skewed_model(seed: int) -> model.Transformer:
    """CFG's transformer (3 MoE layers and an MTP block) with values drawn here, as the init would
    (cheaper than its ~80 compiles), and router biases that send most tokens to a few experts."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        if path[-1] == "weight":                                                   # RMSNorm scales
            value = np.ones(var.shape)
        elif path[-1] == "bias":
            value = np.zeros(var.shape)
            value[..., [0, 1, 5, 9]] = 0.06
        else:
            value = CFG.init_std * rng.normal(size=var.shape)
        var.set_value(jnp.asarray(value, var.dtype))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def served():
    """A skewed tiny model and its greedy run through the engine."""
    net = _skewed_model(3)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in (5, 40, 19)]   # 40: two chunks
    engine = Engine(net, SERVE, keep_logits=True)
    done = engine.run([(p, SamplingParams(max_tokens=7)) for p in prompts])
    return net, prompts, engine, done


def test_serving_counts_real_tokens_only(served):
    """The engine's counts equal the model's own over the tokens it ran (prompt + all but the last
    generated token), although its batches pad rows (3 -> 4) and chunks (to 32 tokens)."""
    net, prompts, engine, done = served
    load = engine.expert_load.load()
    seqs = [p + c.token_ids[:-1] for p, c in zip(prompts, done)]
    packed = [np.concatenate(a)[None] for a in zip(*[(s, np.arange(len(s)), np.full(len(s), i))
                                                     for i, s in enumerate(seqs)])]   # one row, one segment each
    tokens, positions, segments = map(jnp.asarray, packed)
    want = net.forward(tokens, positions=positions, segment_ids=segments, with_mtp=False).expert_counts
    processed = tokens.shape[1]
    assert load.shape == (CFG.num_moe_layers, E) and 0 < len(engine.expert_load) <= engine.stats.steps
    np.testing.assert_array_equal(load.sum(1), processed * CFG.num_experts_per_tok)
    np.testing.assert_array_equal(load, want)


def test_engine_rebalance_mid_run_keeps_greedy_tokens(served, report):
    """Rebalance (8 GPUs, 8 redundant experts) between steps of a second engine: the same greedy
    tokens and logits as the plain run, the served model's slots hold copies, the given model is untouched."""
    net, prompts, plain, done = served
    engine = Engine(net, SERVE, keep_logits=True)
    rids = [engine.add(p, SamplingParams(max_tokens=7)) for p in prompts]
    finished = {c.rid: c for _ in range(2) for c in engine.step()}                 # both prefill chunks
    rep = engine.rebalance(8, redundant=8)
    placement = engine.placement(8)
    assert placement.num_physical == E + 8 and np.all(placement.logcnt.sum(1) == E + 8)
    assert rep["mean_after"] <= rep["mean_before"]
    while engine.has_work():
        finished.update((c.rid, c) for c in engine.step())
    assert [finished[r].token_ids for r in rids] == [c.token_ids for c in done]
    errs = [rel_err(a, b) for r, c in zip(rids, done) for a, b in zip(engine.logits[r], plain.logits[c.rid])]
    assert max(errs) < 1e-5, (int(np.argmax(errs)), max(errs))
    w = np.asarray(engine.model().moe_layers.ffn.w_down[...])                       # [L, P, F, D]
    for layer in range(CFG.num_moe_layers):
        np.testing.assert_array_equal(w[layer], w[layer, placement.log2phy[layer, placement.phy2log[layer], 0]])
    assert net.moe_layers.ffn.w_gate.shape[1] == E and not hasattr(net.moe_layers.ffn, "phy2log")
    with pytest.raises(ValueError, match="do not divide over 5 GPUs"):
        engine.rebalance(5)
    report(f"EPLB in serving (tiny, 3 MoE layers, 16 experts + 8 redundant over 8 GPUs): GPU max/mean "
           f"{rep['mean_before']:.2f} -> {rep['mean_after']:.2f}; greedy tokens unchanged, logits rel {max(errs):.0e}")


def test_serve_eplb_report(served, tmp_path, capsys):
    import json

    import serve
    net = served[0]
    model.save_hf_checkpoint(net, tmp_path / "ckpt")
    out = tmp_path / "out.jsonl"
    serve.main(["--checkpoint", str(tmp_path / "ckpt"), "--max-tokens", "4", "--no-progress", "--output", str(out),
                "--eplb-report", str(tmp_path / "eplb"), "--eplb-gpus", "4", "--eplb-redundant", "4"])
    rep = json.loads(out.read_text().splitlines()[-1])["stats"]["eplb"]
    assert rep["num_gpus"] == 4 and len(rep["imbalance_before"]) == CFG.num_moe_layers
    assert rep["mean_after"] <= rep["mean_before"] and rep["tokens"] > 0
    assert (tmp_path / "eplb" / "eplb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max/mean before" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="18 slots do not divide over --eplb-gpus 4"):
        serve.main(["--checkpoint", str(tmp_path / "ckpt"), "--eplb-report", str(tmp_path), "--eplb-redundant", "2",
                    "--eplb-gpus", "4"])
    with pytest.raises(ValueError, match="no MoE layers"):
        serve.EPLBReport(tmp_path).check(CFG.replace(num_dense_layers=CFG.num_layers))
