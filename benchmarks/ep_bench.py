"""Expert parallelism on 8 simulated CPU devices: bytes moved per token per layer, and wall time.

Bytes: what each mode puts on the wire per token and layer (dispatch + combine), for bf16 and
FP8 payloads, from the routing of the run itself: `ragged` is what a ragged exchange (DeepEP,
`ragged_all_to_all`) moves; `padded` is what our XLA:CPU formulation moves (fixed blocks).
Time: one MoE layer forward, EP (8 ranks) beside the single-device layer, same process.

    python -m benchmarks.ep_bench [--tokens 4096] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
import sharding  # noqa: E402
from benchmarks.gpu_suite import time_fn  # noqa: E402
from benchmarks.report import publish, table  # noqa: E402
from model.moe import MoE, route, routed_experts  # noqa: E402


def wire_bytes(topk: np.ndarray, ranks: int, experts: int, d: int, mode: str, fp8: bool, m: int) -> dict:
    n_total, k = topk.shape
    per_rank = n_total // ranks
    local = experts // ranks
    row = d + 4 * max(d // 128, 1) if fp8 else 2 * d                  # e4m3 + fp32 scales, or bf16
    back = 2 * d                                                      # combine returns bf16
    if mode == "normal":
        visits = np.zeros((n_total, ranks), bool)
        for j in range(k):
            visits[np.arange(n_total), topk[:, j] // local] = True
        ragged = visits.sum() * (row + back)
        padded = n_total * ranks * (row + back)
    else:
        hits = np.zeros((n_total, experts), bool)
        for j in range(k):
            hits[np.arange(n_total), topk[:, j]] = True
        ragged = hits.sum() * (row + back)
        padded = ranks * experts * m * (row + back)                   # every rank: E * M rows each way
    return dict(ragged=ragged / n_total, padded=padded / n_total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cfg = model.ModelConfig.preset("tiny", d_model=256, moe_ffn_dim=128, num_routed_experts=64,
                                   num_expert_groups=8, num_limited_groups=4, num_experts_per_tok=6)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (args.tokens, cfg.d_model))
    r = jax.jit(lambda l, x: route(jnp.einsum("nd,de->ne", x, l.router[...]), l.bias[...], cfg))(layer, x)
    topk = np.asarray(r.experts)
    ranks = 8
    mesh = sharding.make_mesh(expert=ranks)
    m = args.tokens // ranks
    rows, base = [], time_fn(jax.jit(lambda l, x, r: routed_experts(l, x, r, cfg)), layer, x, r, repeat=5)
    rows.append(["single device (CPU tiled experts)", "-", "-", "-", base * 1e3, 1.0])
    for mode, fp8 in (("normal", False), ("low_latency", False), ("low_latency", True)):
        opts = sharding.EPOptions(mode, fp8=fp8)
        f = jax.jit(lambda l, x, r: sharding.ep_moe(l, x, r, cfg, mesh=mesh, options=opts))
        t = time_fn(f, layer, x, r, repeat=5)
        b = wire_bytes(topk, ranks, cfg.num_routed_experts, cfg.d_model, mode, fp8, m)
        rows.append([f"EP{ranks} {mode}", "fp8" if fp8 else "bf16", f"{b['ragged']:.0f}", f"{b['padded']:.0f}",
                     t * 1e3, base / t])
    body = (f"One MoE layer: {args.tokens} tokens, d_model {cfg.d_model}, {cfg.num_routed_experts} experts, "
            f"top-{cfg.num_experts_per_tok}, 8 simulated CPU devices on this machine's cores (so EP time "
            f"measures overhead, not scaling). Bytes are per token per layer, dispatch + combine.\n\n"
            + table(["layer", "payload", "bytes/token ragged", "bytes/token padded (ours on CPU)", "forward ms",
                     "speed vs single"], rows))
    publish("Expert parallelism: bytes on the wire and CPU wall time", body, write=not args.no_write)


if __name__ == "__main__":
    main()
