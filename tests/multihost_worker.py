"""One process of a two-process CPU run (gloo): a global data-parallel mesh over both."""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
port, process_id = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import model  # noqa: E402
import sharding  # noqa: E402

cfg = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2)
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16))
local = model.Transformer(cfg, rngs=nnx.Rngs(0))
want = np.asarray(nnx.jit(lambda m, t: m(t))(local, tokens))

mesh = sharding.make_mesh(data=-1)
assert mesh.devices.size == 4 and jax.process_count() == 2
m = sharding.shard_model(model.Transformer(cfg, rngs=nnx.Rngs(0)), mesh, sharding.FSDP_RULES)
rows = slice(4 * process_id, 4 * process_id + 4)              # each process feeds its own data shard
batch = jax.make_array_from_process_local_data(
    jax.sharding.NamedSharding(mesh, sharding.FSDP_RULES.spec(("batch", "seq"), mesh)), tokens[rows])
got = multihost_utils.process_allgather(nnx.jit(lambda m, t: m(t))(m, batch), tiled=True)
err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
print(f"process {process_id}: devices={jax.device_count()} rel_err={err:.3e}")
assert err < 1e-5, err
