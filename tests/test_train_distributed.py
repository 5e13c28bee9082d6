"""Training across processes and devices agrees with one device (the train.py step on a mesh)."""

import json

import jax
import numpy as np
import pytest

import sharding
import train
from multiprocess import run_processes
from train_reference import STEPS, global_tokens, make_state, run_steps


@pytest.fixture(scope="module")
def one_device_losses():
    m, opt = make_state()
    batch = train.batch_from_tokens(global_tokens())
    return run_steps(m, opt, lambda: batch)


def test_two_processes_train_like_one_device(one_device_losses, report):
    """jax.distributed over gloo: 2 processes x 2 CPU devices, data parallel over all four; each
    process feeds only its half of the batch. Losses of 3 AdamW steps equal the one-device run's."""
    for text in run_processes("train_worker.py", timeout=300):
        losses = json.loads(text.split("LOSSES ")[1].splitlines()[0])
        rel = np.abs(np.array(losses) - one_device_losses) / np.abs(one_device_losses)
        report(f"two processes: losses {np.round(losses, 5).tolist()} vs one device "
               f"{np.round(one_device_losses, 5).tolist()}, max rel diff {rel.max():.1e}")
        assert rel.max() < 1e-5, (losses, one_device_losses)


def test_expert_parallel_training_matches_one_device(one_device_losses, report):
    """EP over 8 simulated devices (the MoE layers dispatch tokens to expert shards with
    all-to-all): the same losses as one device for 3 AdamW steps."""
    mesh_kw = dict(expert=8)
    mesh = sharding.make_mesh(**mesh_kw)
    m, opt = make_state(mesh)
    batch = {k: sharding.shard_batch(np.asarray(v), mesh) for k, v in train.batch_from_tokens(global_tokens()).items()}
    with jax.set_mesh(mesh):
        hlo = train.train_step.lower(m, opt, batch, 0.3, 1e-3).as_text()
    assert "all-to-all" in hlo or "all_to_all" in hlo          # the EP dispatch, not a replicated MoE
    losses = run_steps(m, opt, lambda: batch, mesh)
    rel = np.abs(np.array(losses) - one_device_losses) / np.abs(one_device_losses)
    report(f"EP {mesh_kw}: losses {np.round(losses, 5).tolist()}, max rel diff vs one device {rel.max():.1e}")
    assert rel.max() < 1e-5, (losses, one_device_losses)
