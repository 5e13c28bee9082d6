"""Pipeline schedules as data: 1F1B, ZB1P, DualPipe and DualPipeV, their validation, a cost
simulator that measures the bubble, and timeline pictures.

A schedule is, for every pipeline rank, an ordered tuple of `Action`s. An action names a model
*stage* (a contiguous block of layers; stage 0 takes the input, the last stage computes the loss)
and a *micro-batch*. `Schedule.route[m][s]` is the rank that runs stage s for micro-batch m, so
the executor knows where each activation comes from and goes to (a send after F when the next
stage's rank differs, a send after B when the previous stage's rank differs); sends and receives
are implied by the route and are not separate actions (`sends(schedule, action)` lists them).
DualPipe numbers its micro-batches 0..M/2-1 for the direction entering at rank 0 and M/2..M-1
for the one entering at rank P-1.

Measured with `simulate` (comm = 0) the bubble equals the README table for every schedule and
rank count tested, under the table's own picture of the costs (`formula_holds`): F == B - W and
W <= F for DualPipe(V), W <= min(F, B - W) for ZB1P, anything for 1F1B. Parameters and peak
live activations per device from `memory_table` equal the table's 1x/PP, 1x/PP, 2x/PP+1, 2x/PP+1.

Action kinds (costs are those of the DualPipe README table, where B is a *full* backward):
- F:  forward of (stage, micro_batch); on the last stage it includes the loss.       cost F
- B:  backward of (stage, micro_batch). `split=False`: full backward (input and weight
      gradients), cost B. `split=True`: input gradients only, cost B - W; a later W on the
      same rank finishes it.
- W:  weight gradients of an earlier split B of (stage, micro_batch).                 cost W
- FB: DualPipe's F&B, a forward of (stage, micro_batch) overlapped with a full backward of
      (bwd_stage, bwd_micro_batch), a different chunk.                                cost F&B

Letters: P pipeline ranks, S stages, M micro-batches, N = P for DualPipeV's devices.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Literal

Kind = Literal["F", "B", "W", "FB"]
ScheduleKind = Literal["1f1b", "zb1p", "dualpipe", "dualpipev"]
KINDS: tuple[ScheduleKind, ...] = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of one rank. For FB, (stage, micro_batch) is the forward half."""

    kind: Kind
    rank: int
    stage: int
    micro_batch: int
    split: bool = False              # B only: input gradients now, weight gradients in a later W
    bwd_stage: int = -1              # FB only: the backward half
    bwd_micro_batch: int = -1

    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """The elementary computations as (kind, stage, micro_batch); kind in F, B, W."""
        if self.kind == "FB":
            return (("F", self.stage, self.micro_batch), ("B", self.bwd_stage, self.bwd_micro_batch))
        return ((self.kind, self.stage, self.micro_batch),)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.stage}.{self.micro_batch}&B{self.bwd_stage}.{self.bwd_micro_batch}"
        return f"{self.kind}{'i' if self.split else ''}{self.stage}.{self.micro_batch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus where every (micro-batch, stage) runs.

    placement[r]: the stages rank r holds (their parameters live there).
    route[m][s]:  the rank that runs stage s for micro-batch m.
    actions[r]:   rank r's actions in execution order.
    """

    kind: ScheduleKind
    ranks: int
    stages: int
    micro_batches: int
    placement: tuple[tuple[int, ...], ...]
    route: tuple[tuple[int, ...], ...]
    actions: tuple[tuple[Action, ...], ...]


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


def _check_common(ranks: int, micro_batches: int) -> None:
    if ranks < 1:
        raise ValueError(f"{ranks=} must be >= 1")
    if micro_batches < 1:
        raise ValueError(f"{micro_batches=} must be >= 1")


def _single_stage(kind: ScheduleKind, ranks: int, micro_batches: int,
                  actions: list[list[Action]]) -> Schedule:
    route = tuple(tuple(range(ranks)) for _ in range(micro_batches))
    return Schedule(kind, ranks, ranks, micro_batches, tuple((r,) for r in range(ranks)), route,
                    tuple(tuple(a) for a in actions))


def one_f_one_b(ranks: int, micro_batches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs stage r; P-r-1 warm-up forwards, then one forward and
    one full backward in turn, then the cool-down backwards."""
    _check_common(ranks, micro_batches)
    if micro_batches < ranks:
        raise ValueError(f"1F1B needs {micro_batches=} >= {ranks=} to reach its steady state")
    actions = []
    for r in range(ranks):
        warmup = ranks - r - 1
        seq = [Action("F", r, r, m) for m in range(warmup)]
        for m in range(micro_batches - warmup):
            seq += [Action("F", r, r, m + warmup), Action("B", r, r, m)]
        seq += [Action("B", r, r, m) for m in range(micro_batches - warmup, micro_batches)]
        actions.append(seq)
    return _single_stage("1f1b", ranks, micro_batches, actions)


def zb1p(ranks: int, micro_batches: int) -> Schedule:
    """ZB1P (zero-bubble ZB-H1): 1F1B's order with every backward split into B (input gradients)
    and W (weight gradients). Rank r delays each W by r backwards, so its live micro-batches peak
    at P like 1F1B's rank 0, and the delayed W's fill the cool-down while later ranks' input
    gradients travel back."""
    _check_common(ranks, micro_batches)
    if micro_batches < ranks:
        raise ValueError(f"ZB1P needs {micro_batches=} >= {ranks=} to reach its steady state")
    actions = []
    for r in range(ranks):
        warmup = ranks - r - 1
        seq = [Action("F", r, r, m) for m in range(warmup)]
        pending: deque[int] = deque()

        def backward(m: int) -> None:
            seq.append(Action("B", r, r, m, split=True))
            pending.append(m)
            if len(pending) > r:
                seq.append(Action("W", r, r, pending.popleft()))

        for m in range(micro_batches - warmup):
            seq.append(Action("F", r, r, m + warmup))
            backward(m)
        for m in range(micro_batches - warmup, micro_batches):
            backward(m)
        seq += [Action("W", r, r, m) for m in pending]
        actions.append(seq)
    return _single_stage("zb1p", ranks, micro_batches, actions)


@dataclasses.dataclass
class _Rank:
    """Book-keeping while emitting one DualPipe(V) rank: which micro-batch each local phase runs
    next, and the FIFO of split backwards waiting for their W."""

    rank: int
    stage: tuple[int, int]                       # local phase -> stage
    batches: tuple[list[int], list[int]]         # local phase -> micro-batches in order
    out: list[Action] = dataclasses.field(default_factory=list)
    next_f: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    next_b: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    waiting_w: deque = dataclasses.field(default_factory=deque)

    def _take(self, counter: list[int], phase: int) -> tuple[int, int]:
        m = self.batches[phase][counter[phase]]
        counter[phase] += 1
        return self.stage[phase], m

    def f(self, phase: int) -> None:
        self.out.append(Action("F", self.rank, *self._take(self.next_f, phase)))

    def b(self, phase: int, split: bool = False) -> None:
        stage, m = self._take(self.next_b, phase)
        self.out.append(Action("B", self.rank, stage, m, split=split))
        if split:
            self.waiting_w.append((stage, m))

    def w(self) -> None:
        self.out.append(Action("W", self.rank, *self.waiting_w.popleft()))

    def fb(self, f_phase: int, b_phase: int) -> None:
        fs, fm = self._take(self.next_f, f_phase)
        bs, bm = self._take(self.next_b, b_phase)
        self.out.append(Action("FB", self.rank, fs, fm, bwd_stage=bs, bwd_micro_batch=bm))


def _dual_steps(st: _Rank, h: int, n: int, chunks: int) -> None:
    """DualPipe's eight steps for one rank (the structure of DeepSeek's reference).

    h: the rank's distance from its pipeline's end (DualPipe: min(r, P-1-r); DualPipeV: r),
    n: ranks per direction (P/2; DualPipeV: N), chunks: micro-batches per local phase 0.
    Local phase 0 is the pipeline whose first stage is nearer this rank, phase 1 the other.
    """
    for _ in range(2 * (n - h - 1)):                    # 1: nF0
        st.f(0)
    for _ in range(h + 1):                              # 2: nF0F1
        st.f(0)
        st.f(1)
    for _ in range(n - h - 1):                          # 3: nB1W1F1, zero bubble
        st.b(1, split=True)
        st.w()
        st.f(1)
    for i in range(chunks - 2 * n + h + 1):             # 4: nF0B1F1B0, the main step
        if i == 0 and h == n - 1:                       # the turn-around rank: not overlapped
            st.f(0)
            st.b(1)
        else:
            st.fb(0, 1)
        st.fb(1, 0)
    for _ in range(n - h - 1):                          # 5: nB1F1B0
        st.b(1)
        st.fb(1, 0)
    split = False
    for i in range(h + 1):                              # 6: nB1B0, second half zero bubble
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        st.b(1, split=split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        st.b(0, split=split)
    for _ in range(n - h - 1):                          # 7: nWB0
        st.w()
        st.b(0, split=True)
    for _ in range(h + 1):                              # 8: nW
        st.w()
    assert not st.waiting_w


def dualpipe(ranks: int, micro_batches: int) -> Schedule:
    """DualPipe: P ranks, P stages, each stage held twice. Rank r holds stages r and P-1-r;
    micro-batches 0..M/2-1 enter at rank 0 (stage s on rank s), micro-batches M/2..M-1 enter at
    rank P-1 (stage s on rank P-1-s). Losses are computed on ranks P-1 and 0."""
    _check_common(ranks, micro_batches)
    if ranks % 2:
        raise ValueError(f"DualPipe needs an even number of ranks, got {ranks=}")
    if micro_batches % 2:
        raise ValueError(f"DualPipe needs an even number of micro-batches, got {micro_batches=}")
    if micro_batches < 2 * ranks:
        raise ValueError(f"DualPipe needs {micro_batches=} >= 2 * {ranks=}")
    half = micro_batches // 2
    down, up = list(range(half)), list(range(half, micro_batches))
    route = tuple(tuple(range(ranks)) if m < half else tuple(range(ranks - 1, -1, -1))
                  for m in range(micro_batches))
    actions = []
    for r in range(ranks):
        second = r >= ranks // 2
        stages = (ranks - 1 - r, r) if second else (r, ranks - 1 - r)
        batches = (up, down) if second else (down, up)
        st = _Rank(r, stages, batches)
        _dual_steps(st, min(r, ranks - 1 - r), ranks // 2, half)
        actions.append(tuple(st.out))
    placement = tuple((r, ranks - 1 - r) for r in range(ranks))
    return Schedule("dualpipe", ranks, ranks, micro_batches, placement, route, tuple(actions))


def dualpipev(ranks: int, micro_batches: int) -> Schedule:
    """DualPipeV (cut-in-half DualPipe): N ranks, 2N stages in a V. Rank r holds stages r and
    2N-1-r; every micro-batch enters at rank 0, turns at rank N-1 and ends (loss) at rank 0."""
    _check_common(ranks, micro_batches)
    if micro_batches < 2 * ranks:
        raise ValueError(f"DualPipeV needs {micro_batches=} >= 2 * {ranks=}")
    stages = 2 * ranks
    route = tuple(tuple(s if s < ranks else stages - 1 - s for s in range(stages))
                  for _ in range(micro_batches))
    everyone = list(range(micro_batches))
    actions = []
    for r in range(ranks):
        st = _Rank(r, (r, stages - 1 - r), (everyone, everyone))
        _dual_steps(st, r, ranks, micro_batches)
        actions.append(tuple(st.out))
    placement = tuple((r, stages - 1 - r) for r in range(ranks))
    return Schedule("dualpipev", ranks, stages, micro_batches, placement, route, tuple(actions))


def sends(schedule: Schedule, action: Action) -> tuple[tuple[str, int, int, int], ...]:
    """What `action` sends when it finishes, as (kind, stage, micro_batch, destination rank):
    an F's output activation to the rank of the next stage, a B's input gradient to the rank of
    the previous stage, when that rank is another one. W sends nothing. The receiver consumes it
    in its F of stage + 1, or its B of stage - 1."""
    out = []
    for kind, s, m in action.parts():
        nxt = s + 1 if kind == "F" else s - 1
        if kind != "W" and 0 <= nxt < schedule.stages and schedule.route[m][nxt] != action.rank:
            out.append((kind, s, m, schedule.route[m][nxt]))
    return tuple(out)


GENERATORS = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(kind: ScheduleKind, ranks: int, micro_batches: int) -> Schedule:
    if kind not in GENERATORS:
        raise ValueError(f"{kind=} is not one of {KINDS}")
    return GENERATORS[kind](ranks, micro_batches)


# ---------------------------------------------------------------------------------------------
# Validation and simulation
# ---------------------------------------------------------------------------------------------

Part = tuple[str, int, int]        # (kind in F/B/W, stage, micro_batch)


def _deps(part: Part, last_stage: int) -> list[Part]:
    """What one elementary computation waits for. The loss sits inside the last stage's F, so
    B of the last stage waits for its F; W waits for its (split) B on the same rank."""
    kind, s, m = part
    if kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if kind == "B":
        return [("F", s, m)] + ([("B", s + 1, m)] if s < last_stage else [])
    return [("B", s, m)]


def _check_routes(schedule: Schedule) -> None:
    S, M, P = schedule.stages, schedule.micro_batches, schedule.ranks
    if len(schedule.actions) != P or len(schedule.placement) != P:
        raise ValueError(f"expected {P} per-rank action lists and placements")
    if len(schedule.route) != M or any(len(row) != S for row in schedule.route):
        raise ValueError(f"route must be [{M} micro-batches][{S} stages]")
    for m, row in enumerate(schedule.route):
        for s, r in enumerate(row):
            if not 0 <= r < P or s not in schedule.placement[r]:
                raise ValueError(f"route sends stage {s} of micro-batch {m} to rank {r}, which does not hold it")


def _count_parts(schedule: Schedule) -> tuple[dict[Part, int], set[tuple[int, int]]]:
    """How often each (kind, stage, micro_batch) occurs, and which (stage, micro_batch) have a
    split B; checks each action sits on the rank the route names."""
    S, M = schedule.stages, schedule.micro_batches
    seen: dict[Part, int] = {}
    split_b: set[tuple[int, int]] = set()
    for r, actions in enumerate(schedule.actions):
        for a in actions:
            if a.rank != r or a.kind not in ("F", "B", "W", "FB"):
                raise ValueError(f"{a!r} is listed on rank {r} or has an unknown kind")
            for part in a.parts():
                _, s, m = part
                if not (0 <= s < S and 0 <= m < M):
                    raise ValueError(f"{a} names stage {s} / micro-batch {m} outside {S} stages, {M} micro-batches")
                if schedule.route[m][s] != r:
                    raise ValueError(f"{a} on rank {r}, but stage {s} of micro-batch {m} "
                                     f"runs on rank {schedule.route[m][s]}")
                seen[part] = seen.get(part, 0) + 1
            if a.kind == "B" and a.split:
                split_b.add((a.stage, a.micro_batch))
    return seen, split_b


def _check_structure(schedule: Schedule) -> None:
    _check_routes(schedule)
    seen, split_b = _count_parts(schedule)
    for s in range(schedule.stages):
        for m in range(schedule.micro_batches):
            for kind, want in (("F", 1), ("B", 1), ("W", int((s, m) in split_b))):
                got = seen.get((kind, s, m), 0)
                if got != want:
                    raise ValueError(f"{kind} of stage {s}, micro-batch {m} appears {got} times, expected {want}")


def _run(schedule: Schedule, cost, comm: float = 0.0) -> tuple[list[list[float]], list[list[float]]]:
    """Execute every rank's actions in order, each as soon as its rank is free and its inputs are
    done (plus `comm` when an input comes from another rank). Raises ValueError on deadlock.
    Returns start[r][i], end[r][i]."""
    last = schedule.stages - 1
    done: dict[Part, tuple[float, int]] = {}           # part -> (end time, rank)
    nxt = [0] * schedule.ranks
    clock = [0.0] * schedule.ranks
    start = [[0.0] * len(a) for a in schedule.actions]
    end = [[0.0] * len(a) for a in schedule.actions]
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(schedule.actions):
            while nxt[r] < len(actions):
                a = actions[nxt[r]]
                deps = [d for p in a.parts() for d in _deps(p, last)]
                if any(d not in done for d in deps):
                    break
                ready = max([clock[r]] + [t + (comm if dr != r else 0.0) for t, dr in (done[d] for d in deps)])
                start[r][nxt[r]], clock[r] = ready, ready + cost(a)
                end[r][nxt[r]] = clock[r]
                for p in a.parts():
                    done[p] = (clock[r], r)
                nxt[r] += 1
                progress = True
    stuck = [(r, str(acts[nxt[r]])) for r, acts in enumerate(schedule.actions) if nxt[r] < len(acts)]
    if stuck:
        raise ValueError(f"deadlock: ranks wait forever at {stuck}")
    return start, end


def validate(schedule: Schedule) -> None:
    """Raise ValueError unless the schedule is complete and runnable.

    Checks: every action runs on a rank that holds its stage, along the route; every micro-batch
    passes every stage forward and backward exactly once, and W exactly once after each split B
    (none otherwise); and executing the per-rank orders, each action only once its inputs exist
    (F of stage s after F of s-1, B of s after F of s and B of s+1, the loss inside the last
    F, W after its B), reaches the end: no deadlock and nothing out of order.
    """
    _check_structure(schedule)
    _run(schedule, lambda a: 1.0)


# ---------------------------------------------------------------------------------------------
# Cost model, bubble, memory
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Simulated execution: start[r][i], end[r][i] of schedule.actions[r][i]; busy[r] the time
    rank r computes; idle[r] = makespan - busy[r]; bubble = max(idle)."""

    start: tuple[tuple[float, ...], ...]
    end: tuple[tuple[float, ...], ...]
    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]
    bubble: float


def action_cost(a: Action, F: float, B: float, W: float, FB: float) -> float:
    """F: forward chunk; B: full backward chunk (a split B costs B - W, its W costs W);
    FB: an overlapped forward + full backward pair."""
    if a.kind == "F":
        return F
    if a.kind == "W":
        return W
    if a.kind == "FB":
        return FB
    return B - W if a.split else B


def simulate(schedule: Schedule, F: float, B: float, W: float, FB: float | None = None,
             comm: float = 0.0) -> Timeline:
    """Run the schedule under the DualPipe README's cost model and measure its bubble.

    Costs: F a forward chunk, B a *full* backward chunk, W its weight-gradient part (so a split B
    costs B - W and its W costs W), FB = F&B an overlapped forward+backward pair (default F + B,
    no overlap gain). Every action starts when its rank is free and its inputs are done; an input
    from another rank arrives `comm` later (sends are asynchronous and cost no compute; nothing
    waits for a receiver to be ready, so a gap may sit at a different place than in the README's
    hand-laid figure, while each rank's total idle agrees with it).

    Bubble: the largest per-rank idle time, max_r (makespan - busy_r), where makespan runs from
    the first start to the last end over all ranks and busy_r is the sum of rank r's action
    costs. For 1F1B and ZB1P every rank idles equally; in DualPipe(V) with F&B < F + B the ranks
    that overlap most idle most, and those set the bubble. With comm = 0 this equals the README
    table (`bubble_formula`) whenever the table's own assumptions hold (see `formula_holds`).
    """
    fb = F + B if FB is None else FB
    cost = lambda a: action_cost(a, F, B, W, fb)
    start, end = _run(schedule, cost, comm)
    makespan = max((e[-1] for e in end if e), default=0.0)
    busy = tuple(sum(cost(a) for a in acts) for acts in schedule.actions)
    idle = tuple(makespan - b for b in busy)
    return Timeline(tuple(map(tuple, start)), tuple(map(tuple, end)), makespan, busy, idle, max(idle))


def bubble_formula(kind: ScheduleKind, ranks: int, F: float, B: float, W: float,
                   FB: float | None = None) -> float:
    """The bubble column of the DualPipe README table. PP is the number of stages: `ranks` for
    1F1B, ZB1P and DualPipe, 2 * ranks for DualPipeV (PP/2 devices)."""
    fb = F + B if FB is None else FB
    if kind == "1f1b":
        return (ranks - 1) * (F + B)
    if kind == "zb1p":
        return (ranks - 1) * (F + B - 2 * W)
    if kind in ("dualpipe", "dualpipev"):
        pp = ranks if kind == "dualpipe" else 2 * ranks
        return (pp // 2 - 1) * (fb + B - 3 * W)
    raise ValueError(f"{kind=} is not one of {KINDS}")


def formula_holds(kind: ScheduleKind, F: float, B: float, W: float) -> bool:
    """Where the table's bubble is exact for these schedules (comm = 0, M large enough):
    1F1B always; ZB1P when W <= min(F, B - W) (otherwise the first rank's warm-up wait or the
    last rank's start alone exceed it); DualPipe(V) when F == B - W and W <= F, the table's
    'forward chunk = input-backward chunk' picture, for any F&B between max(F, B) and F + B.
    Measured more widely: with F >= B - W >= W the bubble is (PP/2 - 1)(F&B + F - 2W), which is
    the table's value exactly when F == B - W; with F < B - W it is not linear in the costs."""
    if kind == "1f1b":
        return True
    if kind == "zb1p":
        return W <= min(F, B - W)
    return F == B - W and W <= F


@dataclasses.dataclass(frozen=True)
class Memory:
    """params[r]: stages whose parameters rank r holds (1x or 2x of a 1/PP model slice);
    activations[r]: peak micro-batch activations rank r holds at once (one unit = one stage's
    activations for one micro-batch)."""

    params: tuple[int, ...]
    activations: tuple[int, ...]

    @property
    def peak_params(self) -> int:
        return max(self.params)

    @property
    def peak_activations(self) -> int:
        return max(self.activations)


def _peak_live(actions: tuple[Action, ...]) -> int:
    """An activation is live from the start of its F to the end of its backward: the B, or the
    W when the B is split. An F&B pair holds both its micro-batches while it runs."""
    live = peak = 0
    for a in actions:
        if a.kind in ("F", "FB"):
            live += 1
            peak = max(peak, live)
        if a.kind == "FB" or a.kind == "W" or (a.kind == "B" and not a.split):
            live -= 1
    return peak


def memory_table(kind: ScheduleKind, ranks: int, micro_batches: int) -> Memory:
    """Parameters and peak live activations per device, counted from the generated schedule."""
    schedule = make_schedule(kind, ranks, micro_batches)
    return Memory(tuple(len(p) for p in schedule.placement),
                  tuple(_peak_live(acts) for acts in schedule.actions))


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

_COLOURS = {  # (kind, rank's second stage?) -> face colour; the second chunk is the darker shade
    ("F", False): "#f6c89f", ("F", True): "#e58a3c",
    ("B", False): "#a8d8a8", ("B", True): "#4e9a4e",
    ("W", False): "#a9c6ea", ("W", True): "#4f7fbf",
}


def _label(schedule: Schedule, m: int) -> str:
    """Micro-batch number as the README draws it: DualPipe numbers each direction from 0."""
    half = schedule.micro_batches // 2
    return str(m - half if schedule.kind == "dualpipe" and m >= half else m)


def plot_timeline(schedule: Schedule, timeline: Timeline, path: str, title: str | None = None) -> None:
    """Draw one row per rank, one box per action at its simulated time: F orange, B green,
    W blue (split B's are hatched), the rank's second stage in the darker shade, the micro-batch
    number inside. An F&B pair is one box with a thick black border, F half left, B half right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(max(8.0, timeline.makespan * 0.18), 0.45 * schedule.ranks + 1.2))
    for r, acts in enumerate(schedule.actions):
        second = schedule.placement[r][-1] if len(schedule.placement[r]) > 1 else None
        for a, t0, t1 in zip(acts, timeline.start[r], timeline.end[r]):
            halves = [(k, s, m) for k, s, m in a.parts()]
            width = (t1 - t0) / len(halves)
            for j, (k, s, m) in enumerate(halves):
                x = t0 + j * width
                ax.add_patch(Rectangle((x, r - 0.4), width, 0.8, facecolor=_COLOURS[(k, s == second)],
                                       edgecolor="black", linewidth=0.5, hatch="//" if a.split else None))
                ax.text(x + width / 2, r, _label(schedule, m), ha="center", va="center", fontsize=7)
            if a.kind == "FB":
                ax.add_patch(Rectangle((t0, r - 0.4), t1 - t0, 0.8, fill=False, edgecolor="black", linewidth=2))
    ax.set_xlim(0, timeline.makespan)
    ax.set_ylim(schedule.ranks - 0.5, -0.5)
    ax.set_yticks(range(schedule.ranks), [f"rank {r}" for r in range(schedule.ranks)])
    ax.set_xlabel("time")
    ax.set_title(title or f"{schedule.kind}: {schedule.ranks} ranks, {schedule.stages} stages, "
                          f"{schedule.micro_batches} micro-batches, bubble {timeline.bubble:g}")
    handles = [Rectangle((0, 0), 1, 1, facecolor=_COLOURS[(k, False)], edgecolor="black") for k in "FBW"]
    ax.legend(handles, ["F", "B", "W"], loc="upper right", bbox_to_anchor=(1.0, 1.18), ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
