"""orcinus.sharding: the named mesh and logical-axis rules (EP, DualPipe and EPLB build on them)."""

from sharding.mesh import (DEFAULT_RULES, FSDP_RULES, MESH_AXES, ShardingRules, make_mesh, shard_batch,
                           shard_model, state_shardings)

__all__ = ["DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "ShardingRules", "make_mesh", "shard_batch",
           "shard_model", "state_shardings"]
