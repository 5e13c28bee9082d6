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


def test_train_resume_then_serve(tmp_path, corpus):
    out = tmp_path / "tiny"
    train.main(["--steps", "4", "--out", str(out), "--data", corpus, *SMALL])
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert (out / "config.json").exists() and not (tmp_path / "tiny.tmp").exists()
    assert (tmp_path / "tiny-train.png").read_bytes()[:4] == b"\x89PNG"
    train.main(["--steps", "6", "--out", str(out), "--data", corpus, *SMALL])        # resumes at step 4
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 5, 6]
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
