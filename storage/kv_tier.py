"""The KV-cache tier: content-addressed blocks of the MLA latent cache in TensorStore (3FS's KVCache role).

A block is `block_size` (64) tokens of every layer's latent cache: the normalised latent ckv
[L, 64, C] and the roped key krope [L, 64, R] (C = kv_lora_rank, R = qk_rope_head_dim; V3 caches
512 + 64 values per token per layer). Its key is the hash of the whole token prefix up to the
block's end (chained: key_i = sha256(key_{i-1} || tokens of block i)), so equal prefixes share
blocks and a block is only reachable through its full prefix.

On storage: one zarr array `blocks` [capacity, L, 64, C + R], one chunk per block (slot), and a
`tags` array [capacity, 32] holding each slot's key. The tag is written with the block and
checked on every read, and the index is rebuilt from the tags on open, so a reopened tier finds
its blocks and a stale slot can never be served. `kvstore` is any TensorStore kvstore: a local
path, or a spec such as {"driver": "gcs", "bucket": ..., "path": ...} or {"driver": "s3", ...}.
Capacity is a number of slots; when full, the least recently used block is evicted (a lookup
refreshes a prefix's blocks last-to-first, so a prefix's head outlives its tail). One writer per
tier directory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading

import numpy as np
import tensorstore as ts
from jaxtyping import Float

KEY_BYTES = 32


@dataclasses.dataclass
class TierStats:
    hits: int = 0               # blocks served
    misses: int = 0             # lookups that stopped at a block not in the tier
    writes: int = 0             # blocks written
    evictions: int = 0          # blocks evicted to make room


def _kvstore_spec(kvstore: str | os.PathLike | dict) -> dict:
    if isinstance(kvstore, dict):
        return dict(kvstore)
    kvstore = str(kvstore)
    return {"driver": "file", "path": kvstore} if "://" not in kvstore else kvstore


def _sub(spec: dict | str, name: str) -> dict | str:
    if isinstance(spec, str):                                   # a URL such as "gs://bucket/dir"
        return spec.rstrip("/") + "/" + name + "/"
    return {**spec, "path": spec.get("path", "").rstrip("/") + "/" + name + "/"}


class KVTier:
    """Latent-cache blocks keyed by token prefix, in TensorStore, with a capacity and LRU eviction."""

    def __init__(self, kvstore: str | os.PathLike | dict, *, num_layers: int, kv_lora_rank: int,
                 rope_dim: int, capacity_blocks: int, block_size: int = 64, dtype: str = "bfloat16",
                 namespace: str = ""):
        if capacity_blocks <= 0:
            raise ValueError(f"capacity_blocks={capacity_blocks} must be positive")
        self.num_layers, self.kv_lora_rank, self.rope_dim = num_layers, kv_lora_rank, rope_dim
        self.block_size, self.capacity = block_size, capacity_blocks
        self.dtype = np.dtype(ts.dtype(dtype).numpy_dtype)
        self._root = hashlib.sha256(f"orcinus.kv/{namespace}".encode()).digest()
        spec = _kvstore_spec(kvstore)
        self._blocks = self._open(_sub(spec, "blocks"), dtype, [num_layers, block_size, kv_lora_rank + rope_dim])
        self._tags = self._open(_sub(spec, "tags"), "uint8", [KEY_BYTES])
        self._lru: collections.OrderedDict[bytes, int] = collections.OrderedDict()   # key -> slot, LRU first
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.stats = TierStats()
        self._rebuild_index()

    @classmethod
    def for_model(cls, kvstore, cfg, *, capacity_blocks: int, **kw) -> KVTier:
        """A tier shaped for a ModelConfig (num_layers, kv_lora_rank, qk_rope_head_dim, dtype)."""
        kw.setdefault("dtype", cfg.dtype)
        return cls(kvstore, num_layers=cfg.num_layers, kv_lora_rank=cfg.kv_lora_rank,
                   rope_dim=cfg.qk_rope_head_dim, capacity_blocks=capacity_blocks, **kw)

    def _open(self, kvstore, dtype: str, inner: list[int]) -> ts.TensorStore:
        shape = [self.capacity, *inner]
        try:
            arr = ts.open({"driver": "zarr", "kvstore": kvstore}, open=True).result()
        except ValueError:                                      # not there yet: create it
            return ts.open({"driver": "zarr", "kvstore": kvstore,
                            "metadata": {"compressor": None, "chunks": [1, *inner]}},
                           create=True, dtype=dtype, shape=shape).result()
        if list(arr.shape) != shape or arr.dtype != ts.dtype(dtype):
            raise ValueError(f"KV tier at {kvstore} holds {arr.dtype.name}{list(arr.shape)} but this tier is "
                             f"{dtype}{shape} (capacity, layers, block, latent+rope); open it with the shape it "
                             f"was created with, or use a new directory")
        return arr

    def _rebuild_index(self):
        tags = self._tags.read().result()                      # [capacity, 32]; zero = empty slot
        empty = bytes(KEY_BYTES)
        for slot, tag in enumerate(tags):
            key = tag.tobytes()
            if key == empty:
                self._free.append(slot)
            else:
                self._lru[key] = slot
        self._free.reverse()

    # ---- keys -----------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.block_size * (self.kv_lora_rank + self.rope_dim) * self.dtype.itemsize

    def block_keys(self, tokens) -> list[bytes]:
        """The key of each full block of `tokens`: the hash of the prefix ending with that block."""
        tokens = np.asarray(tokens, "<i4").reshape(-1)
        keys, key = [], self._root
        for i in range(len(tokens) // self.block_size):
            key = hashlib.sha256(key + tokens[i * self.block_size:(i + 1) * self.block_size].tobytes()).digest()
            keys.append(key)
        return keys

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru

    def match(self, tokens) -> int:
        """How many leading full blocks of `tokens` the tier holds (tokens covered = that * block_size)."""
        n = 0
        for key in self.block_keys(tokens):
            if key not in self._lru:
                break
            n += 1
        return n

    # ---- write ----------------------------------------------------------------------------------
    def put(self, tokens, ckv: Float[np.ndarray, "L S C"], krope: Float[np.ndarray, "L S R"]) -> int:
        """Store every full block of `tokens` (S >= len(tokens) cached positions); returns blocks written.

        Blocks already present are refreshed, not rewritten."""
        keys = self.block_keys(tokens)
        L, S = np.shape(ckv)[:2]
        if (L, np.shape(ckv)[2], np.shape(krope)[2]) != (self.num_layers, self.kv_lora_rank, self.rope_dim) \
                or np.shape(krope)[:2] != (L, S) or S < len(keys) * self.block_size:
            raise ValueError(f"ckv {np.shape(ckv)} / krope {np.shape(krope)} must be [L={self.num_layers}, S, "
                             f"{self.kv_lora_rank}] / [L, S, {self.rope_dim}] with S >= {len(keys) * self.block_size}")
        ckv, krope = np.asarray(ckv, self.dtype), np.asarray(krope, self.dtype)
        keys, writes = keys[:self.capacity], []
        with self._lock:
            self._touch(keys)                                   # never evict this prefix's own blocks
            for i, key in enumerate(keys):
                if key in self._lru:
                    continue
                slot = self._take_slot()
                cols = slice(i * self.block_size, (i + 1) * self.block_size)
                block = np.concatenate([ckv[:, cols], krope[:, cols]], axis=-1)      # [L, 64, C+R]
                writes.append((key, slot, block))
            futures = [self._tags[slot].write(np.zeros(KEY_BYTES, np.uint8)) for _, slot, _ in writes]
            [f.result() for f in futures]                       # clear tags first: a torn write reads as a miss
            futures = [self._blocks[slot].write(block) for _, slot, block in writes]
            [f.result() for f in futures]
            futures = [self._tags[slot].write(np.frombuffer(key, np.uint8)) for key, slot, _ in writes]
            [f.result() for f in futures]
            for key, slot, _ in writes:
                self._lru[key] = slot
            self._touch(keys)
            self.stats.writes += len(writes)
        return len(writes)

    def put_cache(self, tokens, cache, row: int = 0) -> int:
        """Store the full blocks of one row of a `model.LatentCache` (ckv [L, B, S, C], krope [L, B, S, R])."""
        n = len(tokens) // self.block_size * self.block_size
        return self.put(np.asarray(tokens)[:n], np.asarray(cache.ckv[:, row, :n]), np.asarray(cache.krope[:, row, :n]))

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        _, slot = self._lru.popitem(last=False)
        self.stats.evictions += 1
        return slot

    def _touch(self, keys: list[bytes]):
        for key in reversed(keys):                              # the prefix's head ends most recent
            if key in self._lru:
                self._lru.move_to_end(key)

    # ---- read -----------------------------------------------------------------------------------
    def get(self, tokens) -> tuple[Float[np.ndarray, "L N C"], Float[np.ndarray, "L N R"]]:
        """The cached latents of the longest stored prefix of `tokens`: N = blocks * block_size (maybe 0)."""
        keys = self.block_keys(tokens)
        with self._lock:
            hit = []
            for key in keys:
                if key not in self._lru:
                    break
                hit.append(key)
            slots = [self._lru[k] for k in hit]
            blocks = [self._blocks[s].read() for s in slots]
            tags = [self._tags[s].read() for s in slots]
            blocks = [f.result() for f in blocks]
            good = 0
            for key, tag in zip(hit, tags):
                if tag.result().tobytes() != key:               # overwritten underneath us: stop here
                    break
                good += 1
            self._touch(hit[:good])
            self.stats.hits += good
            self.stats.misses += good < len(keys)
        C = self.kv_lora_rank
        if not good:
            return (np.zeros((self.num_layers, 0, C), self.dtype),
                    np.zeros((self.num_layers, 0, self.rope_dim), self.dtype))
        data = np.concatenate(blocks[:good], axis=1)            # [L, N, C+R]
        return data[..., :C], data[..., C:]
