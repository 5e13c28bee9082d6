"""train.py then serve.py, end to end on tiny settings (the README's main job, shortened)."""

import json

import pytest

import serve
import train


def test_train_then_serve(tmp_path, capsys):
    out = tmp_path / "tiny"
    train.main(["--steps", "4", "--batch", "2", "--seq-len", "32", "--log-every", "2", "--out", str(out)])
    records = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert all(r["loss"] > 0 for r in records)
    assert (out / "config.json").exists() and not (tmp_path / "tiny.tmp").exists()
    serve.main(["--checkpoint", str(out), "--max-tokens", "5", "--output", str(tmp_path / "o.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == len(serve.PROMPTS) and all(r["tokens"] == 5 for r in rows)


def test_bad_flags_fail_before_work(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--steps", "0"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        serve.main(["--checkpoint", str(tmp_path / "absent")])
