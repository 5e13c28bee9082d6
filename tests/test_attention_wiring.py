"""cfg.attention = "pallas": the model's training attention through pallas_kernels.mla_attention.

On CPU `mla_attention` runs its jnp reference, so the first test checks the wiring (the q/k/v the
model builds, the scale, packed segments) against the model's own XLA attention; the second runs
the Mosaic GPU kernels themselves in the interpreter inside a model forward.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
from model import mla
from cuda_lowering import lower_for_cuda, pretend_hopper

BASE = dict(vocab_size=128, d_model=64, num_layers=1, num_dense_layers=1, num_heads=2, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, dense_ffn_dim=64,
            moe_ffn_dim=32, num_routed_experts=4, num_expert_groups=1, num_limited_groups=1,
            num_experts_per_tok=2, mtp_depth=1, max_seq_len=256, dtype="bfloat16")


def _packed(T: int):
    """Two rows of packed documents: segment ids and positions restarting at each document."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BASE["vocab_size"], (2, T)).astype(np.int32)
    seg = np.stack([np.repeat([0, 1, 2], [T // 2, T // 4, T - T // 2 - T // 4]), np.zeros(T, int)]).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(n) for n in np.unique(s, return_counts=True)[1]]) for s in seg])
    return jnp.asarray(tokens), jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def _pair(**kw):
    xla = model.Transformer(model.ModelConfig(**{**BASE, **kw}), rngs=nnx.Rngs(0))
    pallas = model.Transformer(model.ModelConfig(**{**BASE, **kw}, attention="pallas"), rngs=nnx.Rngs(0))
    return xla, pallas


def test_pallas_attention_wiring_matches_xla_with_packed_segments():
    xla, pallas = _pair()
    tokens, pos, seg = _packed(128)

    def loss(m):
        out = m.forward(tokens, positions=pos, segment_ids=seg)
        logits = jnp.concatenate([out.logits[None], out.mtp_logits]).astype(jnp.float32)
        return jnp.mean(logits ** 2), logits

    grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (_, want), g_x = grad(xla)
    (_, got), g_p = grad(pallas)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-2, rel                                       # bf16 attention core on both sides
    gx, gp = jax.tree.leaves(nnx.state(g_x, nnx.Param)), jax.tree.leaves(nnx.state(g_p, nnx.Param))
    cos = [float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) for a, b in zip(gx, gp)
           if float(jnp.linalg.norm(a)) > 0]
    assert min(cos) > 0.99, cos


def test_pallas_attention_kernel_interpreted_in_a_model_forward(monkeypatch):
    """The forward kernel itself (GPU interpreter) inside the model agrees with the XLA attention."""
    monkeypatch.setattr(mla, "_INTERPRET", [True])
    xla, pallas = _pair(mtp_depth=0)
    tokens, pos, seg = _packed(128)
    tokens, pos, seg = tokens[:1], pos[:1], seg[:1]
    forward = nnx.jit(lambda m: m.forward(tokens, positions=pos, segment_ids=seg).logits.astype(jnp.float32))
    want, got = forward(xla), forward(pallas)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 2e-2, rel                                      # bf16 attention core on both sides


def test_training_step_as_a_gpu_traces_it_lowers_for_cuda(monkeypatch):
    """V3's GPU training path: FP8 linear layers (DeepGEMM kernels and quantisers) and the Pallas
    attention over packed documents, forward and backward, traced with the GPU branches our dispatch
    takes there and lowered for CUDA, every TMA copy's SMEM alignment checked."""
    pretend_hopper(monkeypatch)
    net = model.Transformer(model.ModelConfig(**BASE, attention="pallas", fp8=True), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    tokens, pos, seg = _packed(128)

    def grads(state):
        def loss(m):
            return jnp.mean(m.forward(tokens, positions=pos, segment_ids=seg).logits.astype(jnp.float32) ** 2)
        return nnx.value_and_grad(loss)(nnx.merge(graphdef, state))

    module = lower_for_cuda(grads, state)
    jitted = set(re.findall(r"func.func private @(\w+?)(?:_\d+)?\(", module))
    # mla_attention's jitted forward and backward kernels, DeepGEMM's GEMM and both quantisers
    assert {"_forward", "_backward", "fp8_gemm_nt", "per_token_cast_to_fp8", "per_block_cast_to_fp8"} <= jitted


def test_pallas_attention_config_errors():
    with pytest.raises(ValueError, match="multiples of 64"):
        model.ModelConfig.preset("tiny", attention="pallas", dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16"):
        model.ModelConfig(**{**BASE, "dtype": "float32"}, attention="pallas")
