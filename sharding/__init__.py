"""orcinus.sharding: the named mesh and logical-axis rules, expert parallelism, EPLB, pipelines.

Importing this package enables expert parallelism in the model's MoE layers whenever the
current mesh (`jax.set_mesh`) has an `expert` axis larger than one.
"""

from sharding import eplb, pipeline, pipeline_train, schedules
from sharding.ep import (EPOptions, combine, dispatch, ep_moe, ep_routed_experts, get_dispatch_layout,
                         logical_to_physical, low_latency_combine, low_latency_dispatch)
from sharding.mesh import (DEFAULT_RULES, FSDP_RULES, MESH_AXES, ShardingRules, make_mesh, shard_batch,
                           shard_model, state_shardings)

__all__ = ["DEFAULT_RULES", "EPOptions", "FSDP_RULES", "MESH_AXES", "ShardingRules", "combine", "dispatch",
           "ep_moe", "ep_routed_experts", "eplb", "get_dispatch_layout", "logical_to_physical",
           "low_latency_combine", "low_latency_dispatch", "make_mesh", "pipeline", "pipeline_train", "schedules",
           "shard_batch", "shard_model", "state_shardings"]
