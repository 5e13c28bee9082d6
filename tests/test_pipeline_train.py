"""train.py's step through the pipeline executor: on data=2 x pipe=2, with packed documents,
padding and z-loss, the pipelined loss, expert counts and every parameter's gradient equal
train_step's on one device, and so do the variables after two steps (optimizer, router bias);
train.py trains with --pipeline-schedule and rejects inconsistent flags before any work."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model
import sharding
import train
from sharding import pipeline_train
from sharding.schedules import make_schedule

TOL = 1e-5                       # float32 rounding: micro-batched sums vs one batch
# 1 dense + 4 MoE layers: 2 stages (1F1B on 2 ranks) and 4 stages (DualPipeV on 2 ranks) both divide
CFG = model.ModelConfig.preset("tiny", d_model=64, num_layers=5, num_dense_layers=1, num_heads=2, q_lora_rank=32,
                               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                               dense_ffn_dim=64, moe_ffn_dim=16, num_routed_experts=8, num_expert_groups=4,
                               num_limited_groups=2, num_experts_per_tok=2, vocab_size=128, mtp_depth=0,
                               init_std=0.1, seq_aux_alpha=0.01)
B, T, M, Z_LOSS = 8, 16, 4, 1e-3


def rel_err(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite at {np.argwhere(~np.isfinite(got))[:3].tolist()}"
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    worst = np.unravel_index(np.argmax(np.abs(got - want)), got.shape) if got.ndim else ()
    assert err < TOL, f"{what}: relative error {err:.2e} >= {TOL}; worst at {worst}: {got[worst]} vs {want[worst]}"
    return err


def packed_batch(seed=0):
    """Rows of 2-3 documents each, the tail of some rows padding (segment 0, weight 0)."""
    rng = np.random.default_rng(seed)
    positions, segments = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for row in range(B):
        cuts = np.sort(rng.choice(np.arange(2, T - 2), size=2, replace=False))
        end = T - 3 if row % 2 else T
        for seg, (a, b) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
            positions[row, a:b], segments[row, a:b] = np.arange(b - a), seg
    tokens = rng.integers(0, CFG.vocab_size, (B, T + 1), dtype=np.int32)
    return dict(tokens=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments),
                weights=jnp.asarray((segments > 0).astype(np.float32)))


@pytest.fixture(scope="module")
def initial():
    """The model's variables with N(0, 0.1) values everywhere (norm weights and router bias too):
    filling an abstract model is much faster on CPU than running its initialisers eagerly."""
    state = nnx.state(nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, CFG.init_std, a.shape), a.dtype), state)


def model_and_opt(initial, mesh=None):
    """SGD written as trace(decay=0) + scale, so the optimizer state holds the last gradient. (Not
    Adam: its g / sqrt(v) turns float32 rounding in near-zero gradients, e.g. of rarely chosen
    experts, into learning-rate-sized steps, so parameters could not be compared after it.)"""
    m = nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0)))
    nnx.update(m, jax.tree.map(jnp.copy, initial))
    opt = nnx.Optimizer(m, optax.chain(optax.trace(decay=0.0), optax.scale(-0.3)), wrt=nnx.Param)
    if mesh is not None:
        sharding.shard_model(m, mesh), sharding.shard_model(opt, mesh)
    return m, opt


def flat(state):
    return {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(nnx.state(state))}


@pytest.mark.parametrize("kind", ["1f1b", "dualpipev"])
def test_pipelined_train_step_equals_train_step(kind, initial, report):
    """train.train_step with a pipeline plan on data=2 x pipe=2 (1F1B: 2 stages of 2 MoE blocks;
    DualPipeV: 4 stages of 1) vs without it on one device, two steps on packed rows with padding
    and z-loss: loss, cross-entropy, grad norm, expert loads, every parameter's gradient (held by
    the optimizer state), and every variable after the optimizer and router-bias updates."""
    mesh = sharding.make_mesh(data=2, pipe=2, devices=jax.devices()[:4])
    plan = pipeline_train.PipelinePlan(make_schedule(kind, 2, M), mesh)
    ref_m, ref_opt = model_and_opt(initial)
    m, opt = model_and_opt(initial, mesh)
    errs = []
    for step in range(2):
        batch = packed_batch(seed=step)
        ref = train.train_step(ref_m, ref_opt, batch, 0.0, 1e-2, Z_LOSS)
        with jax.set_mesh(mesh):
            out = train.train_step(m, opt, {k: sharding.shard_batch(v, mesh) for k, v in batch.items()},
                                   0.0, 1e-2, Z_LOSS, plan)
        np.testing.assert_array_equal(np.asarray(out["load"]), np.asarray(ref["load"]))
        assert float(out["mtp"]) == 0.0
        assert float(ref["loss"] - ref["main"]) > 1e-3 * float(ref["loss"]), "balance and z-loss must count"
        errs += [rel_err(out[k], ref[k], f"step {step} {k}") for k in ("loss", "main", "grad_norm", "imbalance")]
        got, want = flat(opt.opt_state[0].trace), flat(ref_opt.opt_state[0].trace)
        assert got.keys() == want.keys() == flat(nnx.state(m, nnx.Param)).keys()
        errs += [rel_err(g, want[path], f"step {step} grad {path}") for path, g in got.items()]
    bias_before = flat(initial)["moe_layers.ffn.bias"]
    assert np.any(np.asarray(m.moe_layers.ffn.bias[...]) != bias_before), "the router bias update must have run"
    got, want = flat(m), flat(ref_m)
    errs += [rel_err(v, want[path], f"after 2 steps: {path}") for path, v in got.items()]
    report(f"pipelined train_step {kind} on data=2 x pipe=2, M={M}, 1 dense + 4 MoE layers, packed rows, z-loss, "
           f"2 steps: max rel err loss/grads/variables {max(errs):.1e} vs train_step on one device")


def test_side_channels_round_trip():
    v = jnp.asarray([[0, 1, 255, 256, 65535, 2 ** 24 + 3, 2 ** 31 - 1, -1]], jnp.int32)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        back = pipeline_train.decode_ints(pipeline_train.encode_ints(v, dtype))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(v))


SMALL = ["--batch", "16", "--seq-len", "16", "--log-every", "1", "--ckpt-every", "100", "--set", "model.num_layers=5",
         "--set", "model.d_model=32", "--set", "model.moe_ffn_dim=16", "--set", "model.mtp_depth=0",
         "--set", "model.dense_ffn_dim=64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from storage import prepare_embedded_corpus
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare_embedded_corpus(path, max_tokens=1 << 16, progress=False)
    return str(path)


def test_train_py_with_dualpipev(tmp_path, corpus):
    """1 dense + 4 MoE layers in DualPipeV's 4 stages on pipe=2 x data=4, the default 4 micro-batches."""
    out = tmp_path / "pp"
    train.main(["--steps", "3", "--out", str(out), "--data", corpus, "--mesh", "pipe=2",
                "--pipeline-schedule", "dualpipev", *SMALL])
    records = [json.loads(line) for line in (tmp_path / "pp.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)


@pytest.mark.parametrize("flags, words", [
    (["--mesh", "pipe=2"], "needs --pipeline-schedule"),
    (["--pipeline-schedule", "1f1b"], "pipe mesh axis > 1"),
    (["--mesh", "pipe=2", "--pipeline-schedule", "dualpipev", "--set", "model.mtp_depth=0"], "must divide"),
    (["--mesh", "pipe=2", "--pipeline-schedule", "1f1b", "--set", "model.num_layers=3"], "mtp_depth=0"),
    (["--mesh", "pipe=2,expert=2", "--pipeline-schedule", "1f1b", "--set", "model.mtp_depth=0"], "data axis only"),
    (["--mesh", "pipe=2", "--pipeline-schedule", "dualpipe", "--micro-batches", "3", "--set", "model.mtp_depth=0",
      "--set", "model.num_layers=3"],
     "even number of micro-batches"),
])
def test_bad_pipeline_flags_fail_before_work(flags, words, capsys):
    with pytest.raises(SystemExit):
        train.main(flags)
    assert words in capsys.readouterr().err


def test_batch_must_split_into_micro_batches(tmp_path):
    flags = ["--mesh", "pipe=2", "--pipeline-schedule", "1f1b", "--micro-batches", "3", "--set", "model.num_layers=3",
             "--set", "model.mtp_depth=0", "--out", str(tmp_path / "never")]
    with pytest.raises(SystemExit, match="must divide into --micro-batches 3 x data = 4"):
        train.main(flags)
    assert not list(tmp_path.iterdir()), "nothing is written before the check"
