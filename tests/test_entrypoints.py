"""train.py then serve.py, end to end on tiny settings (the README's main job, shortened)."""

import json

import pytest

import serve
import train

SMALL = ["--batch", "8", "--seq-len", "32", "--log-every", "2", "--ckpt-every", "2",
         "--set", "model.num_layers=2", "--set", "model.d_model=64", "--set", "model.moe_ffn_dim=32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from storage import prepare_embedded_corpus
    path = tmp_path_factory.mktemp("data") / "embedded"
    prepare_embedded_corpus(path, max_tokens=1 << 20, progress=False)
    return str(path)


def _tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag across the run's TensorBoard event files (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; the payload an Event proto)."""
    import struct

    from tensorboardX.proto import event_pb2
    found = []
    for path in sorted(log_dir.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            found += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return sorted(found)


def test_train_preempted_resume_then_serve(tmp_path, corpus, monkeypatch, capsys):
    """train.py gets a preemption notice (SIGTERM, sent by the process to itself during step 3):
    it stops at the step boundary with a checkpoint of step 3 (the periodic one was step 2) and
    exit code 143, and restores the SIGTERM handler; the rerun resumes at step 3 and finishes;
    serve.py completes prompts with the exported model."""
    import os
    import signal
    out, step_fn, calls = tmp_path / "tiny", train.train_step, []

    def train_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(*a, **kw)
    monkeypatch.setattr(train, "train_step", train_step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train.main(["--steps", "6", "--out", str(out), "--data", corpus, *SMALL])
    assert stop.value.code == 143 and len(calls) == 3 and signal.getsignal(signal.SIGTERM) is before
    assert "preempted (SIGTERM) at step 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    train.main(["--steps", "6", "--out", str(out), "--data", corpus, *SMALL])        # resumes at step 3
    assert "resumed from step 3" in capsys.readouterr().out and len(calls) == 6
    assert (out / "config.json").exists() and not (tmp_path / "tiny.tmp").exists()
    assert (tmp_path / "tiny-train.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert _tensorboard_scalars(tmp_path / "tiny-tb", "train/main") == [
        (r["step"], pytest.approx(r["main"], rel=1e-6)) for r in records]
    serve.main(["--checkpoint", str(out), "--max-tokens", "5", "--output", str(tmp_path / "o.jsonl")])
    *rows, stats = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == len(serve.PROMPTS) and all(r["tokens"] == 5 for r in rows)
    assert stats["stats"]["generated_tokens"] == 5 * len(rows) and stats["stats"]["usd_per_m_output_tokens"] > 0


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "must be positive"),
    (["--set", "model.kv_lora_rank=0"], "kv_lora_rank"),
    (["--set", "model.nonsense=3"], "FIELD one of"),
    (["--set", "model.scan_layers=maybe"], "true or false"),
    (["--mesh", "data=2,bogus=4"], "axis=size"),
    (["--set", "model.attention=pallas"], "multiples of 64"),
    (["--precision", "bf16", "--set", "model.attention=pallas", "--set", "model.qk_nope_head_dim=48",
      "--set", "model.v_head_dim=64", "--seq-len", "100"], "multiple of 128"),
])
def test_bad_flags_fail_before_work(flags, words, capsys):
    with pytest.raises(SystemExit):
        train.main(flags)
    assert words in capsys.readouterr().err


def test_serve_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        serve.main(["--checkpoint", str(tmp_path / "absent")])


def test_embedded_corpus_is_prepared_once_by_concurrent_processes(tmp_path):
    """Processes sharing a disk each prepare into their own temporary directory and the first to
    finish renames it into place, so none reads a shard another is still writing; a leftover
    directory without a manifest is a clear error; an interrupted preparation's temporary directory
    (its process gone, on this host) is removed by the next; the renamed corpus opens where it lands."""
    import functools
    import os
    import socket
    import subprocess
    import threading

    from storage import open_corpus, prepare_embedded_corpus
    target, barrier, wrote = tmp_path / "data" / "embedded", threading.Barrier(3), []

    def prepare(out, progress):                    # all three prepare at once
        barrier.wait()
        out.mkdir(parents=True)
        (out / "shard").write_text(str(len(wrote)))
        (out / "manifest.json").write_text("{}")
        wrote.append(out)
    threads = [threading.Thread(target=train._prepare_once, args=(target, prepare)) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wrote) == 3 and (target / "manifest.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["embedded"]         # the losers' copies are gone
    train._prepare_once(target, lambda *a, **k: pytest.fail("prepared again"))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "shard-0").write_text("half")
    with pytest.raises(SystemExit, match="remove it"):
        train._prepare_once(stale, lambda out, progress: (out.mkdir(), (out / "manifest.json").write_text("{}")))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    dead = subprocess.Popen(["true"])
    dead.wait()                                     # a process id no longer alive: an interrupted preparer's
    host = socket.gethostname()
    left = [tmp_path / f".real.tmp-{host}-{dead.pid}-7", tmp_path / f".real.tmp-{host}-{os.getpid()}-7",
            tmp_path / f".real.tmp-otherhost-{dead.pid}-7"]
    for d in left:
        d.mkdir()
        (d / "shard-0").write_text("half")
    real = tmp_path / "real"
    train._prepare_once(real, functools.partial(prepare_embedded_corpus, max_tokens=1 << 16))
    assert open_corpus(real).num_tokens >= 1 << 16
    assert [d.exists() for d in left] == [False, True, True]     # only this host's dead preparer's is removed
