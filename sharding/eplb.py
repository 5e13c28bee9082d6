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

In training (`Balancer`, used by train.py's --eplb-every): the model's per-expert token counts
(ModelOutput.expert_counts) accumulate over a moving window of steps; every so often a rebalance
gives a new placement, and `apply_placement` moves the MoE layers' expert weights and their
optimizer state (Adam moments) into the new physical slots. The layers then hold [P, ...] slots
and route each token to a replica (model.moe); outputs are unchanged, only where experts run moves.
In serving (serving.Engine): every engine step's real tokens per expert go into an `ExpertLoad`
window, and `Engine.rebalance` applies a new placement to the served parameters (serve.py's
--eplb-report writes the report and heatmap).

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

    def layers(self, n: int) -> Placement:
        """The placement of the first n layers (e.g. the MoE layers without the MTP blocks)."""
        return Placement(self.phy2log[:n], self.log2phy[:n], self.logcnt[:n], self.num_gpus)


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


def report(load: np.ndarray, placement: Placement, previous: Placement | None = None) -> dict:
    """Per-layer GPU imbalance under `previous` (default: no replicas, expert e on GPU e // (E/G)) and `placement`."""
    if previous is None:
        previous = Placement.identity(load.shape[0], load.shape[1], placement.num_gpus)
    before = gpu_loads(load, previous)
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


def save_heatmap(load: np.ndarray, placement: Placement, path: str | Path,
                 previous: Placement | None = None) -> Path:
    """PNG: expert load per layer, and GPU load per layer before (`previous`, default no replicas)
    and after the placement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = report(load, placement, previous)
    before = "no replicas" if previous is None else "previous placement"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = [(load, "logical expert load", "expert"),
              (rep["gpu_load_before"], f"GPU load, {before} (max/mean {rep['mean_before']:.2f})", "GPU"),
              (rep["gpu_load_after"], f"GPU load, EPLB (max/mean {rep['mean_after']:.2f})", "GPU")]
    for ax, (data, title, xlabel) in zip(axes, panels):
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set(title=title, xlabel=xlabel, ylabel="layer")
        fig.colorbar(image, ax=ax)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- applying a placement to a model and its optimizer ---------------------------------------------

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
_SLOT_FIELDS = ("phy2log", "log2phy", "logcnt")


def _moe_groups(m) -> list[tuple[tuple, object, slice]]:
    """(path, MoE layer or stack, its rows of ModelOutput.expert_counts) for a Transformer or one MoE layer."""
    from model.moe import MoE
    if isinstance(m, MoE):
        return [((), m, slice(0, m.w_gate.shape[0] if m.w_gate.ndim == 4 else 1))]
    groups, row = [], 0
    if m.moe_layers is not None:
        row = m.cfg.num_moe_layers
        groups.append((("moe_layers", "ffn"), m.moe_layers.ffn, slice(0, row)))
    for k, module in enumerate(m.mtp):
        if isinstance(module.block.ffn, MoE):
            groups.append((("mtp", k, "block", "ffn"), module.block.ffn, slice(row, row + 1)))
            row += 1
    return groups


def placement_of(m, num_gpus: int) -> Placement:
    """The placement a model (or MoE layer) holds now, rows in expert_counts order; identity without slots."""
    from model.moe import has_slots
    parts = []
    for _, layer, rows in _moe_groups(m):
        n, E = rows.stop - rows.start, layer.router.shape[-1]
        if has_slots(layer):
            parts.append([np.asarray(getattr(layer, f)[...]).reshape((n,) + s) for f, s in
                          (("phy2log", (-1,)), ("log2phy", (E, -1)), ("logcnt", (E,)))])
        else:
            identity = Placement.identity(n, E, 1)
            parts.append([identity.phy2log, identity.log2phy, identity.logcnt])
    if not parts:
        raise ValueError("the model has no MoE layers to place")
    phy2log, log2phy, logcnt = (np.concatenate(a) for a in zip(*parts))
    return Placement(phy2log.astype(np.int64), log2phy.astype(np.int64), logcnt.astype(np.int64), num_gpus)


def _take_slots(x, perm: np.ndarray, stacked: bool):
    """x [n, P_old, ...] (stacked) or [P_old, ...] -> the slots perm [n, P_new] picks."""
    moved = permute_slots(x if stacked else x[None], perm)
    return moved if stacked else moved[0]


def _param_of(opt_path: tuple, param_paths: set) -> tuple | None:
    """The parameter an optimizer-state leaf belongs to: the longest suffix of its path naming one."""
    return next((opt_path[i:] for i in range(len(opt_path)) if opt_path[i:] in param_paths), None)


def apply_placement(m, optimizer, new: Placement | None, mesh=None) -> None:
    """Move the MoE layers' expert weights (and the optimizer's state for them) into `new`'s slots, in place.

    m is a Transformer (rows: MoE layers, then MTP blocks, as in ModelOutput.expert_counts) or one MoE
    layer. Replicas receive copies of their expert's weights and moments. new=None returns to E
    logical experts (e.g. before a Hugging Face export). With `mesh`, the arrays are re-placed on it.
    """
    import jax.numpy as jnp
    from flax import nnx

    from model.moe import ExpertSlots, has_slots
    groups = _moe_groups(m)
    old = placement_of(m, 1)
    L, E = old.logcnt.shape
    target = Placement.identity(L, E, 1) if new is None else new
    if target.logcnt.shape != (L, E):
        raise ValueError(f"placement covers {target.logcnt.shape} (layers, experts); the model has {(L, E)}")
    perm = slot_permutation(old, target)                                           # [L, P_new]
    moves = {path + (name,): (perm[rows], layer.w_gate.ndim == 4)
             for path, layer, rows in groups for name in _EXPERT_WEIGHTS}
    for path, layer, rows in groups:
        stacked = layer.w_gate.ndim == 4
        for name in _EXPERT_WEIGHTS:
            var = getattr(layer, name)
            var.set_value(_take_slots(var.get_value(), perm[rows], stacked))
        if has_slots(layer):
            for field in _SLOT_FIELDS:
                delattr(layer, field)
        if new is not None:
            P = target.num_physical
            log2phy = np.full((rows.stop - rows.start, E, P - E + 1), -1)            # static width: any count <= P-E+1
            log2phy[..., :target.log2phy.shape[2]] = target.log2phy[rows]
            for field, value in (("phy2log", target.phy2log[rows]), ("log2phy", log2phy),
                                 ("logcnt", target.logcnt[rows])):
                value = np.asarray(value, np.int32)
                setattr(layer, field, ExpertSlots(jnp.asarray(value if stacked else value[0])))
    if optimizer is not None:
        param_paths = {path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
        state = nnx.state(optimizer)
        for path, var in nnx.to_flat_state(state):
            owner = _param_of(tuple(path), param_paths)
            if owner in moves and var.ndim >= 1:
                var.set_value(_take_slots(var.get_value(), *moves[owner]))
        nnx.update(optimizer, state)
    if mesh is not None:
        from sharding.mesh import shard_model
        shard_model(m, mesh)
        if optimizer is not None:
            shard_model(optimizer, mesh)


class Balancer:
    """EPLB during training: per-step expert counts in, a rebalance of weights and optimizer every `every` steps.

    On construction the model moves to E + redundant physical slots (replicas of a uniform-load
    placement), so checkpoints restored afterwards find the shapes (and the placement) they were
    saved with; the load window itself is not checkpointed and refills after a resume.
    Replicas share their expert's summed gradient (model.moe.tie_replicas), so they stay copies;
    a global gradient norm (clipping) counts a replicated expert once per replica.
    """

    def __init__(self, m, optimizer, mesh, *, every: int, redundant: int = 0, window: int | None = None,
                 num_nodes: int = 1):
        G = dict(mesh.shape).get("expert", 1)
        groups = _moe_groups(m)
        if G <= 1:
            raise ValueError("EPLB places experts over the mesh's `expert` axis; it needs expert > 1")
        if every <= 0 or redundant < 0:
            raise ValueError(f"every={every} must be positive and redundant={redundant} non-negative")
        if not groups:
            raise ValueError("the model has no MoE layers to balance")
        E = groups[0][1].router.shape[-1]
        if (E + redundant) % G:
            raise ValueError(f"{E} experts + {redundant} redundant = {E + redundant} slots do not divide over "
                             f"expert={G} devices")
        self.m, self.optimizer, self.mesh, self.every = m, optimizer, mesh, every
        self.num_physical, self.num_gpus, self.num_nodes = E + redundant, G, num_nodes
        self.num_groups = m.cfg.num_expert_groups if hasattr(m, "cfg") else 1
        self.stats = ExpertLoad(groups[-1][2].stop, E, window=window or every)
        self._pending: list = []
        self.last: tuple[np.ndarray, Placement, Placement] | None = None     # (load, old, new) of the last rebalance
        self._apply(np.ones(self.stats.shape))

    def _apply(self, load: np.ndarray) -> tuple[Placement, Placement]:
        old = placement_of(self.m, self.num_gpus)
        new = rebalance(load, self.num_physical, self.num_groups, self.num_nodes, self.num_gpus)
        apply_placement(self.m, self.optimizer, new, self.mesh)
        return old, new

    def observe(self, counts) -> None:
        """One step's expert counts [layers, E] (a device array: read only at the next rebalance)."""
        self._pending.append(counts)

    def step(self, step: int) -> dict | None:
        """After training step `step`: rebalance when due; returns the report (old vs new placement)."""
        if step % self.every:
            return None
        for counts in self._pending:
            self.stats.update(np.asarray(counts))
        self._pending.clear()
        if not len(self.stats):
            return None
        load = self.stats.load()
        old, new = self._apply(load)
        self.last = (load, old, new)
        return report(load, new, previous=old)
