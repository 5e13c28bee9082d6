"""The pipeline executor: runs a `schedules.Schedule` over the mesh's `pipe` axis.

The schedule is data known at trace time, so it is compiled (`compile_schedule`) into a lock-step
program: global ticks, at each of which every rank runs its next action (F, B, W or F&B) as
soon as that action's inputs have arrived, or nothing. One `lax.scan` over the ticks runs it
inside `shard_map`; each rank reads its row of an int32 table [ticks, ranks, fields] and does
its compute under `lax.cond`/`lax.switch` (an idle rank computes nothing). After the compute, the
F outputs and B input-gradients move one rank to the right or left with `lax.ppermute` (only the
directions the schedule uses), and the receiver stores them in a mailbox slot chosen at compile
time. A stage handing over to a stage on the same rank (DualPipeV's turn) writes its own mailbox.

Backward recomputes the stage's forward from its stored input (the only activation kept per
micro-batch and stage; no vjp residuals are stored): a full B is one vjp with respect to the
stage parameters and input; a split B (zero-bubble) is a vjp with respect to the input only and
its later W a vjp with respect to the parameters only, so the weight-gradient matmuls really
move to W. The last stage's F adds the loss; its B differentiates the loss through the stage.

Slots are allocated at compile time. Stash: a stage input is live from the start of its F to the
end of its backward (the B, or the W of a split B); its per-rank peak is the "activations" column
of `schedules.memory_table` (tests check they are equal). Mailbox: a message is live from its
arrival to its use (a dy held for a split B's W stays until the W); the table does not model it,
`Program.mail_peak` reports it. Each buffer has one extra scratch slot that idle ranks write.

Parameters: stage parameters stacked on a leading stage axis [S, ...] (`stage_params`) become the
rank layout [P, L, ...] (`to_rank_layout`), sharded over `pipe`: rank r holds `placement[r]`, one
stage for 1F1B/ZB1P, two for DualPipe (r and P-1-r: every stage held twice; the two copies'
gradients are summed, as DualPipe all-reduces them) and DualPipeV (r and 2P-1-r, the V).

Aux: with `has_aux` a stage returns (y, aux_loss, stats): the aux loss (e.g. the MoE sequence
balance loss) joins the loss and is differentiated in the stage's own backward; stats (e.g.
expert counts) are summed over micro-batches and batch shards, per stage.

Batch: inputs [M, b, ...] (M micro-batches, b rows) are split over `batch_axes` (default the
`data` axis) on the row axis; the loss is the mean over micro-batches of `loss_fn`, itself a mean
over its rows, and averaged over the batch shards, so gradients are summed over batch shards
(except over an axis a parameter is itself sharded on, e.g. expert weights over `expert`).

Costs and limits: every B and every W recomputes its stage's forward (so a W costs a forward plus
the weight-gradient work). Ticks are lock-step: a tick lasts as long as its slowest rank's
action, and an F&B runs its two halves in one tick with no explicit overlap of one half's
communication with the other's compute (XLA schedules them). Sends go to neighbouring ranks
only, which every schedule in `schedules` satisfies. Every rank allocates the largest rank's
stash and mailbox (SPMD shapes).

Letters: P ranks, S stages, L stages per rank, M micro-batches, T ticks, b rows per micro-batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float

from sharding.schedules import Schedule

PIPE = "pipe"

# Per (tick, rank) fields of the program table. Slot fields hold -1 until the end of compilation,
# which replaces -1 by the buffer's scratch index.
FIELDS = (
    "f_on", "f_j", "f_m", "f_input", "f_src", "f_stash", "f_last", "f_self", "f_out",
    "b_kind", "b_j", "b_m", "b_x", "b_dy", "b_last", "b_self", "b_dx",
    "w_on", "w_j", "w_m", "w_x", "w_dy", "w_last",
    "rx_f_right", "rx_f_left", "rx_b_right", "rx_b_left",
)
_F = {name: i for i, name in enumerate(FIELDS)}
_STASH_FIELDS = ("f_stash", "b_x", "w_x")
_MAIL_FIELDS = ("f_src", "f_self", "b_dy", "b_self", "w_dy", "rx_f_right", "rx_f_left", "rx_b_right", "rx_b_left")
_OUT_FIELDS = ("f_out", "b_dx")
CHANNELS = ("f_right", "f_left", "b_right", "b_left")   # (what moves, direction)
B_NONE, B_FULL, B_SPLIT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Program:
    """A schedule compiled to lock-step ticks.

    table[t, r, field]: what rank r does at tick t (see FIELDS); channels: the ppermute
    directions used; stash_peak[r] / mail_peak[r]: the most stage inputs kept for backward /
    messages waiting at once on rank r; stash_slots / mail_slots: the buffers' sizes (max over
    ranks, every rank allocates the same shapes), without the scratch slot.
    """

    schedule: Schedule
    training: bool
    table: np.ndarray
    channels: tuple[str, ...]
    stash_peak: tuple[int, ...]
    mail_peak: tuple[int, ...]

    @property
    def ticks(self) -> int:
        return self.table.shape[0]

    @property
    def stash_slots(self) -> int:
        return max(self.stash_peak)

    @property
    def mail_slots(self) -> int:
        return max(self.mail_peak)


# ---------------------------------------------------------------------------------------------
# Compilation: lock-step ticks, then slot allocation
# ---------------------------------------------------------------------------------------------

Part = tuple[str, int, int, bool]        # (F/B/W, stage, micro_batch, split)


def _rank_parts(schedule: Schedule, training: bool) -> list[list[tuple[Part, ...]]]:
    """Each rank's ops in order, an op being the parts it runs in one tick (F&B: two)."""
    out = []
    for acts in schedule.actions:
        ops = []
        for a in acts:
            parts = tuple((k, s, m, a.split and k == "B") for k, s, m in a.parts())
            if not training:
                parts = tuple(p for p in parts if p[0] == "F")
            if parts:
                ops.append(parts)
        out.append(ops)
    return out


def _deps(part: Part, last: int) -> list[tuple[str, int, int]]:
    kind, s, m, _ = part
    if kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if kind == "B":
        return [("F", s, m)] + ([("B", s + 1, m)] if s < last else [])
    return [("B", s, m)]


def _lockstep(schedule: Schedule, training: bool) -> list[list[tuple[Part, ...] | None]]:
    """rows[t][r]: the op rank r runs at tick t. A rank runs its next op at the first tick after
    every input's producer ran (a message sent at the end of tick t is there for tick t + 1)."""
    ops = _rank_parts(schedule, training)
    last = schedule.stages - 1
    done: dict[tuple[str, int, int], int] = {}
    nxt = [0] * schedule.ranks
    rows = []
    while any(n < len(o) for n, o in zip(nxt, ops)):
        t = len(rows)
        row: list[tuple[Part, ...] | None] = [None] * schedule.ranks
        for r, rank_ops in enumerate(ops):
            if nxt[r] < len(rank_ops):
                op = rank_ops[nxt[r]]
                if all(done.get(d, t) < t for p in op for d in _deps(p, last)):
                    row[r] = op
        if not any(row):
            stuck = [(r, o[nxt[r]]) for r, o in enumerate(ops) if nxt[r] < len(o)]
            raise ValueError(f"schedule deadlocks: ranks wait forever at {stuck}")
        for r, op in enumerate(row):
            if op is not None:
                for kind, s, m, _ in op:
                    done[(kind, s, m)] = t
                nxt[r] += 1
        rows.append(row)
    return rows


def _direction(schedule: Schedule, src: int, dst: int, what: str) -> str:
    if dst == src:
        return "self"
    if abs(dst - src) != 1:
        raise ValueError(f"{what} goes from rank {src} to rank {dst}; the executor moves data between neighbours only")
    return "right" if dst == src + 1 else "left"


class _Slots:
    """Lowest-free-slot allocation per rank, with the peak in use."""

    def __init__(self, ranks: int):
        self.used: list[set[int]] = [set() for _ in range(ranks)]
        self.peak = [0] * ranks

    def take(self, r: int) -> int:
        slot = next(i for i in range(len(self.used[r]) + 1) if i not in self.used[r])
        self.used[r].add(slot)
        self.peak[r] = max(self.peak[r], len(self.used[r]))
        return slot

    def free(self, r: int, slot: int) -> None:
        self.used[r].remove(slot)


@functools.lru_cache(maxsize=64)
def compile_schedule(schedule: Schedule, training: bool = True) -> Program:
    """Lock-step ticks, stash and mailbox slots, the per-(tick, rank) table. `training=False`
    keeps only the forwards (inference)."""
    P, S = schedule.ranks, schedule.stages
    rows = _lockstep(schedule, training)
    table = np.zeros((len(rows), P, len(FIELDS)), np.int32)
    for name in _STASH_FIELDS + _MAIL_FIELDS + _OUT_FIELDS:
        table[:, :, _F[name]] = -1
    stash, mail = _Slots(P), _Slots(P)
    x_slot: dict[tuple[int, int], int] = {}          # (stage, mb) -> stash slot of its input
    act_mail: dict[tuple[int, int], int] = {}        # (stage, mb) -> mailbox slot of its input
    dy_mail: dict[tuple[int, int], int] = {}         # (stage, mb) -> mailbox slot of its output grad
    channels: set[str] = set()

    for t, row in enumerate(rows):
        frees: list[tuple[_Slots, int, int]] = []
        sent: list[tuple[int, str, int, int, int]] = []   # (src rank, F/B, stage, mb, dst rank)

        def put(r: int, name: str, value: int) -> None:
            table[t, r, _F[name]] = value

        for r, op in enumerate(row):
            for kind, s, m, split in op or ():
                j = schedule.placement[r].index(s)
                if kind == "F":
                    put(r, "f_on", 1), put(r, "f_j", j), put(r, "f_m", m), put(r, "f_last", int(s == S - 1))
                    if s == 0:
                        put(r, "f_input", 1)
                    else:
                        put(r, "f_src", act_mail.pop((s, m)))
                        frees.append((mail, r, table[t, r, _F["f_src"]]))
                    if training:
                        x_slot[(s, m)] = stash.take(r)
                        put(r, "f_stash", x_slot[(s, m)])
                    elif s == S - 1:
                        put(r, "f_out", m)
                    if s < S - 1:
                        sent.append((r, "F", s, m, schedule.route[m][s + 1]))
                elif kind == "B":
                    put(r, "b_kind", B_SPLIT if split else B_FULL), put(r, "b_j", j), put(r, "b_m", m)
                    put(r, "b_x", x_slot[(s, m)]), put(r, "b_last", int(s == S - 1))
                    if s < S - 1:
                        put(r, "b_dy", dy_mail[(s, m)])
                    if not split:
                        frees.append((stash, r, x_slot.pop((s, m))))
                        if s < S - 1:
                            frees.append((mail, r, dy_mail.pop((s, m))))
                    if s > 0:
                        sent.append((r, "B", s, m, schedule.route[m][s - 1]))
                    else:
                        put(r, "b_dx", m)
                else:
                    put(r, "w_on", 1), put(r, "w_j", j), put(r, "w_m", m), put(r, "w_last", int(s == S - 1))
                    put(r, "w_x", x_slot[(s, m)])
                    frees.append((stash, r, x_slot.pop((s, m))))
                    if s < S - 1:
                        put(r, "w_dy", dy_mail[(s, m)])
                        frees.append((mail, r, dy_mail.pop((s, m))))
        for pool, r, slot in frees:          # used during tick t, free for what arrives at its end
            pool.free(r, int(slot))
        for src, kind, s, m, dst in sent:
            slot = mail.take(dst)
            if kind == "F":
                act_mail[(s + 1, m)] = slot
            else:
                dy_mail[(s - 1, m)] = slot
            d = _direction(schedule, src, dst, f"{kind} of stage {s}, micro-batch {m}")
            if d == "self":
                put(src, "f_self" if kind == "F" else "b_self", slot)
            else:
                channel = f"{kind.lower()}_{d}"
                channels.add(channel)
                put(dst, f"rx_{channel}", slot)

    if x_slot or act_mail or dy_mail:
        raise ValueError(f"compiled program leaves values unconsumed: {x_slot=} {act_mail=} {dy_mail=}")
    for names, scratch in ((_STASH_FIELDS, max(stash.peak)), (_MAIL_FIELDS, max(mail.peak)),
                           (_OUT_FIELDS, schedule.micro_batches)):
        for name in names:
            col = table[:, :, _F[name]]
            col[col < 0] = scratch
    return Program(schedule, training, table, tuple(c for c in CHANNELS if c in channels),
                   tuple(stash.peak), tuple(mail.peak))


# ---------------------------------------------------------------------------------------------
# Parameter layout
# ---------------------------------------------------------------------------------------------


def _placement(schedule: Schedule) -> np.ndarray:
    width = {len(p) for p in schedule.placement}
    if len(width) != 1:
        raise ValueError(f"every rank must hold the same number of stages, got {schedule.placement}")
    return np.asarray(schedule.placement, np.int32)                 # [P, L]


def to_rank_layout(schedule: Schedule, stage_params):
    """[S, ...] stage-stacked parameters -> [P, L, ...], rank r's row holding placement[r]."""
    idx = _placement(schedule)
    return jax.tree.map(lambda a: a[idx], stage_params)


def from_rank_layout(schedule: Schedule, rank_params):
    """[P, L, ...] -> [S, ...]: each stage from the first (rank, local index) holding it (after
    `pipeline_value_and_grad` both copies of a DualPipe stage's gradient are equal)."""
    first = {}
    for r, stages in enumerate(schedule.placement):
        for j, s in enumerate(stages):
            first.setdefault(s, (r, j))
    rs, js = (np.asarray([first[s][i] for s in range(schedule.stages)]) for i in (0, 1))
    return jax.tree.map(lambda a: a[rs, js], rank_params)


def _duplicate_perms(schedule: Schedule) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """For stages held twice: (j, j2) -> [(r2, r)]: rank r2's local j2 is the same stage as rank
    r's local j, so r's gradient at j adds what r2 sends from j2."""
    where: dict[int, list[tuple[int, int]]] = {}
    for r, stages in enumerate(schedule.placement):
        for j, s in enumerate(stages):
            where.setdefault(s, []).append((r, j))
    perms: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for holders in where.values():
        if len(holders) > 2:
            raise ValueError(f"a stage held {len(holders)} times; the executor sums at most two copies")
        if len(holders) == 2:
            (r, j), (r2, j2) = holders
            perms.setdefault((j, j2), []).append((r2, r))
            perms.setdefault((j2, j), []).append((r, r2))
    return perms


# ---------------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """What one tick needs besides the carry (all static but the arrays)."""

    stage_fn: Callable
    loss_fn: Callable | None
    program: Program
    scale: float                                      # cotangent of each micro-batch's loss
    has_aux: bool = False                             # stage_fn -> (y, aux_loss, stats)


def _run_stage(ctx: _Ctx, p, x):
    """(y, aux_loss, stats) of one stage; without has_aux, aux_loss = 0 and stats = ()."""
    if ctx.has_aux:
        y, aux_loss, stats = ctx.stage_fn(p, x)
        return y, jnp.asarray(aux_loss, jnp.float32), stats
    return ctx.stage_fn(p, x), jnp.float32(0), ()


def _take(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _add_at(tree, j, delta):
    return jax.tree.map(lambda g, d: g.at[j].add(d.astype(g.dtype)), tree, delta)


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _stage_vjp(ctx: _Ctx, p, lp, x, dy, tgt, last, wrt: str):
    """(dx, dp, dlp) of one stage for one micro-batch, recomputing its forward. wrt: "all" (full
    B), "input" (split B: dp, dlp zero) or "weight" (W: dx zero). On the last stage the output
    gradient comes from the loss (cotangent `ctx.scale`) instead of dy; a stage's own aux loss
    always gets cotangent `ctx.scale`. Only the wanted
    cotangents are traced: the others' arguments are constants of the vjp, so a split B does no
    weight-gradient work and a W no input-gradient work."""
    want_x, want_p = wrt in ("all", "input"), wrt in ("all", "weight")
    def f(p_, x_):
        y, aux_loss, stats = _run_stage(ctx, p_, x_)
        return (y, aux_loss), stats

    if want_x and want_p:
        (y, _), pullback, _ = jax.vjp(f, p, x, has_aux=True)
    elif want_x:
        (y, _), pullback, _ = jax.vjp(lambda x_: f(p, x_), x, has_aux=True)
    else:
        (y, _), pullback, _ = jax.vjp(lambda p_: f(p_, x), p, has_aux=True)
    dlp = _zeros(lp)
    if ctx.loss_fn is not None:
        def from_loss():
            loss = lambda lp_, y_: ctx.loss_fn(lp_, y_, tgt).astype(jnp.float32)  # noqa: E731
            if want_p:
                _, loss_pullback = jax.vjp(loss, lp, y)
                return loss_pullback(jnp.float32(ctx.scale))[::-1]
            _, loss_pullback = jax.vjp(lambda y_: loss(lp, y_), y)
            return loss_pullback(jnp.float32(ctx.scale))[0], _zeros(lp)
        dy, dlp = lax.cond(last, from_loss, lambda: (dy, _zeros(lp)))
    cts = pullback((dy, jnp.float32(ctx.scale)))
    dp = cts[0] if want_p else _zeros(p)
    dx = cts[-1] if want_x else jnp.zeros_like(x)
    return dx, dp, dlp


def _forward(ctx: _Ctx, params, lp, x, j, tgt, last, on):
    """y = stage j(x), the micro-batch's loss on the last stage, the stage's aux loss and
    stats; zeros when idle."""
    p = _take(params, j)

    def run():
        y, aux_loss, stats = _run_stage(ctx, p, x)
        if ctx.loss_fn is None:
            return y, jnp.float32(0), aux_loss, stats
        loss = lax.cond(last, lambda: ctx.loss_fn(lp, y, tgt).astype(jnp.float32), lambda: jnp.float32(0))
        return y, loss, aux_loss, stats

    idle = _zeros(jax.eval_shape(lambda: _run_stage(ctx, p, x)[2]))
    return lax.cond(on, run, lambda: (jnp.zeros_like(x), jnp.float32(0), jnp.float32(0), idle))


def _backward(ctx: _Ctx, params, lp, stash, mail, targets, grads, lgrads, row):
    """The tick's B (none, full or split): (dx, grads, lgrads)."""
    g = lambda name: row[_F[name]]  # noqa: E731
    x, dy, tgt = stash[g("b_x")], mail[g("b_dy")], _take(targets, g("b_m"))
    p = _take(params, g("b_j"))

    def none():
        return jnp.zeros_like(x), grads, lgrads

    def full():
        dx, dp, dlp = _stage_vjp(ctx, p, lp, x, dy, tgt, g("b_last") == 1, "all")
        return dx, _add_at(grads, g("b_j"), dp), _tree_add(lgrads, dlp)

    def split():
        dx, _, _ = _stage_vjp(ctx, p, lp, x, dy, tgt, g("b_last") == 1, "input")
        return dx, grads, lgrads

    return lax.switch(g("b_kind"), (none, full, split))


def _weight(ctx: _Ctx, params, lp, stash, mail, targets, grads, lgrads, row):
    """The tick's W: the parameter gradients of an earlier split B."""
    g = lambda name: row[_F[name]]  # noqa: E731
    x, dy, tgt = stash[g("w_x")], mail[g("w_dy")], _take(targets, g("w_m"))

    def run():
        _, dp, dlp = _stage_vjp(ctx, _take(params, g("w_j")), lp, x, dy, tgt, g("w_last") == 1, "weight")
        return _add_at(grads, g("w_j"), dp), _tree_add(lgrads, dlp)

    return lax.cond(g("w_on") == 1, run, lambda: (grads, lgrads))


def _exchange(program: Program, mail, y, dx, row):
    """Move this tick's F outputs and B input-gradients to their neighbours' mailboxes."""
    P = program.schedule.ranks
    perms = {"right": [(r, r + 1) for r in range(P - 1)], "left": [(r + 1, r) for r in range(P - 1)]}
    mail = mail.at[row[_F["f_self"]]].set(y).at[row[_F["b_self"]]].set(dx)
    for channel in program.channels:
        kind, direction = channel.split("_")
        with jax.named_scope(f"pipeline/send_{channel}"):
            got = lax.ppermute(y if kind == "f" else dx, PIPE, perms[direction])
        mail = mail.at[row[_F[f"rx_{channel}"]]].set(got)
    return mail


def _train_tick(ctx: _Ctx, params, lp, xs, targets, carry, row):
    stash, mail, grads, lgrads, loss, aux, stats, dxs = carry
    g = lambda name: row[_F[name]]  # noqa: E731
    x_in = jnp.where(g("f_input") == 1, xs[g("f_m")], mail[g("f_src")])
    with jax.named_scope("pipeline/forward"):
        y, loss_m, aux_m, stats_m = _forward(ctx, params, lp, x_in, g("f_j"), _take(targets, g("f_m")), g("f_last") == 1,
                             g("f_on") == 1)
    with jax.named_scope("pipeline/backward"):
        dx, grads, lgrads = _backward(ctx, params, lp, stash, mail, targets, grads, lgrads, row)
    with jax.named_scope("pipeline/weight_grad"):
        grads, lgrads = _weight(ctx, params, lp, stash, mail, targets, grads, lgrads, row)
    stash = stash.at[g("f_stash")].set(x_in)
    dxs = dxs.at[g("b_dx")].set(dx)
    mail = _exchange(ctx.program, mail, y, dx, row)
    inv_m = 1.0 / ctx.program.schedule.micro_batches
    stats = _add_at(stats, g("f_j"), stats_m)                # idle: adds zeros
    return (stash, mail, grads, lgrads, loss + loss_m * inv_m, aux + aux_m * inv_m, stats, dxs)


def _infer_tick(ctx: _Ctx, params, xs, carry, row):
    mail, outs = carry
    g = lambda name: row[_F[name]]  # noqa: E731
    x_in = jnp.where(g("f_input") == 1, xs[g("f_m")], mail[g("f_src")])
    with jax.named_scope("pipeline/forward"):
        y = _forward(ctx, params, (), x_in, g("f_j"), None, False, g("f_on") == 1)[0]
    outs = outs.at[g("f_out")].set(y)
    return _exchange(ctx.program, mail, y, jnp.zeros_like(y), row), outs


def _specs(mesh: Mesh, batch_axes: tuple[str, ...], param_specs, rank_params):
    """in-specs of rank parameters ([P, L, *leaf spec]) and of micro-batched data ([M, b, ...])."""
    if PIPE not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {PIPE!r} axis")
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"batch axes {missing} are not mesh axes {mesh.axis_names}")
    if param_specs is None:
        param_specs = jax.tree.map(lambda _: PartitionSpec(), rank_params)
    pspecs = jax.tree.map(lambda s: PartitionSpec(PIPE, None, *s), param_specs,
                          is_leaf=lambda s: isinstance(s, PartitionSpec))
    batch = PartitionSpec(None, batch_axes if batch_axes else None)
    return param_specs, pspecs, batch


def _batch_shards(mesh: Mesh, batch_axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes]))


def _check_shapes(schedule: Schedule, rank_params, xs):
    P, L = _placement(schedule).shape
    lead = {a.shape[:2] for a in jax.tree.leaves(rank_params)}
    if lead != {(P, L)}:
        raise ValueError(f"rank parameters must lead with [P={P}, L={L}] (to_rank_layout), got {lead}")
    if xs.shape[0] != schedule.micro_batches:
        raise ValueError(f"inputs lead with {xs.shape[0]} micro-batches, the schedule has {schedule.micro_batches}")


def _check_stage(ctx: _Ctx, params, xs):
    """Inside shard_map (the stage may use collectives): stage_fn keeps the activation's type."""
    y = jax.eval_shape(lambda p, x: _run_stage(ctx, p, x)[0], _take(params, 0),
                       jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype))
    if (y.shape, y.dtype) != (xs.shape[1:], xs.dtype):
        raise ValueError(f"stage_fn must keep the activation's shape and dtype: {xs.shape[1:]} {xs.dtype} -> "
                         f"{y.shape} {y.dtype}")


def _sum_duplicates(schedule: Schedule, grads):
    """DualPipe: add the other copy's gradient of each stage held twice."""
    total = grads
    for (j, j2), perm in _duplicate_perms(schedule).items():
        got = jax.tree.map(lambda g: lax.ppermute(g[j2], PIPE, perm), grads)
        total = jax.tree.map(lambda t, o: t.at[j].add(o), total, got)
    return total


class PipelineOutput(NamedTuple):
    """loss: mean over micro-batches of loss_fn plus every stage's aux loss, averaged over batch
    shards; aux_loss: the aux-loss part of it; grads: [P, L, ...] stage-parameter gradients
    (rank layout; both copies of a DualPipe stage hold the sum); loss_grads: of loss_params;
    input_grads: [M, b, ...] gradient with respect to xs (for an embedding in front of the
    pipeline); stats: [P, L, ...] each stage's stats summed over micro-batches and batch shards
    (e.g. expert counts), () without has_aux."""

    loss: jax.Array
    aux_loss: jax.Array
    grads: Any
    loss_grads: Any
    input_grads: jax.Array
    stats: Any


def pipeline_value_and_grad(stage_fn: Callable, loss_fn: Callable, schedule: Schedule, mesh: Mesh,
                            rank_params, loss_params, xs: Float[Array, "M b ..."], targets, *,
                            batch_axes: tuple[str, ...] = ("data",), param_specs=None,
                            has_aux: bool = False) -> PipelineOutput:
    """Run `schedule` for training. Call it under `jax.jit`.

    stage_fn(stage_params, x[b, ...]) -> y with x's shape and dtype: one stage. With has_aux
    it returns (y, aux_loss, stats): aux_loss a scalar added to the loss (and differentiated),
    stats a pytree of arrays only summed (e.g. expert counts).
    loss_fn(loss_params, y[b, ...], target) -> scalar: after the last stage, a mean over rows.
    rank_params: [P, L, ...] (`to_rank_layout`), sharded over `pipe`; param_specs: optional
    per-leaf PartitionSpec of a stage's parameter (without the [P, L] axes), e.g. for expert
    weights over `expert`. loss_params: replicated. xs: [M, b, ...] stage-0 inputs; targets:
    pytree of [M, b, ...]; both split over `batch_axes` on the row axis.
    """
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    _check_shapes(schedule, rank_params, xs)
    program = compile_schedule(schedule, training=True)
    param_specs, pspecs, batch = _specs(mesh, batch_axes, param_specs, rank_params)
    shards = _batch_shards(mesh, batch_axes)
    ctx = _Ctx(stage_fn, loss_fn, program, 1.0 / (schedule.micro_batches * shards), has_aux)
    table = jnp.asarray(program.table)
    spec_axes = jax.tree.map(lambda s: {a for e in s for a in ((e,) if isinstance(e, str) else (e or ()))},
                             param_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))

    def local(params, lp, xs, targets):
        params = _take(params, 0)                                       # [L, ...]
        _check_stage(ctx, params, xs)
        rows = table[:, lax.axis_index(PIPE)]                          # [T, fields]
        stash = jnp.zeros((program.stash_slots + 1,) + xs.shape[1:], xs.dtype)
        mail = jnp.zeros((program.mail_slots + 1,) + xs.shape[1:], xs.dtype)
        dxs = jnp.zeros((xs.shape[0] + 1,) + xs.shape[1:], xs.dtype)
        one = jax.eval_shape(lambda p, x: _run_stage(ctx, p, x)[2], _take(params, 0), xs[0])
        stats = jax.tree.map(lambda a: jnp.zeros((len(schedule.placement[0]),) + a.shape, a.dtype), one)
        carry = (stash, mail, _zeros(params), _zeros(lp), jnp.float32(0), jnp.float32(0), stats, dxs)
        tick = lambda c, row: (_train_tick(ctx, params, lp, xs, targets, c, row), None)  # noqa: E731
        _, _, grads, lgrads, loss, aux, stats, dxs = lax.scan(tick, carry, rows)[0]
        grads = _sum_duplicates(schedule, grads)
        grads = jax.tree.map(lambda g_, axes: lax.psum(g_, tuple(a for a in batch_axes if a not in axes))
                             if set(batch_axes) - axes else g_, grads, spec_axes)
        stats = jax.tree.map(lambda a: lax.psum(a, batch_axes) if batch_axes else a,
                             _sum_duplicates(schedule, stats))
        lgrads = jax.tree.map(lambda g_: lax.psum(g_, (PIPE,) + batch_axes), lgrads)
        loss, aux = (lax.psum(v, (PIPE,) + batch_axes) / shards for v in (loss, aux))
        lead = lambda tree: jax.tree.map(lambda a: a[None], tree)  # noqa: E731
        return loss + aux, aux, lead(grads), lgrads, lax.psum(dxs[:-1], PIPE), lead(stats)

    lp_specs = jax.tree.map(lambda _: PartitionSpec(), loss_params)
    t_specs = jax.tree.map(lambda _: batch, targets)
    f = jax.shard_map(local, mesh=mesh, in_specs=(pspecs, lp_specs, batch, t_specs),
                      out_specs=(PartitionSpec(), PartitionSpec(), pspecs, lp_specs, batch, PartitionSpec(PIPE)),
                      check_vma=False)
    return PipelineOutput(*f(rank_params, loss_params, xs, targets))


def pipeline_forward(stage_fn: Callable, schedule: Schedule, mesh: Mesh, rank_params, xs: Float[Array, "M b ..."],
                     *, batch_axes: tuple[str, ...] = ("data",), param_specs=None,
                     has_aux: bool = False) -> Float[Array, "M b ..."]:
    """Inference: the schedule's forwards only (same placement and routes, no stash). Returns
    the last stage's outputs [M, b, ...], split over `batch_axes` like xs. Call under `jax.jit`."""
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    _check_shapes(schedule, rank_params, xs)
    program = compile_schedule(schedule, training=False)
    _, pspecs, batch = _specs(mesh, batch_axes, param_specs, rank_params)
    ctx = _Ctx(stage_fn, None, program, 1.0, has_aux)
    table = jnp.asarray(program.table)

    def local(params, xs):
        params = _take(params, 0)
        _check_stage(ctx, params, xs)
        rows = table[:, lax.axis_index(PIPE)]
        mail = jnp.zeros((program.mail_slots + 1,) + xs.shape[1:], xs.dtype)
        outs = jnp.zeros((xs.shape[0] + 1,) + xs.shape[1:], xs.dtype)
        tick = lambda c, row: (_infer_tick(ctx, params, xs, c, row), None)  # noqa: E731
        _, outs = lax.scan(tick, (mail, outs), rows)[0]
        return lax.psum(outs[:-1], PIPE)

    f = jax.shard_map(local, mesh=mesh, in_specs=(pspecs, batch), out_specs=batch, check_vma=False)
    return f(rank_params, xs)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineMemory:
    """What the executor holds per rank: params[r] stages of parameters, activations[r] the
    peak stage inputs kept for backward (the table's column), messages[r] the peak mailbox
    (received activations and gradients waiting for their F / B / W), and the lock-step ticks."""

    params: tuple[int, ...]
    activations: tuple[int, ...]
    messages: tuple[int, ...]
    ticks: int


def memory_report(schedule: Schedule) -> PipelineMemory:
    program = compile_schedule(schedule, training=True)
    return PipelineMemory(tuple(len(p) for p in schedule.placement), program.stash_peak,
                          program.mail_peak, program.ticks)


def sequential_value_and_grad(stage_fn: Callable, loss_fn: Callable, stage_params, loss_params,
                              xs: jax.Array, targets, has_aux: bool = False) -> PipelineOutput:
    """The reference: each micro-batch through stages 0..S-1 in order, the mean over
    micro-batches of its loss plus its stages' aux losses, one `jax.value_and_grad`. Returns a
    PipelineOutput whose grads and stats are stage-stacked [S, ...] instead of rank layout."""
    ctx = _Ctx(stage_fn, loss_fn, None, 1.0, has_aux)

    def one(sp, lp, x, tgt):
        y, aux, stats = _sequential(ctx, sp, x)
        return loss_fn(lp, y, tgt).astype(jnp.float32) + aux, (aux, stats)

    def total(sp, lp, xs):
        losses, (aux, stats) = jax.vmap(lambda x, t: one(sp, lp, x, t))(xs, targets)
        return jnp.mean(losses), (jnp.mean(aux), jax.tree.map(lambda a: a.sum(0), stats))

    (loss, (aux, stats)), (g, lg, dxs) = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(
        stage_params, loss_params, xs)
    return PipelineOutput(loss, aux, g, lg, dxs, stats)


def _sequential(ctx: _Ctx, stage_params, x):
    """x through stages 0..S-1 (a scan over the stage axis): (y, summed aux loss, stats [S, ...])."""
    def step(carry, p):
        h, aux = carry
        y, a, stats = _run_stage(ctx, p, h)
        return (y, aux + a), stats

    (y, aux), stats = lax.scan(step, (x, jnp.float32(0)), stage_params)
    return y, aux, stats


def sequential_forward(stage_fn: Callable, stage_params, x: jax.Array, has_aux: bool = False) -> jax.Array:
    """x through stages 0..S-1 in order."""
    return _sequential(_Ctx(stage_fn, None, None, 1.0, has_aux), stage_params, x)[0]
