"""Pipeline schedules: validity, the measured bubble against the DualPipe README table, memory,
broken schedules rejected, timeline pictures."""

import dataclasses

import pytest

from sharding.schedules import (KINDS, Action, Schedule, bubble_formula, dualpipe, dualpipev,
                                formula_holds, make_schedule, memory_table, one_f_one_b,
                                plot_timeline, sends, simulate, validate, zb1p)

# (kind, ranks): DualPipeV runs PP stages on PP/2 devices, so its ranks 1, 2, 4 are PP 2, 4, 8,
# and 8 devices (PP 16) is covered too.
CASES = [(k, p) for k in ("1f1b", "zb1p", "dualpipe") for p in (2, 4, 8)] + [("dualpipev", p) for p in (1, 2, 4, 8)]


def micro_batch_counts(kind, ranks):
    low = 2 * ranks if kind in ("dualpipe", "dualpipev") else ranks
    extra = (low + 2, 3 * low) if kind == "dualpipe" else (low + 1, low + 2, 3 * low)
    return (low,) + extra


def stages(kind, ranks):
    return 2 * ranks if kind == "dualpipev" else ranks


# (F, B, W, F&B) with B the full backward, W its weight part. All satisfy the table's
# assumptions for every schedule (W <= min(F, B - W), F == B - W): see formula_holds.
COSTS = [
    (1.0, 2.0, 1.0, 3.0),     # F = B_input = W, no overlap gain (F&B = F + B)
    (1.0, 2.0, 1.0, 2.5),     # partial overlap
    (1.0, 2.0, 1.0, 2.0),     # perfect overlap (F&B = max(F, B))
    (2.0, 3.0, 1.0, 4.0),     # W smaller than F
    (1.0, 1.0, 0.0, 1.5),     # no weight-gradient work to defer
]
# Costs where only the single-direction schedules' assumptions hold (F != B - W).
COSTS_1F1B_ZB = [(1.0, 3.0, 1.0, None), (3.0, 4.0, 2.0, None)]


@pytest.mark.parametrize("kind,ranks", CASES)
def test_schedules_validate(kind, ranks):
    for m in micro_batch_counts(kind, ranks):
        schedule = make_schedule(kind, ranks, m)
        validate(schedule)
        assert schedule.stages == stages(kind, ranks)
        per_rank_f = [sum(a.kind in ("F", "FB") for a in acts) for acts in schedule.actions]
        per_stage = schedule.stages // ranks
        assert per_rank_f == [per_stage * m] * ranks, "every rank forwards each micro-batch through its stages"


@pytest.mark.parametrize("kind,ranks", CASES)
def test_sends_pair_with_consumers(kind, ranks):
    """Every cross-rank send has exactly one consumer on the destination rank, and every input
    that crosses ranks was sent: what the executor will turn into ppermutes."""
    schedule = make_schedule(kind, ranks, micro_batch_counts(kind, ranks)[0])
    sent = [(k, s, m, dst) for acts in schedule.actions for a in acts for k, s, m, dst in sends(schedule, a)]
    assert len(sent) == len(set(sent))
    needed = set()
    for r, acts in enumerate(schedule.actions):
        for a in acts:
            for k, s, m in a.parts():
                src = {"F": s - 1, "B": s + 1}.get(k)
                if src is not None and 0 <= src < schedule.stages and schedule.route[m][src] != r:
                    needed.add((k, src, m, r))
    assert set(sent) == needed
    if kind == "dualpipev":   # the V turns on rank N-1 without a hop: 2N-2 hops each way
        assert len(sent) == 2 * schedule.micro_batches * (2 * ranks - 2)
    else:
        assert len(sent) == 2 * schedule.micro_batches * (ranks - 1)


@pytest.mark.parametrize("kind,ranks", CASES)
def test_bubble_equals_table(kind, ranks, report):
    for cost in COSTS + (COSTS_1F1B_ZB if kind in ("1f1b", "zb1p") else []):
        F, B, W, FB = cost
        assert formula_holds(kind, F, B, W)
        want = bubble_formula(kind, ranks, F, B, W, FB)
        for m in micro_batch_counts(kind, ranks):
            got = simulate(make_schedule(kind, ranks, m), F, B, W, FB)
            assert got.bubble == pytest.approx(want, abs=1e-12), f"{kind} {ranks=} {m=} {cost=}: idle {got.idle}"
            if kind in ("1f1b", "zb1p"):
                assert got.idle == pytest.approx([want] * ranks), "single-direction schedules idle equally"
        if cost == COSTS[1]:
            report(f"bubble {kind:9s} ranks={ranks} PP={stages(kind, ranks):2d} (F,B,W,F&B)={cost}: "
                   f"measured {got.bubble:g} == table {want:g}; per-rank idle {[round(i, 3) for i in got.idle]}")


def test_bubble_outside_the_tables_assumptions():
    """Where the table's assumptions fail the formula is not reachable, for reasons one can
    name; these pin the limits stated in formula_holds."""
    P = 4
    # ZB1P, W > B - W: the last rank alone waits (P-1)F before its first forward.
    F, B, W = 1.0, 3.0, 2.0
    got = simulate(zb1p(P, 8), F, B, W).bubble
    assert got >= (P - 1) * F > bubble_formula("zb1p", P, F, B, W)
    # ZB1P, W > F: holding at most P micro-batches, rank 0 waits (P-1)(B-W) for its first B.
    F, B, W = 1.0, 4.0, 2.0
    got = simulate(zb1p(P, 8), F, B, W).bubble
    assert got >= (P - 1) * (B - W) > bubble_formula("zb1p", P, F, B, W)
    # DualPipe with F != B - W: measured differs from the table, in either direction.
    assert simulate(dualpipe(P, 8), 1.0, 3.0, 1.0, 4.0).bubble < bubble_formula("dualpipe", P, 1.0, 3.0, 1.0, 4.0)
    assert simulate(dualpipe(P, 8), 2.0, 2.0, 1.0, 4.0).bubble > bubble_formula("dualpipe", P, 2.0, 2.0, 1.0, 4.0)


@pytest.mark.parametrize("kind,ranks", CASES)
def test_timeline_is_as_soon_as_possible(kind, ranks):
    """Independent check of the simulator: per-rank order kept, no overlap on a rank, and every
    action starts exactly when its rank is free and its inputs (plus comm if remote) are done."""
    comm = 0.25
    F, B, W, FB = 1.0, 2.0, 1.0, 2.5
    schedule = make_schedule(kind, ranks, micro_batch_counts(kind, ranks)[1])
    t = simulate(schedule, F, B, W, FB, comm=comm)
    done = {}
    for r, acts in enumerate(schedule.actions):
        for i, a in enumerate(acts):
            for part in a.parts():
                done[part] = (t.end[r][i], r)
    last = schedule.stages - 1
    for r, acts in enumerate(schedule.actions):
        for i, a in enumerate(acts):
            inputs = []
            for k, s, m in a.parts():
                if k == "F" and s > 0:
                    inputs.append(("F", s - 1, m))
                if k == "B":
                    inputs += [("F", s, m)] + ([("B", s + 1, m)] if s < last else [])
                if k == "W":
                    inputs.append(("B", s, m))
            arrive = [done[p][0] + (comm if done[p][1] != r else 0.0) for p in inputs]
            free = t.end[r][i - 1] if i else 0.0
            assert t.start[r][i] == pytest.approx(max([free] + arrive)), f"{a} on rank {r}"
    zero = simulate(schedule, F, B, W, FB)
    if ranks > 1:
        assert t.makespan > zero.makespan
    else:                                 # one rank: nothing crosses a link
        assert t.makespan == zero.makespan


@pytest.mark.parametrize("kind,ranks", CASES)
def test_memory_matches_table(kind, ranks, report):
    pp = stages(kind, ranks)
    want_params, want_act = {"1f1b": (1, pp), "zb1p": (1, pp), "dualpipe": (2, pp + 1), "dualpipev": (2, pp + 1)}[kind]
    for m in micro_batch_counts(kind, ranks):
        mem = memory_table(kind, ranks, m)
        assert mem.params == (want_params,) * ranks
        assert mem.peak_activations == want_act, f"{kind} {ranks=} {m=}: {mem.activations}"
    report(f"memory {kind:9s} ranks={ranks} PP={pp:2d}: params/device {mem.peak_params}x, "
           f"peak activations per rank {mem.activations} (table {want_act})")


def _replace(schedule, rank, actions):
    rows = list(schedule.actions)
    rows[rank] = tuple(actions)
    return dataclasses.replace(schedule, actions=tuple(rows))


@pytest.mark.parametrize("kind", KINDS)
def test_broken_schedules_fail(kind):
    schedule = make_schedule(kind, 4, 8 if kind != "1f1b" else 4)
    validate(schedule)
    acts = list(schedule.actions[0])
    # Swap a micro-batch's first backward with its forward on the same rank.
    i_b = next(i for i, a in enumerate(acts) if a.kind in ("B", "FB"))
    _, b_stage, b_mb = acts[i_b].parts()[-1]
    i_f = next(i for i, a in enumerate(acts) if ("F", b_stage, b_mb) in a.parts())
    swapped = list(acts)
    swapped[i_b], swapped[i_f] = swapped[i_f], swapped[i_b]
    with pytest.raises(ValueError, match="deadlock"):
        validate(_replace(schedule, 0, swapped))
    # Drop one action.
    with pytest.raises(ValueError, match="appears 0 times"):
        validate(_replace(schedule, 0, acts[:3] + acts[4:]))
    # Duplicate one action.
    with pytest.raises(ValueError, match="appears 2 times"):
        validate(_replace(schedule, 0, acts + acts[:1]))
    # An action on a rank that does not run that stage for that micro-batch.
    a = acts[0]
    with pytest.raises(ValueError, match="runs on rank"):
        validate(_replace(schedule, 0, [dataclasses.replace(a, stage=schedule.placement[1][0])] + acts[1:]))
    # Move a W before its split B.
    if kind != "1f1b":
        i_w = next(i for i, a in enumerate(acts) if a.kind == "W")
        i_sb = next(i for i, a in enumerate(acts) if a.kind == "B" and a.split and a.stage == acts[i_w].stage
                    and a.micro_batch == acts[i_w].micro_batch)
        moved = acts[:i_sb] + [acts[i_w]] + [x for j, x in enumerate(acts[i_sb:], i_sb) if j != i_w]
        with pytest.raises(ValueError, match="deadlock"):
            validate(_replace(schedule, 0, moved))


def test_cross_rank_deadlock_found():
    """Rank 0 of 1F1B asks for micro-batch 0's backward before sending micro-batch 1 forward;
    rank 1 needs micro-batch 1 before it backwards micro-batch 0: a cycle across ranks."""
    schedule = one_f_one_b(4, 4)
    acts = list(schedule.actions[0])
    early = [acts[0], Action("B", 0, 0, 0)] + [a for a in acts[1:] if a != Action("B", 0, 0, 0)]
    with pytest.raises(ValueError, match="deadlock"):
        validate(_replace(schedule, 0, early))


def test_impossible_arguments():
    with pytest.raises(ValueError, match="even number of ranks"):
        dualpipe(3, 12)
    with pytest.raises(ValueError, match="even number of micro-batches"):
        dualpipe(4, 9)
    with pytest.raises(ValueError, match=r">= 2 \* ranks"):
        dualpipe(4, 6)
    with pytest.raises(ValueError, match=r">= 2 \* ranks"):
        dualpipev(4, 7)
    with pytest.raises(ValueError, match="micro_batches=3 >= ranks=4"):
        one_f_one_b(4, 3)
    with pytest.raises(ValueError, match="micro_batches=3 >= ranks=4"):
        zb1p(4, 3)
    with pytest.raises(ValueError, match="ranks=0"):
        one_f_one_b(0, 4)
    with pytest.raises(ValueError, match="is not one of"):
        make_schedule("gpipe", 4, 8)


def test_schedule_is_plain_data():
    schedule = dualpipe(4, 8)
    assert isinstance(schedule, Schedule) and isinstance(schedule.actions[0], tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.actions[0][0].stage = 3
    assert schedule.placement == ((0, 3), (1, 2), (2, 1), (3, 0))
    assert dualpipev(4, 8).placement == ((0, 7), (1, 6), (2, 5), (3, 4))
    assert str(schedule.actions[0][0]) == "F0.0"


@pytest.mark.parametrize("kind,ranks,m", [("dualpipe", 8, 20), ("dualpipev", 4, 10), ("zb1p", 4, 8), ("1f1b", 4, 8)])
def test_plot_timeline_writes_png(kind, ranks, m, tmp_path):
    schedule = make_schedule(kind, ranks, m)
    path = tmp_path / f"{kind}.png"
    plot_timeline(schedule, simulate(schedule, 1.0, 2.0, 1.0, 2.5), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_dualpipe_matches_readme_figure():
    """Rank orders read off the DualPipe README figure (8 ranks, 20 micro-batches); the reverse
    direction's micro-batches are 10..19 here, and on rank 0 they run stage 7."""
    schedule = dualpipe(8, 20)
    rank0 = ([f"F0.{m}" for m in range(7)] + ["F7.10", "Bi7.10", "W7.10", "F7.11", "Bi7.11", "W7.11",
                                               "F7.12", "Bi7.12", "W7.12", "F7.13"]
             + ["F0.7&B7.13", "F7.14&B0.0", "F0.8&B7.14", "F7.15&B0.1", "F0.9&B7.15", "F7.16&B0.2"]
             + ["B7.16", "F7.17&B0.3", "B7.17", "F7.18&B0.4", "B7.18", "F7.19&B0.5", "B7.19"]
             + ["Bi0.6", "W0.6", "Bi0.7", "W0.7", "Bi0.8", "W0.8", "Bi0.9", "W0.9"])
    assert [str(a) for a in schedule.actions[0]] == rank0
    rank3_start = ["F3.0", "F4.10", "F3.1", "F4.11", "F3.2", "F4.12", "F3.3", "F4.13",
                   "F3.4", "B4.10", "F4.14&B3.0", "F3.5&B4.11"]
    assert [str(a) for a in schedule.actions[3][:12]] == rank3_start
    # Its idle cells: rank 0 shows 3 + 1 + 1 + 1 = 6 empty cells with F = 1, B = 2, W = 1, F&B = 3.
    assert simulate(schedule, 1.0, 2.0, 1.0, 3.0).idle[0] == 6.0


def test_dualpipev_matches_readme_figure():
    """Rank orders read off the DualPipeV README figure (4 ranks, 8 stages, 10 micro-batches)."""
    schedule = dualpipev(4, 10)
    rank0 = ([f"F0.{m}" for m in range(7)] + ["F7.0", "Bi7.0", "W7.0", "F7.1", "Bi7.1", "W7.1",
                                               "F7.2", "Bi7.2", "W7.2", "F7.3"]
             + ["F0.7&B7.3", "F7.4&B0.0", "F0.8&B7.4", "F7.5&B0.1", "F0.9&B7.5", "F7.6&B0.2"]
             + ["B7.6", "F7.7&B0.3", "B7.7", "F7.8&B0.4", "B7.8", "F7.9&B0.5", "B7.9"]
             + ["Bi0.6", "W0.6", "Bi0.7", "W0.7", "Bi0.8", "W0.8", "Bi0.9", "W0.9"])
    assert [str(a) for a in schedule.actions[0]] == rank0
    rank1_start = ["F1.0", "F1.1", "F1.2", "F1.3", "F1.4", "F6.0", "F1.5", "F6.1", "Bi6.0", "W6.0",
                   "F6.2", "Bi6.1", "W6.1", "F6.3", "F1.6&B6.2", "F6.4&B1.0"]
    assert [str(a) for a in schedule.actions[1][:16]] == rank1_start
    rank3_end = ["B4.6", "B3.6", "B4.7", "B3.7", "Bi4.8", "Bi3.8", "Bi4.9", "Bi3.9", "W4.8", "W3.8", "W4.9", "W3.9"]
    assert [str(a) for a in schedule.actions[3][-12:]] == rank3_end
    assert simulate(schedule, 1.0, 2.0, 1.0, 3.0).idle[0] == 6.0


@pytest.mark.parametrize("kind,ranks", [("dualpipe", 4), ("dualpipe", 8), ("dualpipev", 2), ("dualpipev", 4)])
def test_dualpipe_bubble_with_longer_forward(kind, ranks):
    """Beyond the table: with F >= B - W >= W the measured bubble is (PP/2-1)(F&B + F - 2W); the
    table's F&B + B - 3W is its F == B - W case."""
    pp = stages(kind, ranks)
    for F, B, W, FB in [(2.0, 2.0, 1.0, 3.0), (3.0, 2.5, 0.5, 4.0), (2.0, 3.0, 1.0, 5.0)]:
        got = simulate(make_schedule(kind, ranks, 2 * ranks + 2), F, B, W, FB).bubble
        assert got == pytest.approx((pp // 2 - 1) * (FB + F - 2 * W))
        if F != B - W:
            assert got != pytest.approx(bubble_formula(kind, ranks, F, B, W, FB))
