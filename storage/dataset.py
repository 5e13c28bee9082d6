"""The Grain pipeline over a prepared corpus: random access, global shuffle, packing, prefetch.

documents (ArrayRecord, random access) -> shuffle by seed, a fresh permutation each epoch ->
this process's slice (index p, p + P, p + 2P, ...) -> concat-then-split packing into [B, T]
batches -> thread prefetch. Every stage is a Grain dataset, so the iterator's state is a small
dict (`get_state` / `set_state`: the next document and the offset into it) and a resumed run
sees exactly the batches it would have seen.

A batch (B = per-process batch, T = sequence length), all [B, T]:
  tokens       int32    documents packed back to back (rows are always full)
  positions    int32    position within the document piece (restarts at 0 for each piece)
  segment_ids  int32    1, 2, ... per piece within a row
  targets      int32    the next token within the same piece (0 where there is none)
  weights      float32  1.0 where `targets` is a real next token, else 0.0
`model.forward(tokens, positions=positions, segment_ids=segment_ids)` attends within pieces only.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import weakref

import grain
import jax
import numpy as np

from storage.prepare import TOKEN_DTYPE, Corpus, CorpusError, _fix, open_corpus


class CorpusSource(grain.sources.RandomAccessDataSource):
    """Random access to the documents of a prepared corpus: source[i] -> int32 token ids."""

    def __init__(self, corpus: Corpus | str | os.PathLike):
        self.corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
        self._paths = [str(p) for p in self.corpus.shard_paths]
        self._starts = np.cumsum([0] + [s["num_records"] for s in self.corpus.manifest["shards"]]).tolist()
        self._source = None

    def _records(self):
        if self._source is None:                    # opened lazily: the source may be pickled to workers
            self._source = grain.sources.ArrayRecordDataSource(self._paths)
        return self._source

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            record = self._records()[index]
        except RuntimeError as e:
            shard = self._paths[bisect.bisect_right(self._starts, index) - 1]
            raise CorpusError(f"shard {shard}: record {index} cannot be read ({e}); the shard is corrupt; "
                              f"{_fix(self.corpus.root)}") from None
        if len(record) % TOKEN_DTYPE.itemsize:
            raise CorpusError(f"record {index} is {len(record)} bytes, not whole int32 tokens; "
                              f"{_fix(self.corpus.root)}")
        return np.frombuffer(record, TOKEN_DTYPE).astype(np.int32)

    def __repr__(self) -> str:
        return f"CorpusSource({str(self.corpus.root)!r}, documents={len(self)})"


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """The data pipeline's knobs. process_index/count default to jax.process_index()/process_count()."""

    seq_len: int
    batch_size: int                     # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None       # None: repeat forever
    prefetch: int = 2                   # batches prefetched by a background thread; 0: none
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LoaderConfig.{name}={getattr(self, name)} must be positive")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"LoaderConfig.num_epochs={self.num_epochs} must be positive, or None for forever")

    def process(self) -> tuple[int, int]:
        index = jax.process_index() if self.process_index is None else self.process_index
        count = jax.process_count() if self.process_count is None else self.process_count
        if not 0 <= index < count:
            raise ValueError(f"process_index={index} must be in [0, process_count={count})")
        return index, count


def documents(source: grain.sources.RandomAccessDataSource, cfg: LoaderConfig) -> grain.MapDataset:
    """This process's documents in order: global shuffle per epoch, then every P-th from index p.

    Processes take disjoint positions of one global order, so within an epoch they read disjoint
    documents whose union is the whole corpus.
    """
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)              # reshuffled with a new permutation each epoch
    ds = ds.repeat(cfg.num_epochs)
    index, count = cfg.process()
    return ds[index::count]


class PackedBatches(grain.IterDataset):
    """Concat-then-split packing of a MapDataset of documents into [B, T] batches, one step per batch.

    Documents are laid end to end; a row is cut every T tokens and the rest of the document
    continues the next row as a new piece. The state is (next document, offset into it): two ints.
    A run out of documents drops the incomplete last batch.
    """

    def __init__(self, docs: grain.MapDataset, seq_len: int, batch_size: int):
        super().__init__(docs)
        self.docs, self.seq_len, self.batch_size = docs, seq_len, batch_size

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self.docs, self.seq_len, self.batch_size)

    def __str__(self) -> str:
        return f"PackedBatches(seq_len={self.seq_len}, batch_size={self.batch_size})"


class _PackedIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, seq_len: int, batch_size: int):
        super().__init__()
        self._docs, self._T, self._B = docs, seq_len, batch_size
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._next, self._offset, self._doc = 0, 0, None

    def _current(self) -> np.ndarray | None:
        if self._doc is None:
            if self._next >= len(self._docs):
                return None
            self._doc = self._docs[self._next]
        return self._doc

    def _fill_row(self, tokens, positions, segments) -> bool:
        filled, seg = 0, 0
        while filled < self._T:
            doc = self._current()
            if doc is None:
                return False
            take = min(self._T - filled, len(doc) - self._offset)
            seg += 1
            tokens[filled:filled + take] = doc[self._offset:self._offset + take]
            positions[filled:filled + take] = self._arange[:take]
            segments[filled:filled + take] = seg
            filled, self._offset = filled + take, self._offset + take
            if self._offset == len(doc):
                self._next, self._offset, self._doc = self._next + 1, 0, None
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        tokens, positions, segments = (np.zeros((self._B, self._T), np.int32) for _ in range(3))
        for row in range(self._B):
            if not self._fill_row(tokens[row], positions[row], segments[row]):
                raise StopIteration
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        targets = np.zeros_like(tokens)
        targets[:, :-1] = np.where(same, tokens[:, 1:], 0)
        weights = np.zeros(tokens.shape, np.float32)
        weights[:, :-1] = same
        return dict(tokens=tokens, positions=positions, segment_ids=segments, targets=targets, weights=weights)

    def get_state(self) -> dict:
        return {"next_document": self._next, "offset": self._offset}

    def set_state(self, state: dict):
        self._next, self._offset, self._doc = int(state["next_document"]), int(state["offset"]), None


def make_dataset(corpus: Corpus | str | os.PathLike | grain.sources.RandomAccessDataSource,
                 cfg: LoaderConfig) -> grain.IterDataset:
    """The whole pipeline as a Grain IterDataset of packed batches (see the module docstring).

    `corpus`: a prepared corpus (its directory or an opened `Corpus`), or any random-access source
    of int32 token arrays.
    """
    source = CorpusSource(corpus) if isinstance(corpus, (Corpus, str, os.PathLike)) else corpus
    ds = PackedBatches(documents(source, cfg), cfg.seq_len, cfg.batch_size)
    if cfg.prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return ds


def _tuples(x):
    """JSON turns tuples into lists; Grain compares some state fields with tuple sentinels."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _close(attributes: dict):
    if (it := attributes.pop("_it", None)) is not None:
        it.close()


class Loader:
    """An iterator of packed batches whose state is a JSON-able dict (`get_state` / `set_state`)."""

    def __init__(self, dataset: grain.IterDataset):
        self._it = iter(dataset)
        # close and drop the Grain iterator before interpreter teardown (its __del__ fails after it)
        self._finalizer = weakref.finalize(self, _close, self.__dict__)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict):
        self._it.set_state(_tuples(state))

    def close(self):
        self._finalizer()


def make_loader(corpus, cfg: LoaderConfig) -> Loader:
    """An iterator of packed batches with `get_state()` / `set_state(state)` for checkpoints."""
    return Loader(make_dataset(corpus, cfg))
