"""Orbax checkpoints: another mesh, another config, keep-N, atomic finalize, SIGKILL-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import model
import sharding
from storage import CheckpointConfigError, Checkpointer, LoaderConfig, make_loader, prepare_embedded_corpus

WORKER = Path(__file__).with_name("storage_worker.py")
CFG = model.ModelConfig.preset("tiny", d_model=64, moe_ffn_dim=32, dense_ffn_dim=96, num_layers=2, mtp_depth=0)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    prepare_embedded_corpus(out, max_tokens=1 << 16, shard_tokens=1 << 14, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(corpus_dir):
    """A model on mesh data=8 (FSDP rules), an optimizer with non-zero moments, a loader mid-stream."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)                                 # random values: cheaper than a real init
    m = nnx.merge(graphdef, jax.tree.map(lambda s: jax.numpy.asarray(rng.normal(size=s.shape), s.dtype), state))
    sharding.shard_model(m, sharding.make_mesh(data=8), sharding.FSDP_RULES)
    opt = nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param)
    nnx.update(opt, jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype), nnx.state(opt)))
    loader = make_loader(corpus_dir, LoaderConfig(seq_len=32, batch_size=2, seed=1))
    next(loader)
    return m, opt, loader


def leaves(x):
    return jax.tree.leaves(nnx.state(x))


def test_restore_onto_a_different_mesh(tmp_path, corpus_dir, trained):
    m, opt, loader = trained
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, m, opt, loader)
    m2 = nnx.clone(m)
    nnx.update(m2, jax.tree.map(lambda x: x * 0, nnx.state(m2)))
    mesh_b = sharding.make_mesh(data=2, expert=4)
    sharding.shard_model(m2, mesh_b)                               # the new mesh, DEFAULT_RULES
    opt2 = nnx.Optimizer(m2, optax.adam(1e-3), wrt=nnx.Param)
    loader2 = make_loader(corpus_dir, LoaderConfig(seq_len=32, batch_size=2, seed=1))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore(m2, opt2, loader2) == 3
    for a, b in zip(leaves(m) + leaves(opt), leaves(m2) + leaves(opt2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = m2.moe_layers.ffn.w_gate[...]
    assert w.sharding.mesh.shape == mesh_b.shape
    assert w.sharding == sharding.state_shardings(m2, mesh_b)["moe_layers"]["ffn"]["w_gate"]
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape[1] == CFG.num_routed_experts // 4
    np.testing.assert_array_equal(next(loader2)["tokens"], next(loader)["tokens"])


def test_another_config_is_a_clear_error(tmp_path, trained):
    m, opt, _ = trained
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, m, opt)
    other = nnx.eval_shape(lambda: model.Transformer(CFG.replace(kv_lora_rank=32, num_layers=3), rngs=nnx.Rngs(0)))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.read_config()["fields"]["kv_lora_rank"] == CFG.kv_lora_rank
        with pytest.raises(CheckpointConfigError, match=r"different model config:\n  kv_lora_rank: checkpoint 64, "
                                                        r"model 32\n  num_layers: checkpoint 2, model 3\n"):
            ckpt.restore(other)
        with pytest.raises(FileNotFoundError, match="no finalized checkpoint for step 7 .*finalized steps: \\[1\\]"):
            ckpt.restore(m, step=7)


def test_restores_into_an_abstract_model_without_initialising(tmp_path, corpus_dir, trained):
    m, _, _ = trained
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, m)
    abstract = nnx.eval_shape(lambda: model.Transformer(CFG, rngs=nnx.Rngs(0)))
    loader = make_loader(corpus_dir, LoaderConfig(seq_len=32, batch_size=2))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(FileNotFoundError, match="holds no data-iterator state"):
            ckpt.restore(abstract, data_iter=loader)
        assert ckpt.restore(abstract) == 1
    for a, b in zip(leaves(m), leaves(abstract)):
        assert isinstance(b, jax.Array)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_the_last_n(tmp_path, trained):
    m, _, _ = trained
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, m)
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "4"]


def worker_env(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def test_interrupted_write_never_replaces_the_last_good_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(WORKER), "bigsave", str(ckpt_dir)], env=worker_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving step 2"
        deadline = time.time() + 60
        while not [p for p in ckpt_dir.iterdir() if p.name.startswith("2.") and "tmp" in p.name]:
            assert time.time() < deadline, "step 2's temporary directory never appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)                           # mid-write
        proc.wait()
    finally:
        proc.kill()
    leftovers = sorted(p.name for p in ckpt_dir.iterdir())
    assert "1" in leftovers and "2" not in leftovers and any(n.startswith("2.") for n in leftovers), leftovers
    sys.path.insert(0, str(WORKER.parent))
    from storage_worker import Big
    big = Big(0.0, n=1 << 20)
    big.w = nnx.Param(jax.numpy.zeros((64 << 20,), jax.numpy.float32))
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.restore(big) == 1
        assert float(big.w[...].min()) == float(big.w[...].max()) == 1.0
        ckpt.save(2, big)                                          # the next save of step 2 succeeds
    assert Checkpointer(ckpt_dir).all_steps() == [1, 2]


def run_worker(tmp_path, corpus, ckpt, steps, kill_after=None):
    """The worker's JSON lines; with kill_after, SIGKILL it as soon as it reports that step."""
    proc = subprocess.Popen([sys.executable, str(WORKER), "train", str(corpus), str(ckpt), str(steps)],
                            env=worker_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(json.loads(line))
            if kill_after is not None and lines[-1].get("step") == kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
    if kill_after is None:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return lines


def test_sigkilled_run_resumes_bit_identically(tmp_path, corpus_dir):
    steps = 6
    reference = run_worker(tmp_path, corpus_dir, tmp_path / "ref", steps)
    killed = run_worker(tmp_path, corpus_dir, tmp_path / "run", steps, kill_after=3)
    resumed = run_worker(tmp_path, corpus_dir, tmp_path / "run", steps)
    by_step = {r["step"]: r for r in reference[1:]}
    assert [r["step"] for r in reference[1:]] == list(range(1, steps + 1))
    start = resumed[0]["resumed_from"]
    assert 2 <= start <= 3                                         # the last finalized save before the kill
    for r in killed[1:] + resumed[1:]:
        assert r == by_step[r["step"]], f"step {r['step']}: resumed run diverges from the uninterrupted run"
    assert [r["step"] for r in resumed[1:]] == list(range(start + 1, steps + 1))


def test_config_diff_ignores_how_the_model_runs():
    """attention / remat change how a model runs, not its parameters: a checkpoint resumes under
    either, including one written before the `attention` field existed."""
    import model
    from storage.checkpoint import config_diff, config_to_json
    live = config_to_json(model.ModelConfig.preset("tiny", remat="full"))
    saved = config_to_json(model.ModelConfig.preset("tiny"))
    del saved["fields"]["attention"]
    assert config_diff(saved, live) == []
    saved["fields"]["kv_lora_rank"] = 32
    assert config_diff(saved, live) == ["kv_lora_rank: checkpoint 32, model 64"]
