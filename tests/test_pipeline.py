"""The pipeline executor: pipelined loss, gradients and inference outputs equal the sequential
model's for every schedule and rank count, over data-parallel meshes too and for the real model's
MoE blocks; parameters and stored activations per device equal schedules.memory_table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import model
from model import ModelConfig, mla
from model.rope import rope_tables
from model.transformer import _scan_step, run_stack
from sharding import pipeline as pl
from sharding.ep import combine, dispatch
from sharding.mesh import make_mesh
from sharding.schedules import make_schedule, memory_table

D, ROWS, OUT = 16, 4, 3          # width, rows per micro-batch, loss-head outputs
TOL = 1e-5                       # float32 rounding (DualPipe's example: sequential vs pipelined)

# (kind, ranks); 8 ranks for the single-direction schedules and DualPipe, DualPipeV at 4 ranks
# is already 8 stages.
CASES = [(k, p) for k in ("1f1b", "zb1p", "dualpipe", "dualpipev") for p in (2, 4)] + \
        [("1f1b", 8), ("zb1p", 8), ("dualpipe", 8)]


def micro_batches(kind, ranks):
    return 2 * ranks if kind in ("dualpipe", "dualpipev") else ranks + 1


def stage_fn(p, x):                                    # x [b, D]
    return x + jnp.tanh(jnp.einsum("bd,de->be", x, p["w"]) + p["b"])


def loss_fn(lp, y, target):                            # y [b, D], target [b, OUT]
    return jnp.mean((jnp.einsum("bd,do->bo", y, lp["head"]) - target) ** 2)


def problem(schedule, rows=ROWS, seed=0):
    """Stage and loss parameters, inputs and targets (numpy draws: no per-shape compiles)."""
    S, M = schedule.stages, schedule.micro_batches
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    stage_params = {"w": normal(S, D, D) / 4, "b": normal(S, D) / 4}
    loss_params = {"head": normal(D, OUT)}
    return stage_params, loss_params, normal(M, rows, D), normal(M, rows, OUT)


def rel_err(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite at {np.argwhere(~np.isfinite(got))[:3].tolist()}"
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = np.unravel_index(np.argmax(np.abs(got - want)), got.shape) if got.ndim else ()
    assert err < TOL, f"{what}: relative error {err:.2e} >= {TOL}; worst at {worst}: {got[worst]} vs {want[worst]}"
    return err


def pipelined(schedule, mesh, stage_params, loss_params, xs, targets, batch_axes=("data",)):
    place = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    rank_params = jax.tree.map(lambda a: place(a, PartitionSpec("pipe")), pl.to_rank_layout(schedule, stage_params))
    run = jax.jit(lambda rp, lp, xs, ts: pl.pipeline_value_and_grad(stage_fn, loss_fn, schedule, mesh, rp, lp, xs, ts,
                                                                    batch_axes=batch_axes))
    out = run(rank_params, loss_params, xs, targets)
    return out.loss, out.grads, out.loss_grads, out.input_grads, rank_params


@pytest.mark.parametrize("kind,ranks", CASES)
def test_pipelined_equals_sequential(kind, ranks, report):
    schedule = make_schedule(kind, ranks, micro_batches(kind, ranks))
    mesh = make_mesh(data=-1, pipe=ranks, devices=jax.devices()[:ranks])
    sp, lp, xs, ts = problem(schedule)
    loss, rank_grads, loss_grads, dxs, _ = pipelined(schedule, mesh, sp, lp, xs, ts)
    want_loss, _, want_g, want_lg, want_dxs, _ = pl.sequential_value_and_grad(stage_fn, loss_fn, sp, lp, xs, ts)
    grads = pl.from_rank_layout(schedule, rank_grads)
    errs = [rel_err(loss, want_loss, "loss")]
    errs += [rel_err(grads[k], want_g[k], f"stage grad {k}") for k in ("w", "b")]
    errs += [rel_err(loss_grads["head"], want_lg["head"], "loss-head grad"), rel_err(dxs, want_dxs, "input grad")]
    if kind == "dualpipe":    # each stage is held twice; both copies carry the summed gradient
        again = jax.tree.map(lambda g: g[np.arange(ranks)[::-1], ::-1], rank_grads)
        np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(rank_grads["w"]))
    report(f"pipeline {kind} P={ranks} M={schedule.micro_batches}: max rel err loss/grads/input-grad "
           f"{max(errs):.1e} over {pl.compile_schedule(schedule).ticks} lock-step ticks")


@pytest.mark.parametrize("kind,ranks", [(k, p) for k in ("1f1b", "zb1p", "dualpipe", "dualpipev") for p in (2, 4)])
def test_inference_forward_equals_sequential(kind, ranks):
    schedule = make_schedule(kind, ranks, micro_batches(kind, ranks))
    mesh = make_mesh(data=-1, pipe=ranks, devices=jax.devices()[:ranks])
    sp, _, xs, _ = problem(schedule, seed=1)
    rank_params = pl.to_rank_layout(schedule, sp)
    got = jax.jit(lambda rp, xs: pl.pipeline_forward(stage_fn, schedule, mesh, rp, xs))(rank_params, xs)
    want = jax.vmap(lambda x: pl.sequential_forward(stage_fn, sp, x))(xs)
    rel_err(got, want, "inference outputs")
    assert pl.compile_schedule(schedule, training=False).stash_slots == 0, "inference keeps no activations"


def aux_stage(p, x):
    """stage_fn plus an aux loss (a penalty on the output, big enough to move every gradient)
    and stats (per-feature sums of the output): the has_aux form."""
    y = stage_fn(p, x)
    return y, 5.0 * jnp.mean(y * y), {"sum": y.sum(0), "rows": jnp.int32(y.shape[0])}


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe"])      # zb1p, dualpipev: test_composes_with_expert_axis
def test_composes_with_data_axis(kind):
    """data=2 x pipe=2 (x expert=2): rows split over data (and expert), gradients and stats summed
    over them; stages with aux losses and stats (has_aux)."""
    schedule = make_schedule(kind, 2, micro_batches(kind, 2))
    mesh = make_mesh(data=2, pipe=2, expert=2)
    batch_axes = ("data", "expert") if kind == "dualpipe" else ("data",)
    sp, lp, xs, ts = problem(schedule, rows=8, seed=2)
    run = jax.jit(lambda rp, lp, xs, ts: pl.pipeline_value_and_grad(aux_stage, loss_fn, schedule, mesh, rp, lp, xs, ts,
                                                                    batch_axes=batch_axes, has_aux=True))
    got = run(pl.to_rank_layout(schedule, sp), lp, xs, ts)
    want = pl.sequential_value_and_grad(aux_stage, loss_fn, sp, lp, xs, ts, has_aux=True)
    grads, stats = (pl.from_rank_layout(schedule, t) for t in (got.grads, got.stats))
    rel_err(got.loss, want.loss, "loss")
    rel_err(got.aux_loss, want.aux_loss, "aux loss")
    assert float(got.aux_loss) > 0.1 * float(got.loss), "the aux loss must matter to the gradients"
    for k in ("w", "b"):
        rel_err(grads[k], want.grads[k], f"stage grad {k}")
    rel_err(got.loss_grads["head"], want.loss_grads["head"], "loss-head grad")
    rel_err(got.input_grads, want.input_grads, "input grad")
    rel_err(stats["sum"], want.stats["sum"], "stats")
    np.testing.assert_array_equal(np.asarray(stats["rows"]), [xs.shape[0] * xs.shape[1]] * schedule.stages)
    spec = got.input_grads.sharding.spec[1]
    assert spec == (batch_axes if len(batch_axes) > 1 else batch_axes[0])


E = 4                            # routed experts of the expert-parallel stage


def moe_stage(p, x):                                   # x [n, D]: this (data, expert) shard's rows
    """A residual top-1 MoE layer, experts sharded over `expert`: DeepEP-style dispatch and
    combine (sharding.ep) inside the pipeline stage."""
    scores = jnp.einsum("nd,de->ne", x, p["router"])
    top = jnp.argmax(scores, axis=-1)[:, None]                                           # [n, 1]
    weight = jax.nn.sigmoid(jnp.take_along_axis(scores, top, axis=-1))                   # [n, 1]
    recv_x, recv_idx, recv_w, _, handle = dispatch(x, top, weight, E)                   # [R, n, ...]
    local = recv_idx[..., 0]
    w = p["experts"][jnp.clip(local, 0)]                                                 # [R, n, D, D]
    y = jnp.where((local >= 0)[..., None], recv_w * jnp.tanh(jnp.einsum("rnd,rnde->rne", recv_x, w)), 0)
    return x + combine(y, handle)


def moe_stage_dense(p, x):
    """The same layer on one device: every token through its chosen expert."""
    scores = jnp.einsum("nd,de->ne", x, p["router"])
    top = jnp.argmax(scores, axis=-1)
    weight = jax.nn.sigmoid(jnp.take_along_axis(scores, top[:, None], axis=-1))
    return x + weight * jnp.tanh(jnp.einsum("nd,nde->ne", x, p["experts"][top]))


@pytest.mark.parametrize("kind", ["zb1p", "dualpipev"])
def test_composes_with_expert_axis(kind):
    """data=2 x pipe=2 x expert=2: rows over (data, expert), each stage's experts over `expert`
    (param_specs), tokens dispatched to their expert's rank and combined back inside the stage.
    Expert weights' gradients are summed over `data` only, the router's over both."""
    schedule = make_schedule(kind, 2, 4)
    mesh = make_mesh(data=2, pipe=2, expert=2)
    rng = np.random.default_rng(5)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    S = schedule.stages
    sp = {"router": normal(S, D, E), "experts": normal(S, E, D, D) / 4}
    lp = {"head": normal(D, OUT)}
    xs, ts = normal(4, 16, D), normal(4, 16, OUT)
    specs = {"router": PartitionSpec(), "experts": PartitionSpec("expert")}
    run = jax.jit(lambda rp, lp, xs, ts: pl.pipeline_value_and_grad(
        moe_stage, loss_fn, schedule, mesh, rp, lp, xs, ts, batch_axes=("data", "expert"), param_specs=specs))
    loss, _, rank_grads, loss_grads, dxs, _ = run(pl.to_rank_layout(schedule, sp), lp, xs, ts)
    assert rank_grads["experts"].sharding.spec == PartitionSpec("pipe", None, "expert")
    want_loss, _, want_g, want_lg, want_dxs, _ = pl.sequential_value_and_grad(moe_stage_dense, loss_fn, sp, lp, xs, ts)
    grads = pl.from_rank_layout(schedule, rank_grads)
    rel_err(loss, want_loss, "loss")
    rel_err(grads["router"], want_g["router"], "router grad")
    rel_err(grads["experts"], want_g["experts"], "expert grad")
    rel_err(loss_grads["head"], want_lg["head"], "loss-head grad")
    rel_err(dxs, want_dxs, "input grad")


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_memory_matches_table(kind, ranks, report):
    """Stages of parameters per device, read off the placed arrays, and the executor's peak
    stored activations per rank, equal schedules.memory_table for several micro-batch counts."""
    low = micro_batches(kind, ranks) if kind in ("dualpipe", "dualpipev") else ranks
    for m in (low, low + 2, 3 * low):
        schedule = make_schedule(kind, ranks, m)
        table = memory_table(kind, ranks, m)
        got = pl.memory_report(schedule)
        assert got.activations == table.activations, (m, got.activations, table.activations)
        assert got.params == table.params
    mesh = make_mesh(data=-1, pipe=ranks)
    rank_params = jax.device_put(pl.to_rank_layout(schedule, problem(schedule)[0]),
                                 NamedSharding(mesh, PartitionSpec("pipe")))
    per_device = {s.device: s.data.shape[1] for s in rank_params["w"].addressable_shards}
    stages_held = [per_device[d] for d in mesh.devices[0, :, 0, 0]]
    assert tuple(stages_held) == table.params
    report(f"pipeline memory {kind} P={ranks} M={m}: params/device {stages_held} (table {list(table.params)}), "
           f"stored activations/device {list(got.activations)} (table {list(table.activations)}), "
           f"mailbox peak {list(got.messages)}")


def test_zero_bubble_split_defers_weight_work():
    """ZB1P's split B computes no weight gradient (its jaxpr has one dot fewer per layer than the
    full B), and the W it leaves does."""
    p = {"w": jnp.ones((D, D)), "b": jnp.zeros(D)}
    x, dy = jnp.ones((ROWS, D)), jnp.ones((ROWS, D))
    ctx = pl._Ctx(stage_fn, None, None, 1.0)
    count = lambda wrt: str(jax.make_jaxpr(  # noqa: E731
        lambda p, x, dy: pl._stage_vjp(ctx, p, (), x, dy, None, False, wrt))(p, x, dy)).count("dot_general")
    assert count("input") == count("weight") == 2 and count("all") == 3   # forward + its own backward dot


# ---- the real model's blocks ------------------------------------------------------------------

CFG = ModelConfig.preset("tiny", d_model=32, num_layers=4, num_dense_layers=0, num_heads=2, q_lora_rank=24,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_ffn_dim=16,
                         num_routed_experts=8, num_expert_groups=4, num_limited_groups=2, num_experts_per_tok=2,
                         mtp_depth=0, vocab_size=64, init_std=0.1)
T = 8


def random_transformer():
    """The model's structure with N(0, 0.1) values everywhere (norm weights and router bias too):
    filling an abstract model is much faster on CPU than running its initialisers eagerly."""
    gd, state = nnx.split(nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, CFG.init_std, a.shape), a.dtype), state)
    return nnx.merge(gd, state)


@pytest.mark.parametrize("kind", ["dualpipev"])
def test_transformer_blocks_pipelined(kind, report):
    """The Transformer's 4 MoE blocks in 4 stages (DualPipeV on 2 ranks, ZB1P on 4), embedding
    in front of the pipeline (differentiated through the returned input gradient), final norm and
    head as the loss's parameters, each stage's sequence-wise balance loss as its aux loss and its
    expert counts as its stats: loss (cross-entropy + balance), balance loss, expert counts and
    every parameter's gradient equal jax.value_and_grad of the model's own forward."""
    ranks = 2 if kind == "dualpipev" else 4
    tiny = random_transformer()
    schedule = make_schedule(kind, ranks, 4)
    S, M = schedule.stages, schedule.micro_batches
    tokens = jax.random.randint(jax.random.key(3), (M, 2, T + 1), 0, CFG.vocab_size)
    inputs, labels = tokens[..., :-1], tokens[..., 1:]
    gd, layer_params, rest = nnx.split(tiny.moe_layers, nnx.Param, ...)
    norm_gd, norm_params = nnx.split(tiny.final_norm)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    rope, mask = rope_tables(positions, CFG), mla.causal_mask(positions, positions, None, None)

    def blocks(sp, h):                                 # h [b, T, D]: one stage's layers
        stack = nnx.merge(gd, sp["params"], sp["rest"])
        h, (counts, aux) = run_stack(stack, h, lambda layer, h, _: _scan_step(layer, h, rope, mask, CFG), None, CFG)
        return h, aux.sum(), counts                   # counts [layers, E]

    def ce(lp, h, labels):
        logits = jnp.einsum("btd,dv->btv", nnx.merge(norm_gd, lp["norm"])(h), lp["head"]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    stage_params = jax.tree.map(lambda a: a.reshape(S, -1, *a.shape[1:]), {"params": layer_params, "rest": rest})
    loss_params = {"norm": norm_params, "head": tiny.head[...]}
    embed = tiny.embed[...]
    mesh = make_mesh(data=-1, pipe=ranks, devices=jax.devices()[:ranks])

    @jax.jit
    def train_step(embed, stage_params, loss_params):
        xs, embed_vjp = jax.vjp(lambda e: jnp.take(e, inputs, axis=0), embed)       # [M, b, T, D]
        out = pl.pipeline_value_and_grad(blocks, ce, schedule, mesh, pl.to_rank_layout(schedule, stage_params),
                                         loss_params, xs, labels, has_aux=True)
        counts = pl.from_rank_layout(schedule, out.stats).reshape(-1, CFG.num_routed_experts)
        return (out.loss, out.aux_loss, counts, embed_vjp(out.input_grads)[0],
                pl.from_rank_layout(schedule, out.grads), out.loss_grads)

    model_gd, model_params, model_rest = nnx.split(tiny, nnx.Param, ...)

    @jax.jit
    def reference(model_params):
        def loss(params):
            full = nnx.merge(model_gd, params, model_rest)
            out = jax.vmap(lambda t: full.forward(t, with_mtp=False))(inputs)
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out.logits), labels[..., None], -1))
            return ce + out.balance_loss.mean(), (out.balance_loss.mean(), out.expert_counts.sum(0))
        return jax.value_and_grad(loss, has_aux=True)(model_params)

    loss, balance, counts, g_embed, g_stages, g_loss = train_step(embed, stage_params, loss_params)
    (want_loss, (want_balance, want_counts)), want = reference(model_params)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    assert int(counts.sum()) == M * 2 * T * CFG.num_experts_per_tok * CFG.num_layers
    errs = [rel_err(loss, want_loss, "loss"), rel_err(balance, want_balance, "balance loss"),
            rel_err(g_embed, want["embed"][...], "embedding grad"),
            rel_err(g_loss["head"], want["head"][...], "head grad"),
            rel_err(g_loss["norm"]["weight"][...], want["final_norm"]["weight"][...], "final norm grad")]
    w_layers = want["moe_layers"]
    got_layers = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), g_stages["params"])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_layers), jax.tree.leaves(w_layers)):
        errs.append(rel_err(got, want, f"block grad {jax.tree_util.keystr(path)}"))
    report(f"pipeline {kind} P={ranks}, 4 MoE blocks of the Transformer: max rel err loss/grads {max(errs):.1e}, "
           f"balance loss {float(balance):.3e} (CE + balance = {float(loss):.4f}), expert counts equal")
