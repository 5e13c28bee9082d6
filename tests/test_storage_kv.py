"""The KV-cache tier: content-addressed latent blocks in TensorStore, capacity, LRU eviction, reopen."""

import jax.numpy as jnp
import numpy as np
import pytest

import model
from storage import KVTier

L, C, R, BLOCK = 3, 16, 8, 64


def tier(path, capacity=8, **kw):
    return KVTier(path, num_layers=L, kv_lora_rank=C, rope_dim=R, capacity_blocks=capacity, dtype="float32", **kw)


def latents(seed, S):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(L, S, C)).astype(np.float32), rng.normal(size=(L, S, R)).astype(np.float32)


def tokens(seed, n):
    return np.random.default_rng(seed).integers(0, 1000, n)


def test_round_trip_of_full_blocks(tmp_path):
    kv = tier(tmp_path)
    toks, (ckv, krope) = tokens(0, 200), latents(0, 200)
    assert kv.put(toks, ckv, krope) == 3                                # 200 tokens = 3 full blocks + 8
    assert kv.match(toks) == 3 and kv.match(toks[:130]) == 2 and kv.match(toks[:63]) == 0
    got_ckv, got_krope = kv.get(toks[:150])
    np.testing.assert_array_equal(got_ckv, ckv[:, :128])
    np.testing.assert_array_equal(got_krope, krope[:, :128])
    assert kv.put(toks, ckv, krope) == 0                                # present: not rewritten
    assert kv.block_bytes == L * BLOCK * (C + R) * 4


def test_keys_address_the_whole_prefix(tmp_path):
    kv = tier(tmp_path)
    toks, (ckv, krope) = tokens(0, 128), latents(0, 128)
    kv.put(toks, ckv, krope)
    other = toks.copy()
    other[0] += 1                                                       # same second block, other prefix
    assert kv.match(other) == 0 and kv.get(other)[0].shape == (L, 0, C)
    shared = np.concatenate([toks[:64], tokens(9, 64)])                 # shares only the first block
    assert kv.match(shared) == 1
    assert kv.put(shared, *latents(9, 128)) == 1 and len(kv) == 3
    np.testing.assert_array_equal(kv.get(shared)[0][:, :64], ckv[:, :64])
    assert KVTier(tmp_path / "ns", num_layers=L, kv_lora_rank=C, rope_dim=R, capacity_blocks=2,
                  namespace="another-model").block_keys(toks) != kv.block_keys(toks)


def test_capacity_and_lru_eviction(tmp_path):
    kv = tier(tmp_path, capacity=4)
    a, b, c = tokens(1, 128), tokens(2, 128), tokens(3, 128)
    kv.put(a, *latents(1, 128))
    kv.put(b, *latents(2, 128))
    assert len(kv) == 4 and kv.stats.evictions == 0
    assert kv.match(a) == 2
    kv.get(a)                                                           # a is now the most recent
    kv.put(c, *latents(3, 128))                                         # evicts b's two blocks
    assert len(kv) == 4 and kv.stats.evictions == 2
    assert kv.match(a) == 2 and kv.match(b) == 0 and kv.match(c) == 2
    np.testing.assert_array_equal(kv.get(c)[0], latents(3, 128)[0])
    np.testing.assert_array_equal(kv.get(a)[1], latents(1, 128)[1])
    long = tokens(4, 64 * 6)                                            # more blocks than capacity: the head
    assert kv.put(long, *latents(4, 64 * 6)) == 4 and kv.match(long) == 4


def test_lru_evicts_a_prefix_from_its_tail(tmp_path):
    kv = tier(tmp_path, capacity=4)
    a = tokens(1, 192)
    kv.put(a, *latents(1, 192))                                         # 3 blocks
    kv.put(tokens(2, 128), *latents(2, 128))                            # needs 2 slots: 1 free + 1 evicted
    assert kv.match(a) == 2                                             # a lost its last block, not its first


def test_reopen_finds_blocks_and_checks_shape(tmp_path):
    toks, (ckv, krope) = tokens(0, 128), latents(0, 128)
    tier(tmp_path).put(toks, ckv, krope)
    again = tier(tmp_path)
    assert len(again) == 2 and again.match(toks) == 2
    as_url = tier(f"file://{tmp_path}")                                 # a kvstore URL (gs://, s3:// alike)
    assert as_url.match(toks) == 2
    as_spec = tier({"driver": "file", "path": str(tmp_path)})           # a kvstore spec
    np.testing.assert_array_equal(as_spec.get(toks)[1], krope)
    np.testing.assert_array_equal(again.get(toks)[0], ckv)
    with pytest.raises(ValueError, match=r"holds float32\[8, 3, 64, 24\] but this tier is float32\[16, 3, 64, 24\]"):
        tier(tmp_path, capacity=16)
    with pytest.raises(ValueError, match="must be \\[L=3, S, 16\\]"):
        again.put(toks, ckv[:, :, :8], krope)


def test_stores_a_model_latent_cache(tmp_path):
    cfg = model.ModelConfig.preset("tiny", num_layers=2, dtype="bfloat16")
    rng = np.random.default_rng(0)
    cache = model.LatentCache(jnp.asarray(rng.normal(size=(2, 2, 128, cfg.kv_lora_rank)), jnp.bfloat16),
                              jnp.asarray(rng.normal(size=(2, 2, 128, cfg.qk_rope_head_dim)), jnp.bfloat16),
                              jnp.array([128, 100]))
    kv = KVTier.for_model({"driver": "file", "path": str(tmp_path / "tier")}, cfg, capacity_blocks=4)
    assert kv.dtype == jnp.bfloat16 and kv.block_bytes == 2 * 64 * (64 + 16) * 2
    toks = tokens(5, 100)
    assert kv.put_cache(toks, cache, row=1) == 1
    got_ckv, got_krope = kv.get(toks)
    np.testing.assert_array_equal(got_ckv, np.asarray(cache.ckv[:, 1, :64]))
    np.testing.assert_array_equal(got_krope, np.asarray(cache.krope[:, 1, :64]))
