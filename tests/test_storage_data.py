"""Corpus preparation (ArrayRecord + manifest) and the Grain pipeline: shuffle, sharding, packing, resume."""

import json

import numpy as np
import pytest

from storage import (ByteTokenizer, CorpusError, LoaderConfig, make_loader, open_corpus, prepare_corpus,
                     prepare_embedded_corpus)
from storage.dataset import CorpusSource, documents, permute

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """~130k tokens of the embedded corpus in several shards."""
    out = tmp_path_factory.mktemp("corpus")
    prepare_embedded_corpus(out, max_tokens=1 << 17, shard_tokens=1 << 15, progress=False)
    return out


@pytest.fixture
def text_files(tmp_path):
    docs = [f"document {i}: " + "abc " * i for i in range(30)]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    with open(tmp_path / "rest.jsonl", "w") as f:
        for d in docs[2:]:
            f.write(json.dumps({"id": 1, "body": d}) + "\n")
    return tmp_path, docs


def read_all(corpus_dir):
    source = CorpusSource(corpus_dir)
    return [source[i] for i in range(len(source))]


def test_prepare_files_globs_jsonl_and_manifest(tmp_path, text_files):
    src, docs = text_files
    m = prepare_corpus([src / "*.txt", src / "rest.jsonl"], tmp_path / "out", jsonl_field="body",
                       shard_tokens=200, progress=False)
    got = read_all(tmp_path / "out")
    assert [TOK.decode(d) for d in got] == docs
    assert all(d[0] == TOK.bos_id and d[-1] == TOK.eos_id for d in got)
    assert m["num_documents"] == len(docs) and m["num_tokens"] == sum(map(len, got))
    assert len(m["shards"]) > 1 and sum(s["num_records"] for s in m["shards"]) == len(docs)
    assert m["tokenizer"] == dict(kind="byte", vocab_size=258, bos_id=256, eos_id=257)
    assert m["dtype"] == "<u2" and all(d.dtype == np.uint16 for d in got)            # 258 ids fit in uint16
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    open_corpus(tmp_path / "out", verify_checksums=True)


def test_prepare_with_a_hugging_face_tokenizer(tmp_path, text_files):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    src, docs = text_files
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<s>", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    m = prepare_corpus(src / "rest.jsonl", tmp_path / "out", tokenizer=tmp_path / "tokenizer.json",
                       jsonl_field="body", progress=False)
    assert m["tokenizer"]["kind"] == "huggingface" and m["tokenizer"]["bos_id"] == tok.token_to_id("<s>")
    first = read_all(tmp_path / "out")[0]
    assert first.tolist() == [tok.token_to_id("<s>")] + tok.encode(docs[2]).ids + [tok.token_to_id("</s>")]


def test_embedded_corpus_is_deterministic_and_matches_the_byte_corpus(tmp_path, corpus_dir):
    again = prepare_embedded_corpus(tmp_path, max_tokens=1 << 17, shard_tokens=1 << 15, progress=False)
    assert again["checksum"] == open_corpus(corpus_dir).manifest["checksum"]
    joined = np.concatenate(read_all(corpus_dir))
    from storage import embedded_corpus
    np.testing.assert_array_equal(joined[:50_000], embedded_corpus(max_bytes=50_000))


def test_bad_inputs_are_clear_errors(tmp_path, corpus_dir, text_files):
    src, _ = text_files
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_corpus(tmp_path / "nothing*.txt", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="no field 'text'.*jsonl_field"):
        prepare_corpus(src / "rest.jsonl", tmp_path / "o", progress=False)
    with pytest.raises(CorpusError, match="manifest.json is missing.*re-run prepare_corpus"):
        open_corpus(tmp_path)


@pytest.fixture
def damaged(tmp_path, text_files):
    src, _ = text_files
    prepare_corpus([src / "*.txt", src / "rest.jsonl"], tmp_path / "c", jsonl_field="body", progress=False)
    return tmp_path / "c", tmp_path / "c" / "shard-00000.array_record"


def test_truncated_shard_is_a_clear_error(damaged):
    root, shard = damaged
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusError, match="shard-00000.array_record is .* bytes but the manifest says.*truncated"):
        open_corpus(root)


def test_corrupt_shard_is_a_clear_error(damaged):
    root, shard = damaged
    data = bytearray(shard.read_bytes())
    data[80] ^= 0xFF                                  # inside the first chunk's data (after 24 + 40 header bytes)
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="fails its sha256 checksum: it is corrupt; re-run"):
        open_corpus(root, verify_checksums=True)
    source = CorpusSource(root)                       # unverified open: reading the record fails clearly
    with pytest.raises(CorpusError, match="shard .*shard-00000.array_record: record .* corrupt"):
        [source[i] for i in range(len(source))]
    loader = make_loader(root, LoaderConfig(seq_len=8, batch_size=2, read_threads=2))
    with pytest.raises(CorpusError, match="shard .*shard-00000.array_record: record .* corrupt"):
        [next(loader) for _ in range(100)]                            # raised in a read thread, surfaces here


def test_shuffle_is_a_permutation_per_epoch_and_processes_are_disjoint(corpus_dir):
    n = len(CorpusSource(corpus_dir))
    source = list(range(n))                           # ids stand for documents; same dataset code
    cfg = LoaderConfig(seq_len=8, batch_size=1, seed=5, num_epochs=2, process_index=0, process_count=1)
    order = list(documents(source, cfg))
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
    assert order[:n] != order[n:] and order[:n] != list(range(n))
    per_process = [list(documents(source, LoaderConfig(seq_len=8, batch_size=1, seed=5, num_epochs=1,
                                                       process_index=p, process_count=2))) for p in (0, 1)]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(n))
    assert abs(len(per_process[0]) - len(per_process[1])) <= 1


@pytest.mark.parametrize("read_threads", [0, 2])
def test_packed_batches_reconstruct_the_documents(corpus_dir, read_threads):
    docs = read_all(corpus_dir)
    cfg = LoaderConfig(seq_len=64, batch_size=4, shuffle=False, num_epochs=1, process_index=0, process_count=1,
                       read_threads=read_threads)
    stream, pieces = [], 0
    for batch in make_loader(corpus_dir, cfg):
        for row in range(cfg.batch_size):
            seg, pos, tok = batch["segment_ids"][row], batch["positions"][row], batch["tokens"][row]
            for s in np.unique(seg[seg > 0]):
                piece = seg == s
                assert (pos[piece] == np.arange(piece.sum())).all()          # positions restart per piece
                stream.append(tok[piece])
                pieces += 1
            valid = batch["weights"][row] > 0
            assert (batch["targets"][row][valid] == tok[1:][valid[:-1]]).all()
            assert (seg[1:][valid[:-1]] == seg[:-1][valid[:-1]]).all()       # never across a boundary
    stream = np.concatenate(stream)
    whole = np.concatenate(docs)
    assert pieces >= len(docs)
    np.testing.assert_array_equal(stream, whole[:len(stream)])                # only the tail is dropped
    assert len(whole) - len(stream) < cfg.seq_len * cfg.batch_size


@pytest.mark.parametrize("read_threads", [0, 3])
def test_iterator_state_restores_exactly(corpus_dir, read_threads):
    cfg = LoaderConfig(seq_len=48, batch_size=3, seed=11, read_threads=read_threads)
    it = make_loader(corpus_dir, cfg)
    states, batches = [], []
    for _ in range(12):
        states.append(it.get_state())
        batches.append(next(it))
    for k in (0, 5, 9):
        resumed = make_loader(corpus_dir, cfg)
        resumed.set_state(json.loads(json.dumps(states[k])))                 # as a checkpoint stores it
        for want in batches[k:]:
            got = next(resumed)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"resume at {k}: {name}")


def test_process_index_defaults_to_jax_and_is_validated():
    assert LoaderConfig(seq_len=8, batch_size=1).process() == (0, 1)
    with pytest.raises(ValueError, match="process_index=2 must be in"):
        LoaderConfig(seq_len=8, batch_size=1, process_index=2, process_count=2).process()


def _reference_pack(docs, T, B):
    """Concat-then-split packing, one document at a time: the loader's contract in plain Python."""
    batches, row, rows, seg, filled = [], None, [], 0, 0
    for d in docs:
        i = 0
        while i < len(d):
            if row is None:
                row, seg, filled = (np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)), 0, 0
            take = min(T - filled, len(d) - i)
            seg += 1
            row[0][filled:filled + take] = d[i:i + take]
            row[1][filled:filled + take] = np.arange(take)
            row[2][filled:filled + take] = seg
            filled, i = filled + take, i + take
            if filled == T:
                rows.append(row)
                row = None
                if len(rows) == B:
                    batches.append([np.stack(x) for x in zip(*rows)])
                    rows = []
    return batches


def test_packing_equals_a_per_document_reference_packer():
    """Random lengths (one-token documents, documents longer than a batch): every field equal."""
    import grain

    rng = np.random.default_rng(3)
    lengths = rng.choice([1, 5, 40, 64, 300, 1000], size=400)
    docs = [rng.integers(1, 255, n).astype(np.int32) for n in lengths]
    T, B = 64, 3
    want = _reference_pack(docs, T, B)
    from storage.dataset import PackedBatches
    got = list(PackedBatches(grain.MapDataset.source(docs), T, B))
    assert len(got) == len(want) > 10
    for g, (tokens, positions, segments) in zip(got, want):
        np.testing.assert_array_equal(g["tokens"], tokens)
        np.testing.assert_array_equal(g["positions"], positions)
        np.testing.assert_array_equal(g["segment_ids"], segments)


def test_int32_corpora_read_like_uint16_ones(tmp_path, corpus_dir):
    """A corpus written with int32 tokens (the format before uint16, twice the bytes) reads the same
    documents and packs into the same batches."""
    m32 = prepare_embedded_corpus(tmp_path, max_tokens=1 << 17, shard_tokens=1 << 15, dtype="int32", progress=False)
    m16 = open_corpus(corpus_dir).manifest
    assert (m32["dtype"], m16["dtype"]) == ("<i4", "<u2")
    docs32, docs16 = read_all(tmp_path), read_all(corpus_dir)
    assert docs32[0].dtype == np.int32 and len(docs32) == len(docs16)
    for a, b in zip(docs32, docs16):
        np.testing.assert_array_equal(a, b)
        assert a.nbytes == 2 * b.nbytes
    cfg = LoaderConfig(seq_len=40, batch_size=3, seed=2, num_epochs=1)
    for a, b in zip(make_loader(tmp_path, cfg), make_loader(corpus_dir, cfg)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_token_dtype_must_hold_the_vocabulary(tmp_path, text_files):
    class WideTokenizer(ByteTokenizer):
        vocab_size = 70_000

    src, _ = text_files
    with pytest.raises(ValueError, match="uint16' cannot hold a vocabulary of 70,000 ids; use 'int32'"):
        prepare_corpus(src / "a.txt", tmp_path / "o", tokenizer=WideTokenizer(), dtype="uint16", progress=False)
    m = prepare_corpus(src / "a.txt", tmp_path / "o", tokenizer=WideTokenizer(), progress=False)
    assert m["dtype"] == "<i4"
    with pytest.raises(ValueError, match="dtype='int8' must be one of"):
        prepare_corpus(src / "a.txt", tmp_path / "o", dtype="int8", progress=False)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 168, 1000, 4097])
def test_permute_is_a_bijection_that_changes_with_seed_and_epoch(n):
    i = np.arange(n)
    orders = {(seed, epoch): permute(i, n, seed, epoch) for seed in (0, 1) for epoch in (0, 1)}
    for order in orders.values():
        np.testing.assert_array_equal(np.sort(order), i)
    if n >= 7:
        assert len({tuple(o) for o in orders.values()}) == 4 and not (orders[0, 0] == i).all()
    np.testing.assert_array_equal(permute(i[::-1], n, 1, 1), orders[1, 1][::-1])          # position-wise


def test_resume_across_epochs_and_from_any_offset():
    """An in-memory source of 7 documents, several epochs: resuming at any batch reproduces the rest."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 255, n).astype(np.int32) for n in (3, 50, 17, 9, 120, 1, 33)]
    cfg = LoaderConfig(seq_len=16, batch_size=2, seed=3, num_epochs=5, prefetch=0)
    it = make_loader(docs, cfg)
    states, batches = [], []
    for batch in it:
        states.append(it.get_state())
        batches.append(batch)
    assert len(batches) == 5 * sum(map(len, docs)) // 32
    for k in range(0, len(batches) - 1, 3):
        resumed = make_loader(docs, cfg)
        resumed.set_state(json.loads(json.dumps(states[k])))
        rest = list(resumed)
        assert len(rest) == len(batches) - k - 1
        for got, want in zip(rest, batches[k + 1:]):
            np.testing.assert_array_equal(got["tokens"], want["tokens"], err_msg=f"resume after batch {k}")
