"""The paged MLA cache: latent ++ roped key per token and layer, in 64-token blocks.

Letters: L layers, N blocks per layer, P tokens per block (64), W values a token (C + R, or
656 bytes in FlashMLA's FP8 layout), C kv_lora_rank, R qk_rope_head_dim, B batch, M blocks per
sequence.

One array holds every layer: [L * N, P, 1, W], FlashMLA's k_cache layout with the layers laid
end to end, so layer l's block b is row l * N + b. A sequence's block table names blocks in
[0, N); the model adds l * N per layer, and the FlashMLA kernel reads the whole array without a
per-layer slice. The allocator hands out block ids; the same id is used in every layer.
On CPU a bfloat16 cache is stored as its uint16 bits (`CacheSpec.bf16_bits`, see there).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Shaped

from pallas_kernels import flash_mla

PAGE = flash_mla.PAGE
CacheDType = Literal["float32", "bfloat16", "fp8"]


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shape and storage of the paged cache (hashable: a static argument of the step functions)."""

    num_layers: int
    num_blocks: int          # per layer
    latent_dim: int          # C
    rope_dim: int            # R
    dtype: CacheDType = "bfloat16"
    # Store a bfloat16 cache as its uint16 bits. XLA:CPU rewrites a bf16 scatter into the pool as a
    # float32 round trip of the whole pool (convert, scatter, convert back: O(pool) per layer and
    # token); an integer scatter updates in place. Readers view what they gather as bfloat16. The
    # engine sets it on CPU; a GPU keeps bfloat16 (the FlashMLA kernel reads the pool directly).
    bf16_bits: bool = False

    def __post_init__(self):
        if self.num_blocks <= 0:
            raise ValueError(f"CacheSpec.num_blocks={self.num_blocks} must be > 0")
        if self.dtype not in ("float32", "bfloat16", "fp8"):
            raise ValueError(f"CacheSpec.dtype={self.dtype!r} must be 'float32', 'bfloat16' or 'fp8'")
        if self.dtype == "fp8" and (self.latent_dim, self.rope_dim) != (flash_mla.D_V, flash_mla.D_ROPE):
            raise ValueError(f"the FP8 cache is FlashMLA's layout: latent {flash_mla.D_V} + rope "
                             f"{flash_mla.D_ROPE}, got {self.latent_dim} + {self.rope_dim}")

    @property
    def width(self) -> int:
        return flash_mla.FP8_TOKEN_BYTES if self.dtype == "fp8" else self.latent_dim + self.rope_dim

    @property
    def storage_dtype(self):
        if self.dtype == "fp8":
            return jnp.dtype(jnp.uint8)
        return jnp.dtype(jnp.uint16 if self.dtype == "bfloat16" and self.bf16_bits else self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs, all layers."""
        return self.num_layers * self.width * jnp.dtype(self.storage_dtype).itemsize


def init_cache(spec: CacheSpec) -> Shaped[Array, "LN P 1 W"]:
    return jnp.zeros((spec.num_layers * spec.num_blocks, PAGE, 1, spec.width), spec.storage_dtype)


def write(cache: Shaped[Array, "LN P 1 W"], layer, ckv: Float[Array, "B T C"], krope: Float[Array, "B T R"],
          slots: Int[Array, "B T"], spec: CacheSpec) -> Shaped[Array, "LN P 1 W"]:
    """Store new tokens at cache slots (block * P + offset within `layer`); slots < 0 are dropped.

    Non-finite values are stored as 0, so the cache holds only finite numbers: a block keeps what
    its last owner wrote, and readers that mask stale slots by probability 0 (serving's attention)
    need no zeroing pass, as 0 * inf or 0 * NaN would not be 0."""
    entry = jnp.concatenate([ckv, krope], axis=-1)                             # [B, T, C+R]
    entry = jnp.where(jnp.isfinite(entry), entry, 0)
    if spec.dtype == "fp8":
        entry = flash_mla.quantize_kv_cache_fp8(entry[:, :, None].astype(jnp.bfloat16))[:, :, 0]
    elif spec.storage_dtype == jnp.uint16:
        entry = lax.bitcast_convert_type(entry.astype(jnp.bfloat16), jnp.uint16)
    rows = jnp.where(slots >= 0, layer * spec.num_blocks + slots // PAGE, cache.shape[0])   # past the end: dropped
    return cache.at[rows, slots % PAGE, 0].set(entry.astype(cache.dtype), mode="drop")


def layer_table(table: Int[Array, "B M"], layer, spec: CacheSpec) -> Int[Array, "B M"]:
    return table + layer * spec.num_blocks


def values(pages: Shaped[Array, "... P 1 W"], spec: CacheSpec) -> Shaped[Array, "... P 1 CR"]:
    """Pages gathered from the pool as numbers: FP8 dequantised to bf16, uint16 bits viewed as bf16."""
    if spec.dtype == "fp8":
        return flash_mla.dequantize_kv_cache_fp8(pages)
    if pages.dtype == jnp.uint16:
        return lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages


def gathered_pool(cache: Shaped[Array, "LN P 1 W"], table: Int[Array, "B M"], spec: CacheSpec):
    """(pages, table) for a reader of a bf16-bits pool: the B x M pages the (layer) table names, as
    bfloat16, and the table renumbered 0 .. B*M-1 to match."""
    b, m = table.shape
    pages = values(cache[jnp.clip(table, 0, cache.shape[0] - 1).reshape(-1)], spec)   # [B*M, P, 1, W]
    return pages, jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)


def gather(cache: Shaped[Array, "LN P 1 W"], layer, table: Int[Array, "B M"], spec: CacheSpec, dtype):
    """A contiguous view of each sequence's cache in `layer`: latent [B, M*P, C], rope [B, M*P, R]."""
    pages = values(cache[layer_table(table, layer, spec)], spec)               # [B, M, P, 1, C+R]
    flat = pages.reshape(table.shape[0], -1, pages.shape[-1]).astype(dtype)   # [B, M*P, C+R]
    return flat[..., :spec.latent_dim], flat[..., spec.latent_dim:]


class BlockAllocator:
    """Free-list allocator of cache block ids, lowest id first (deterministic)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))                    # a stack: pop() gives the lowest

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` block ids, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        if len(self._free) > self.num_blocks:
            raise RuntimeError("block freed twice")


def blocks_for(tokens: int) -> int:
    return -(-tokens // PAGE)
