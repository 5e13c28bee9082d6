"""One process of a two-process CPU training run (gloo): train.train_step on one global mesh.

Each process feeds only its own rows of the global batch (as each process's loader reads its
own shard); `sharding.shard_batch` assembles the global array. Prints the losses of a few steps.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
port, process_id = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharding  # noqa: E402
import train  # noqa: E402
from train_reference import STEPS, global_tokens, make_state, run_steps  # noqa: E402

mesh = sharding.make_mesh(data=-1)
assert mesh.devices.size == 4 and jax.process_count() == 2
tokens = global_tokens()
rows = tokens[4 * process_id:4 * process_id + 4]                  # this process's shard
m, opt = make_state(mesh)
losses = run_steps(m, opt, lambda: {k: sharding.shard_batch(np.asarray(v), mesh)
                                    for k, v in train.batch_from_tokens(rows).items()}, mesh)
print("LOSSES " + json.dumps(losses), flush=True)
assert len(losses) == STEPS
