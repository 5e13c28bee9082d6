"""Model-level properties: causality, absorbed == naive, scan == loop, jit == eager, remat, MTP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
from model import ModelConfig, YarnConfig

CFG = ModelConfig.preset("tiny", d_model=64, num_layers=3, moe_ffn_dim=32, dense_ffn_dim=96, q_lora_rank=48,
                         rope_scaling=YarnConfig(factor=4, original_max_position=16), init_std=0.1)


forward = nnx.jit(lambda m, t, positions=None, segment_ids=None: m.forward(t, positions=positions,
                                                                           segment_ids=segment_ids))
main_logits = nnx.jit(lambda m, t: m(t))
extend = nnx.jit(lambda m, t, c, num_new=None, absorbed=True: m.extend(t, c, num_new=num_new, absorbed=absorbed),
                 static_argnames="absorbed")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def tiny():
    return model.Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(7), (2, 12), 0, CFG.vocab_size)


def test_public_call_shapes(tiny, tokens):
    out = forward(tiny, tokens)
    assert main_logits(tiny, tokens).shape == (2, 12, CFG.vocab_size) and main_logits(tiny, tokens).dtype == jnp.float32
    assert out.mtp_logits.shape == (CFG.mtp_depth, 2, 12, CFG.vocab_size)
    assert out.expert_counts.shape == (CFG.num_moe_layers + CFG.mtp_depth, CFG.num_routed_experts)
    assert np.all(np.asarray(out.expert_counts.sum(1)) == 24 * CFG.num_experts_per_tok)


def test_causality_through_gradients(tiny, tokens):
    t = 6
    emb = tiny.embed_tokens(tokens)

    def logit_at_t(e):       # main and MTP logits at position t, as a function of the input embeddings
        m = tiny
        cfg = m.cfg
        positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
        from model import mla
        from model.rope import rope_tables
        from model.transformer import _scan_step, run_stack
        rope, mask = rope_tables(positions, cfg), mla.causal_mask(positions, positions)
        h = e
        for stack in m._stacks():
            h, _ = run_stack(stack, h, lambda layer, x, _: _scan_step(layer, x, rope, mask, cfg), None, cfg)
        return m.logits_from(h, m.final_norm)[:, t].sum()

    g = jax.jit(jax.grad(logit_at_t))(emb)
    influence = np.asarray(jnp.abs(g).sum(axis=(0, 2)))
    assert np.all(influence[:t + 1] > 0) and np.all(influence[t + 1:] == 0)


def test_mtp_sees_exactly_one_more_token(tiny, tokens):
    """MTP depth-1 logits at position t may depend on tokens <= t+1 and no later ones."""
    t = 4
    base = forward(tiny, tokens).mtp_logits[0, :, t]
    changed_next = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % CFG.vocab_size)
    changed_later = tokens.at[:, t + 2:].set((tokens[:, t + 2:] + 1) % CFG.vocab_size)
    assert rel_err(forward(tiny, changed_later).mtp_logits[0, :, t], base) == 0
    assert rel_err(forward(tiny, changed_next).mtp_logits[0, :, t], base) > 1e-3


def test_absorbed_equals_naive_incremental(tiny, tokens):
    full = main_logits(tiny, tokens)
    for absorbed_prefill in (False, True):
        cache = tiny.init_cache(2, 16)
        logits, cache = extend(tiny, tokens[:, :5], cache, absorbed=absorbed_prefill)
        steps = [logits]
        for i in range(5, 12):
            logits, cache = extend(tiny, tokens[:, i:i + 1], cache, absorbed=True)
            steps.append(logits)
        assert rel_err(jnp.concatenate(steps, 1), full) < 1e-5
        assert list(np.asarray(cache.lengths)) == [12, 12]


def test_absorbed_equals_naive_attention_directly():
    from model import mla
    from model.rope import rope_tables
    layer = mla.MLA(CFG, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 9, CFG.d_model))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    cos, sin = rope_tables(pos, CFG)
    qn, qr = mla.queries(layer, x, cos, sin, CFG)
    ckv, kr = mla.latents(layer, x, cos, sin, CFG)
    mask = mla.causal_mask(pos, pos)
    naive = mla.attend_naive(layer, qn, qr, ckv, kr, mask, CFG)
    absorbed = mla.attend_absorbed(layer, qn, qr, ckv, kr, mask, CFG)
    assert rel_err(absorbed, naive) < 1e-5


def test_ragged_prefill_lengths(tiny, tokens):
    """Rows with different prompt lengths in one prefill match running each row alone."""
    cache = tiny.init_cache(2, 16)
    logits, cache = extend(tiny, tokens[:, :8], cache, num_new=jnp.array([8, 5]), absorbed=False)
    nxt, cache = extend(tiny, tokens[:, 8:9], cache, absorbed=True)
    alone = main_logits(tiny, jnp.concatenate([tokens[1:, :5], tokens[1:, 8:9]], axis=1))
    assert rel_err(logits[1, :5], alone[0, :5]) < 1e-5
    assert rel_err(nxt[1, 0], alone[0, 5]) < 1e-5
    assert list(np.asarray(cache.lengths)) == [9, 6]


def test_segment_ids_isolate_packed_documents(tiny, tokens):
    seg = jnp.array([[0] * 5 + [1] * 7] * 2)
    pos = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None].repeat(2, 0)
    packed = forward(tiny, tokens, positions=pos, segment_ids=seg).logits
    assert rel_err(packed[:, 5:], main_logits(tiny, tokens[:, 5:])) < 1e-5
    assert rel_err(packed[:, :5], main_logits(tiny, tokens[:, :5])) < 1e-5


def _loss(m, toks):
    out = m.forward(toks)
    return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits ** 2) + out.balance_loss


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots")])
def test_scan_loop_and_remat_agree(tokens, variant):
    ref = model.Transformer(CFG, rngs=nnx.Rngs(0))
    other = model.Transformer(CFG.replace(**variant), rngs=nnx.Rngs(0))
    assert rel_err(main_logits(other, tokens), main_logits(ref, tokens)) < 1e-6
    g_ref = nnx.jit(nnx.grad(_loss))(ref, tokens)
    g_other = nnx.jit(nnx.grad(_loss))(other, tokens)
    for a, b in zip(jax.tree.leaves(g_other), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-5


def test_jit_equals_eager(tiny, tokens):
    eager = tiny.forward(tokens)
    jitted = nnx.jit(lambda m, t: m.forward(t))(tiny, tokens)
    assert rel_err(jitted.logits, eager.logits) < 1e-6
    assert rel_err(jitted.mtp_logits, eager.mtp_logits) < 1e-6
    np.testing.assert_array_equal(jitted.expert_counts, eager.expert_counts)


def test_bfloat16_compute_runs_close_to_float32(tokens):
    f32 = model.Transformer(CFG, rngs=nnx.Rngs(0))
    bf16 = model.Transformer(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = main_logits(bf16, tokens)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(out, main_logits(f32, tokens)) < 5e-2
