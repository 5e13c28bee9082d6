"""The named device mesh and the one table that maps logical axes to mesh axes.

Parameters declare logical axes beside their shapes (`("embed", "kv_lora")`); activations are
annotated the same way. `ShardingRules` maps each logical axis to a mesh axis (or None, for
replicated) and rejects a mapping that would use one mesh axis twice in one array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "pipe", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None


def make_mesh(data: int = -1, pipe: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, pipe, expert, tensor) over all devices of all processes.

    One size may be -1: it takes whatever the others leave (by default `data`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "pipe": pipe, "expert": expert, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes {sizes}: each must be a positive integer, and at most one may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh sizes {sizes}: {len(devices)} devices are not divisible by {fixed}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                         f"{len(devices)} devices; make the product equal the device count (or use -1)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)."""

    rules: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self):
        names = [logical for logical, _ in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"sharding rules name logical axes {twice} more than once; keep one rule per axis")

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        table = dict(self.rules)
        if logical not in table:
            raise ValueError(f"logical axis {logical!r} has no sharding rule; add it to the rules table "
                             f"(known: {sorted(table)})")
        return table[logical]

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh | None = None, name: str = "array") -> PartitionSpec:
        """PartitionSpec for an array with these logical axes; mesh axes absent from `mesh` are dropped."""
        out, used = [], {}
        for logical in logical_axes:
            axes = self.mesh_axes(logical)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if mesh is not None:
                axes = tuple(a for a in axes if a in mesh.axis_names)
            for a in axes:
                if a in used:
                    raise ValueError(f"{name}: logical axes {used[a]!r} and {logical!r} both map to mesh axis "
                                     f"{a!r} (axes {tuple(logical_axes)}); change the rules so they differ")
                used[a] = logical
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)

    def replace(self, **changes: MeshAxes) -> ShardingRules:
        table = dict(self.rules)
        table.update(changes)
        return ShardingRules(tuple(table.items()))


# Data parallel over `data`, experts over `expert`, Megatron-style heads/FFN over `tensor`.
DEFAULT_RULES = ShardingRules((
    # activations
    ("batch", "data"), ("seq", None), ("act_embed", None), ("act_heads", "tensor"),
    # parameters
    ("layers", None), ("vocab", "tensor"), ("embed", None), ("norm", None), ("heads", "tensor"),
    ("q_lora", None), ("kv_lora", None), ("qk_head", None), ("qk_nope", None), ("qk_rope", None),
    ("v_head", None), ("mlp", "tensor"), ("moe_mlp", "tensor"), ("experts", "expert"), ("mtp_concat", None),
))

# FSDP-style: additionally shard every parameter's embed axis over `data` (ZeRO-3-like).
FSDP_RULES = DEFAULT_RULES.replace(embed="data")


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """The variable's logical axes; none declared (e.g. an optimizer's step count): replicated."""
    meta = var.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names"))
    return (None,) * len(var.shape) if axes is None else tuple(axes)


def _check_divisible(name: str, shape, spec: PartitionSpec, mesh: Mesh):
    for dim, axes in zip(shape, spec):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            raise ValueError(f"{name}: dimension {dim} (shape {tuple(shape)}) is not divisible by mesh axes "
                             f"{axes} of size {size}; change the mesh or the rules")


def _variable_sharding(path, var: nnx.Variable, mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    name = ".".join(map(str, path))
    spec = rules.spec(_logical_axes(var), mesh, name)
    _check_divisible(name, var.shape, spec, mesh)
    return NamedSharding(mesh, spec)


def state_shardings(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """A State of NamedShardings, one per variable of `model` (for jit in/out shardings)."""
    return nnx.map_state(lambda path, var: _variable_sharding(path, var, mesh, rules), nnx.state(model))


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.Module:
    """Place every variable of `model` on `mesh` according to `rules` (in place; returns the model)."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jax.device_put(var.get_value(), _variable_sharding(path, var, mesh, rules)))
    nnx.update(model, state)
    return model


def shard_batch(x: jax.Array | np.ndarray, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                logical: Sequence[str | None] = ("batch", "seq")) -> jax.Array:
    """Place a host batch (e.g. tokens [B, T]) on the mesh, batch axis over `data`.

    In a multi-process run (`jax.distributed`) a host array is this process's rows only (each
    process's loader reads its own shard): the global batch is the processes' rows stacked in
    process order, [P * B_local, T]. A `jax.Array` that is already global is resharded as is.
    """
    spec = rules.spec(logical, mesh, "batch")
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() > 1 and not isinstance(x, jax.Array):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        _check_divisible("batch", global_shape, spec, mesh)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    _check_divisible("batch", np.shape(x), spec, mesh)
    return jax.device_put(x, sharding)
