"""train.adamw: AdamW with its moments stored in a low-precision dtype (DeepSeek-V3 §3.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train


def _run(tx, steps: int = 30):
    """Minimise a random least-squares problem; returns (params, opt state)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(32,)), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    state = tx.init(params)
    loss = lambda p: jnp.mean((a @ p["w"] + p["b"] - y) ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state, float(loss(params))


def test_float32_moments_equal_optax_adamw():
    """The hand-written moment update is AdamW: with float32 moments it matches optax to rounding."""
    ours, _, _ = _run(train.adamw(1e-2, weight_decay=0.1, moments_dtype=jnp.float32))
    ref, _, _ = _run(optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def test_bfloat16_moments_are_stored_low_and_train_alike():
    params, state, loss = _run(train.adamw(1e-2, weight_decay=0.1, moments_dtype=jnp.bfloat16))
    ref, _, ref_loss = _run(optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1))
    adam = state[0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))            # fp32 master weights
    # 30 steps of lr 1e-2 from the same start: bf16 rounding (8 bits) of the moments moves each
    # step's size by < 2^-8 relative, so the weights agree to well under one step (1e-2).
    np.testing.assert_allclose(params["w"], ref["w"], atol=2e-3)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
