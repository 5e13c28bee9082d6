"""EPLB: DeepSeek's expert-parallel load balancer (redundant experts), on the host, in numpy.

Given per-layer logical expert loads, choose how many replicas each expert gets and where the
physical experts live:
- hierarchical (when expert groups divide evenly over nodes): pack whole groups onto nodes,
  replicate the heaviest experts inside each node, then pack the physical experts onto the
  node's GPUs;
- global (otherwise): replicate over all experts, pack onto all GPUs.
Packing is greedy and balanced (heaviest item first into the lightest pack that has room); each
extra replica goes to argmax(load / replica count). Ties break toward the lower index, so the
result is deterministic.

Letters: L layers, E logical experts, P physical experts (num_replicas), G GPUs, N nodes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path

import numpy as np


def _balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items per row into num_packs packs of n/num_packs items, balancing the weight sums.

    Returns pack[L, n] (which pack each item goes to) and rank[L, n] (its slot in that pack).
    """
    layers, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        return np.tile(np.arange(items), (layers, 1)), np.zeros((layers, items), np.int64)
    pack = np.empty((layers, items), np.int64)
    rank = np.empty((layers, items), np.int64)
    for layer in range(layers):
        totals = np.zeros(num_packs)
        filled = np.zeros(num_packs, np.int64)
        for item in np.argsort(-weight[layer], kind="stable"):      # heaviest first
            open_packs = np.flatnonzero(filled < per_pack)
            target = open_packs[np.argmin(totals[open_packs])]       # lightest open pack, lowest index
            pack[layer, item], rank[layer, item] = target, filled[target]
            totals[target] += weight[layer, item]
            filled[target] += 1
    return pack, rank


def _replicate(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each of the num_physical - n extra slots to the item with the largest load per replica.

    Returns phy2log[L, num_physical], replica rank[L, num_physical], count[L, n].
    """
    layers, n = weight.shape
    phy2log = np.tile(np.arange(num_physical), (layers, 1))
    rank = np.zeros((layers, num_physical), np.int64)
    count = np.ones((layers, n), np.int64)
    rows = np.arange(layers)
    for slot in range(n, num_physical):
        hottest = np.argmax(weight / count, axis=-1)
        phy2log[:, slot] = hottest
        rank[:, slot] = count[rows, hottest]
        count[rows, hottest] += 1
    return phy2log, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int):
    layers, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    # 1. whole groups onto nodes
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    gpack, grank = _balanced_packing(group_load, num_nodes)
    # logical -> "node-major" logical order (mlog): node's groups are contiguous
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[..., None] + np.arange(group_size)).reshape(layers, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicate inside each node
    mlog_load = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, E // num_nodes)
    phy2mlog, phy_rank, mlog_count = _replicate(mlog_load, num_physical // num_nodes)
    # 3. physical experts onto the node's GPUs
    phy_load = np.take_along_axis(mlog_load / mlog_count, phy2mlog, axis=-1)
    pack, rank = _balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    node_offset = np.arange(0, E, E // num_nodes)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, axis=-1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlog_count.reshape(layers, -1), log2mlog, axis=-1)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's EPLB. weight[L, E] -> phy2log[L, P], log2phy[L, E, max_count] (-1 padded), logcnt[L, E]."""
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(f"weight must be [layers, logical_experts], got shape {weight.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weight must hold finite, non-negative loads")
    layers, E = weight.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name}={value} must be a positive integer")
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} is below the {E} logical experts; each needs a replica")
    if E % num_groups:
        raise ValueError(f"{E} logical experts are not divisible into num_groups={num_groups}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}")
    hierarchical = num_groups % num_nodes == 0 and E % num_nodes == 0
    if hierarchical:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_count = int(logcnt.max())
    log2phy = np.full((layers, E * max_count), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * max_count + rank, np.broadcast_to(np.arange(num_replicas), phy2log.shape),
                      axis=1)
    return phy2log, log2phy.reshape(layers, E, max_count), logcnt


# ---- load statistics, placements, and applying them ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every physical expert slot lives: slot p (GPU p // (P/G)) holds logical expert phy2log[l, p]."""

    phy2log: np.ndarray      # [L, P]
    log2phy: np.ndarray      # [L, E, max_count], -1 padded
    logcnt: np.ndarray       # [L, E]
    num_gpus: int

    @classmethod
    def identity(cls, num_layers: int, num_experts: int, num_gpus: int) -> Placement:
        """No redundancy: expert e on GPU e // (E/G)."""
        if num_experts % num_gpus:
            raise ValueError(f"{num_experts} experts do not divide over {num_gpus} GPUs")
        phy2log = np.tile(np.arange(num_experts), (num_layers, 1))
        return cls(phy2log, phy2log[:, :, None].copy(), np.ones((num_layers, num_experts), np.int64), num_gpus)

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]


class ExpertLoad:
    """Per-expert token counts accumulated over a moving window of steps (training) or batches (serving)."""

    def __init__(self, num_layers: int, num_experts: int, window: int = 100):
        if window <= 0:
            raise ValueError(f"window={window} must be positive")
        self.shape = (num_layers, num_experts)
        self._history: deque[np.ndarray] = deque(maxlen=window)

    def update(self, counts) -> None:
        counts = np.asarray(counts, np.float64)
        if counts.shape != self.shape:
            raise ValueError(f"expert counts of shape {counts.shape}; expected [layers, experts] = {self.shape}")
        self._history.append(counts)

    def load(self) -> np.ndarray:
        return np.sum(self._history, axis=0) if self._history else np.zeros(self.shape)

    def __len__(self) -> int:
        return len(self._history)


def rebalance(load: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> Placement:
    phy2log, log2phy, logcnt = rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus)
    return Placement(phy2log, log2phy, logcnt, num_gpus)


def slot_permutation(old: Placement, new: Placement) -> np.ndarray:
    """perm[L, P_new]: the old physical slot whose weights the new slot takes (any replica of its expert)."""
    if old.phy2log.shape[0] != new.phy2log.shape[0]:
        raise ValueError("placements cover different numbers of layers")
    first_old_replica = old.log2phy[:, :, 0]                                          # [L, E]
    return np.take_along_axis(first_old_replica, new.phy2log, axis=1)


def permute_slots(tree, perm: np.ndarray, axis: int = 1):
    """Apply a slot permutation to expert weights and their optimizer state ([L, P, ...] leaves)."""
    import jax
    import jax.numpy as jnp

    index = jnp.asarray(perm)

    def move(x):
        idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=axis)

    return jax.tree.map(move, tree)


# ---- the report -----------------------------------------------------------------------------------

def gpu_loads(load: np.ndarray, placement: Placement) -> np.ndarray:
    """[L, G]: tokens each GPU serves when an expert's load is split evenly over its replicas."""
    per_replica = np.asarray(load, np.float64) / placement.logcnt
    slot_load = np.take_along_axis(per_replica, placement.phy2log, axis=1)
    return slot_load.reshape(slot_load.shape[0], placement.num_gpus, -1).sum(-1)


def imbalance(gpu_load: np.ndarray) -> np.ndarray:
    """max/mean GPU load per layer (1.0 is perfect balance)."""
    mean = gpu_load.mean(-1)
    return np.where(mean > 0, gpu_load.max(-1) / np.where(mean > 0, mean, 1), 1.0)


def report(load: np.ndarray, placement: Placement) -> dict:
    before = gpu_loads(load, Placement.identity(load.shape[0], load.shape[1], placement.num_gpus))
    after = gpu_loads(load, placement)
    return dict(imbalance_before=imbalance(before), imbalance_after=imbalance(after),
                mean_before=float(imbalance(before).mean()), mean_after=float(imbalance(after).mean()),
                gpu_load_before=before, gpu_load_after=after)


def format_report(rep: dict) -> str:
    lines = ["layer  max/mean before  max/mean after"]
    for i, (b, a) in enumerate(zip(rep["imbalance_before"], rep["imbalance_after"])):
        lines.append(f"{i:5d}  {b:15.3f}  {a:14.3f}")
    lines.append(f"mean   {rep['mean_before']:15.3f}  {rep['mean_after']:14.3f}")
    return "\n".join(lines)


def save_heatmap(load: np.ndarray, placement: Placement, path: str | Path) -> Path:
    """PNG: expert load per layer, and GPU load per layer before and after the placement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = report(load, placement)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = [(load, "logical expert load", "expert"),
              (rep["gpu_load_before"], f"GPU load, no replicas (max/mean {rep['mean_before']:.2f})", "GPU"),
              (rep["gpu_load_after"], f"GPU load, EPLB (max/mean {rep['mean_after']:.2f})", "GPU")]
    for ax, (data, title, xlabel) in zip(axes, panels):
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=title, xlabel=xlabel, ylabel="layer")
        fig.colorbar(image, ax=ax)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
