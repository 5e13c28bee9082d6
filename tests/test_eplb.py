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
