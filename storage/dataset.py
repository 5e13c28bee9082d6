"""The Grain pipeline over a prepared corpus: random access, global shuffle, packing, prefetch.

documents (ArrayRecord, random access) -> a fresh pseudo-random permutation of them each epoch ->
this process's slice (positions p, p + P, p + 2P, ... of the global order) -> (documents read
ahead by a few threads, optional) -> concat-then-split packing into [B, T] batches -> thread
prefetch. Shuffle,
repeat and slice are one Grain MapDataset (`DocumentOrder`) that computes document ids a block at
a time with numpy; packing is a Grain IterDataset whose state is a small dict (`get_state` /
`set_state`: the next document and the offset into it), so a resumed run sees exactly the batches
it would have seen.

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
import collections
import dataclasses
import json
import os
import sys
import weakref
from concurrent import futures

import grain
import jax
import numpy as np
from array_record.python import array_record_module

from storage.prepare import Corpus, CorpusError, _fix, open_corpus


class CorpusSource(grain.sources.RandomAccessDataSource):
    """Random access to the documents of a prepared corpus: source[i] -> its token ids.

    A document is a read-only view of the record in the corpus's dtype (uint16 or int32); one
    ArrayRecord reader per shard, opened on first use (the source pickles without them).
    """

    def __init__(self, corpus: Corpus | str | os.PathLike):
        self.corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
        self.dtype = self.corpus.dtype
        self._paths = [str(p) for p in self.corpus.shard_paths]
        self._starts = np.cumsum([0] + [s["num_records"] for s in self.corpus.manifest["shards"]]).tolist()
        self._readers = [None] * len(self._paths)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _readers=[None] * len(self._paths))

    def _reader(self, shard: int):
        if (reader := self._readers[shard]) is None:
            try:
                reader = array_record_module.ArrayRecordReader(self._paths[shard],
                                                               "readahead_buffer_size:0,max_parallelism:0")
            except RuntimeError as e:
                raise CorpusError(f"shard {self._paths[shard]} cannot be opened ({e}): it is corrupt; "
                                  f"{_fix(self.corpus.root)}") from None
            self._readers[shard] = reader
        return reader

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} is out of range for {len(self)} documents")
        shard = bisect.bisect_right(self._starts, index) - 1
        try:
            record = self._reader(shard).read([index - self._starts[shard]])[0]
        except RuntimeError as e:
            raise CorpusError(f"shard {self._paths[shard]}: record {index} cannot be read ({e}); the shard is "
                              f"corrupt; {_fix(self.corpus.root)}") from None
        if len(record) % self.dtype.itemsize:
            raise CorpusError(f"record {index} is {len(record)} bytes, not whole {self.dtype.name} tokens; "
                              f"{_fix(self.corpus.root)}")
        return np.frombuffer(record, self.dtype)

    def __repr__(self) -> str:
        return f"CorpusSource({str(self.corpus.root)!r}, documents={len(self)}, dtype={self.dtype.name})"


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """The data pipeline's knobs. process_index/count default to jax.process_index()/process_count()."""

    seq_len: int
    batch_size: int                     # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None       # None: repeat forever
    prefetch: int = 2                   # batches prefetched by a background thread; 0: none
    read_threads: int = 0               # threads reading documents ahead of the packer (for cold or remote
                                        # storage); 0: the packer reads them
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LoaderConfig.{name}={getattr(self, name)} must be positive")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"LoaderConfig.num_epochs={self.num_epochs} must be positive, or None for forever")
        if self.read_threads < 0 or self.prefetch < 0:
            raise ValueError(f"LoaderConfig.read_threads={self.read_threads} and prefetch={self.prefetch} must be >= 0")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"LoaderConfig.seed={self.seed} must be in [0, 2**64)")

    def process(self) -> tuple[int, int]:
        index = jax.process_index() if self.process_index is None else self.process_index
        count = jax.process_count() if self.process_count is None else self.process_count
        if not 0 <= index < count:
            raise ValueError(f"process_index={index} must be in [0, process_count={count})")
        return index, count


# ---- global shuffle -----------------------------------------------------------------------------

_U64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """splitmix64 on a Python int: derives the round keys."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (the multiplies wrap)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 4) -> np.ndarray:
    """Where positions `i` (in [0, n)) land in a pseudo-random permutation of [0, n) keyed by (seed, epoch).

    A `rounds`-round Feistel network on 2h-bit integers (2^2h < 4n), cycle-walked back into [0, n)
    (fewer than 4 steps on average): a bijection, O(1) memory, vectorised, the same on every machine.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    keys, k = [], _splitmix(seed ^ _splitmix(epoch))
    for _ in range(rounds):
        k = _splitmix(k)
        keys.append(np.uint64(k))
    x = np.asarray(i, np.uint64).copy()
    todo = np.arange(x.size)
    while todo.size:
        y = x[todo]
        left, right = y >> shift, y & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        y = (left << shift) | right
        x[todo] = y
        todo = todo[y >= np.uint64(n)]
    return x.astype(np.int64)


class DocumentOrder(grain.MapDataset):
    """This process's documents in order: global shuffle per epoch, then every P-th from index p.

    Position k is global position g = p + k * P; its document is permute(g mod n) under the key
    (seed, g div n), so every epoch is a fresh permutation of the corpus and processes read
    disjoint documents whose union, within an epoch, is the whole corpus. Ids are computed a
    block at a time, so a document costs one lookup and one read.
    """

    def __init__(self, source, cfg: LoaderConfig):
        super().__init__()
        self._source, self._n = source, len(source)
        if not self._n:
            raise ValueError("the corpus holds no documents")
        self._seed, self._shuffle = cfg.seed, cfg.shuffle
        self._index, self._count = cfg.process()
        total = sys.maxsize if cfg.num_epochs is None else self._n * cfg.num_epochs
        self._len = len(range(self._index, total, self._count))
        self._block_len = int(np.clip(self._n // self._count, 1, 4096))   # a block spans at most 2 epochs
        self._block = (0, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return (f"DocumentOrder(n={self._n}, seed={self._seed}, shuffle={self._shuffle}, "
                f"slice={self._index}::{self._count})")

    def ids(self, start: int, stop: int) -> np.ndarray:
        """The document ids at this process's positions [start, stop)."""
        epoch, i = np.divmod(self._index + self._count * np.arange(start, stop, dtype=np.int64), self._n)
        if self._shuffle:
            for e in np.unique(epoch).tolist():
                here = epoch == e
                i[here] = permute(i[here], self._n, self._seed, e)
        return i

    def doc_id(self, index: int) -> int:
        start, ids = self._block
        if not 0 <= index - start < len(ids):
            if not 0 <= index < self._len:
                raise IndexError(f"position {index} is out of range for {self._len} documents")
            start = index - index % self._block_len
            ids = self.ids(start, min(start + self._block_len, self._len))
            self._block = (start, ids)
        return int(ids[index - start])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._source[self.doc_id(index)]

    def _getitems(self, indices):
        return [self[i] for i in indices]


def documents(source, cfg: LoaderConfig) -> DocumentOrder:
    """This process's documents in order (see `DocumentOrder`); `source`: anything with len and [i]."""
    return DocumentOrder(source, cfg)


# ---- packing ------------------------------------------------------------------------------------

class _ReadAhead:
    """docs[i] for a reader moving forward: blocks of documents read by a thread pool ahead of it.

    Reads release the GIL (ArrayRecord decodes in C++), so on a cold cache several are in flight
    at once. A jump (a restored state) drops the blocks in flight and starts again there.
    """

    def __init__(self, docs: grain.MapDataset, threads: int, block: int = 16):
        self._docs, self._block, self._depth = docs, block, 2 * threads
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="orcinus-read")
        self._pending: collections.deque = collections.deque()       # (first position, future), in order
        self._submitted = 0

    def _read(self, start: int, stop: int) -> list:
        return [self._docs[i] for i in range(start, stop)]

    def __getitem__(self, index: int):
        start = index - index % self._block
        while self._pending and self._pending[0][0] < start:
            self._pending.popleft()
        if not self._pending or self._pending[0][0] != start:
            for _, f in self._pending:
                f.cancel()
            self._pending.clear()
            self._submitted = start
        while len(self._pending) < self._depth and self._submitted < len(self._docs):
            stop = min(self._submitted + self._block, len(self._docs))
            self._pending.append((self._submitted, self._pool.submit(self._read, self._submitted, stop)))
            self._submitted = stop
        return self._pending[0][1].result()[index - start]

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


class PackedBatches(grain.IterDataset):
    """Concat-then-split packing of a MapDataset of documents into [B, T] batches, one step per batch.

    Documents are laid end to end; a row is cut every T tokens and the rest of the document
    continues the next row as a new piece. The state is (next document, offset into it): two ints.
    A run out of documents drops the incomplete last batch. `read_threads` > 0 reads documents
    ahead of the packer on that many threads (for storage with latency: a cold cache, a network).
    """

    def __init__(self, docs: grain.MapDataset, seq_len: int, batch_size: int, read_threads: int = 0):
        super().__init__(docs)
        self.docs, self.seq_len, self.batch_size, self.read_threads = docs, seq_len, batch_size, read_threads

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self.docs, self.seq_len, self.batch_size, self.read_threads)

    def __str__(self) -> str:
        return f"PackedBatches(seq_len={self.seq_len}, batch_size={self.batch_size})"


class _PackedIterator(grain.DatasetIterator):
    """Copies whole document chunks into a flat [B*T] buffer (one slice per document), then derives
    positions, segment ids, targets and weights from the piece starts with a few array operations.
    """

    def __init__(self, docs: grain.MapDataset, seq_len: int, batch_size: int, read_threads: int = 0):
        super().__init__()
        self._T, self._B, self._len = seq_len, batch_size, len(docs)
        self._docs = _ReadAhead(docs, read_threads) if read_threads else docs
        self._arange = np.arange(seq_len * batch_size, dtype=np.int32)
        self._row_starts = frozenset(range(0, seq_len * batch_size, seq_len))
        self._next, self._offset, self._doc = 0, 0, None

    def _fill(self, tokens: np.ndarray) -> list[int] | None:
        """Fills `tokens` [B*T] from the stream; returns where documents start in it (None: out of documents)."""
        size, filled, doc_starts = tokens.size, 0, []
        nxt, offset, doc = self._next, self._offset, self._doc
        while filled < size:
            if doc is None:
                if nxt >= self._len:
                    return None
                doc = self._docs[nxt]
            take = min(size - filled, len(doc) - offset)
            tokens[filled:filled + take] = doc[offset:offset + take]
            doc_starts.append(filled)
            filled, offset = filled + take, offset + take
            if offset == len(doc):
                nxt, offset, doc = nxt + 1, 0, None
        self._next, self._offset, self._doc = nxt, offset, doc
        return doc_starts

    def __next__(self) -> dict[str, np.ndarray]:
        size = self._B * self._T
        tokens = np.empty(size, np.int32)
        doc_starts = self._fill(tokens)
        if doc_starts is None:
            raise StopIteration
        starts = sorted(self._row_starts.union(doc_starts))         # piece starts: rows and documents cut pieces
        ends = starts[1:] + [size]
        lengths = np.subtract(ends, starts)
        positions = self._arange - np.repeat(np.asarray(starts, np.int32), lengths)
        segment, numbers = 0, []
        for s in starts:                                            # 1, 2, ... within each row
            segment = 1 if s % self._T == 0 else segment + 1
            numbers.append(segment)
        segments = np.repeat(np.asarray(numbers, np.int32), lengths)
        last = np.subtract(ends, 1)                                 # each piece's last token
        targets = np.empty(size, np.int32)
        targets[:-1] = tokens[1:]
        targets[last] = 0
        weights = np.ones(size, np.float32)
        weights[last] = 0.0
        shape = (self._B, self._T)
        return dict(tokens=tokens.reshape(shape), positions=positions.reshape(shape),
                    segment_ids=segments.reshape(shape), targets=targets.reshape(shape),
                    weights=weights.reshape(shape))

    def get_state(self) -> dict:
        return {"next_document": self._next, "offset": self._offset}

    def set_state(self, state: dict):
        self._next, self._offset, self._doc = int(state["next_document"]), int(state["offset"]), None

    def close(self):
        if isinstance(self._docs, _ReadAhead):
            self._docs.close()
        super().close()


def make_dataset(corpus: Corpus | str | os.PathLike | grain.sources.RandomAccessDataSource,
                 cfg: LoaderConfig) -> grain.IterDataset:
    """The whole pipeline as a Grain IterDataset of packed batches (see the module docstring).

    `corpus`: a prepared corpus (its directory or an opened `Corpus`), or any random-access source
    of integer token arrays.
    """
    source = CorpusSource(corpus) if isinstance(corpus, (Corpus, str, os.PathLike)) else corpus
    ds = PackedBatches(documents(source, cfg), cfg.seq_len, cfg.batch_size, cfg.read_threads)
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
