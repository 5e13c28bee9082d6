"""Hugging Face DeepSeek-V2/V3 checkpoints: import into and export from `Transformer`.

Reads a checkpoint directory (config.json + safetensors shards, with or without an index):
per-expert weights, FP8 e4m3 weights with 128x128 `weight_scale_inv` blocks (dequantised),
the MTP module stored as layer `num_hidden_layers + j`, yarn rope parameters in either the
`rope_parameters` (transformers 5) or the legacy `rope_scaling` form. Every tensor of the
checkpoint must be consumed and every parameter of the model filled; anything else is an error
that lists the offending names. Writes the same layout, loadable by `transformers`.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from model.config import ModelConfig, YarnConfig
from model.transformer import Transformer

log = logging.getLogger(__name__)

# ---- safetensors reading (numpy cannot name bf16/fp8, so we map dtypes through ml_dtypes) ----

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
    """Lazy, memory-mapped access to one .safetensors file (format: u64 size, JSON header, bytes)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.header, self.offset = header, 8 + size

    def keys(self):
        return self.header.keys()

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset + start, shape=(end - start,))
        return data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_checkpoint(path: Path) -> dict[str, _SafetensorsFile]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; expected a Hugging Face checkpoint directory")
    where: dict[str, _SafetensorsFile] = {}
    for file in files:
        st = _SafetensorsFile(file)
        for key in st.keys():
            where[key] = st
    return where


def _dequantize(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
    """FP8 weight [out, in] with per-128x128-block scales [ceil(out/128), ceil(in/128)]."""
    rows, cols = w.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if scale_inv.shape != want:
        raise ValueError(f"weight_scale_inv shape {scale_inv.shape} does not match weight {w.shape} (want {want})")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:rows, :cols]
    return w.astype(np.float32) * scale


# ---- config translation ---------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"config.json model_type={kind!r}: only deepseek_v2 and deepseek_v3 are supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' is supported")
    if hf.get("attention_bias", False):
        raise ValueError("config.json attention_bias=true is not supported (DeepSeek models have none)")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json moe_layer_freq={hf['moe_layer_freq']}: only 1 is supported")
    if not hf.get("rope_interleave", True):
        raise ValueError("config.json rope_interleave=false is not supported; DeepSeek checkpoints use interleaved rope")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json rope type {rope_type!r}: only 'default' and 'yarn' are supported")
    yarn = None
    if rope_type == "yarn":
        if rope.get("attention_factor") is not None:
            raise ValueError("config.json rope attention_factor is not supported; give mscale/mscale_all_dim")
        yarn = YarnConfig(factor=float(rope["factor"]),
                          original_max_position=int(rope["original_max_position_embeddings"]),
                          beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                          mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0))
    v3 = kind == "deepseek_v3"
    grouped = v3 or hf.get("topk_method", "greedy") == "group_limited_greedy"
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_dense_layers=hf.get("first_k_dense_replace", 0), num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], dense_ffn_dim=hf["intermediate_size"],
        moe_ffn_dim=hf["moe_intermediate_size"], num_routed_experts=hf["n_routed_experts"],
        num_shared_experts=hf.get("n_shared_experts") or 0, num_experts_per_tok=hf["num_experts_per_tok"],
        num_expert_groups=(hf.get("n_group") or 1) if grouped else 1,
        num_limited_groups=(hf.get("topk_group") or 1) if grouped else 1,
        score_func=hf.get("scoring_func", "sigmoid" if v3 else "softmax"),
        group_score="top2_sum" if v3 else "max", router_bias=v3,
        norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), rms_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=yarn, max_seq_len=hf.get("max_position_embeddings", 4096),
        mtp_depth=hf.get("num_nextn_predict_layers", 0) if v3 else 0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02))
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
    v3 = cfg.score_func == "sigmoid" and cfg.router_bias and cfg.group_score == "top2_sum"
    v2 = cfg.score_func == "softmax" and not cfg.router_bias and cfg.group_score == "max" and not cfg.norm_topk_prob
    if not (v3 or v2):
        raise ValueError("this config matches neither transformers' DeepseekV3 routing (sigmoid + bias + top-2 group "
                         "score) nor DeepseekV2's (softmax, no bias, max group score, no top-k normalisation)")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        y = cfg.rope_scaling
        rope.update(rope_type="yarn", factor=y.factor, original_max_position_embeddings=y.original_max_position,
                    beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
    hf = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        first_k_dense_replace=cfg.num_dense_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        intermediate_size=cfg.dense_ffn_dim, moe_intermediate_size=cfg.moe_ffn_dim,
        n_routed_experts=cfg.num_routed_experts, n_shared_experts=cfg.num_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.num_expert_groups,
        topk_group=cfg.num_limited_groups, norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.score_func,
        routed_scaling_factor=cfg.routed_scaling_factor, rms_norm_eps=cfg.rms_eps, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, attention_bias=False, rope_parameters=rope,
        rope_theta=cfg.rope_theta, torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
    if v3:
        hf.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_interleave=True,
                  topk_method="noaux_tc", num_nextn_predict_layers=cfg.mtp_depth)
    else:
        hf.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
                  topk_method="group_limited_greedy" if cfg.num_expert_groups > 1 else "greedy")
    return hf


# ---- tensor layout: (our path, HF name, HF -> ours, ours -> HF) -----------------------------------

T = lambda w: w.T  # noqa: E731  (HF Linear stores [out, in]; we store [in, out])
Same = lambda w: w  # noqa: E731


def _heads_in(h: int) -> tuple[Callable, Callable]:
    """[H*X, in] <-> [in, H, X]."""
    return (lambda w: w.T.reshape(w.shape[1], h, -1), lambda a: a.reshape(a.shape[0], -1).T)


def _block_entries(cfg: ModelConfig, use_moe: bool) -> list[tuple[tuple[str, ...], str, Callable, Callable]]:
    H = cfg.num_heads
    q_in, q_out = _heads_in(H)
    e = [(("attn_norm", "weight"), "input_layernorm.weight", Same, Same),
         (("ffn_norm", "weight"), "post_attention_layernorm.weight", Same, Same),
         (("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", Same, Same),
         (("attn", "wo"), "self_attn.o_proj.weight",
          lambda w: w.T.reshape(H, cfg.v_head_dim, -1), lambda a: a.reshape(-1, a.shape[-1]).T)]
    if cfg.q_lora_rank is None:
        e.append((("attn", "wq"), "self_attn.q_proj.weight", q_in, q_out))
    else:
        e += [(("attn", "wq_a"), "self_attn.q_a_proj.weight", T, T),
              (("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", Same, Same),
              (("attn", "wq_b"), "self_attn.q_b_proj.weight", q_in, q_out)]
    if use_moe:
        e += [(("ffn", "router"), "mlp.gate.weight", T, T)]
        if cfg.router_bias:
            e += [(("ffn", "bias"), "mlp.gate.e_score_correction_bias", Same, Same)]
        if cfg.num_shared_experts:
            e += [(("ffn", "shared", f"w_{n}"), f"mlp.shared_experts.{n}_proj.weight", T, T)
                  for n in ("gate", "up", "down")]
    else:
        e += [(("ffn", f"w_{n}"), f"mlp.{n}_proj.weight", T, T) for n in ("gate", "up", "down")]
    return e


def _split_kv_a(cfg: ModelConfig, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return w[:cfg.kv_lora_rank].T, w[cfg.kv_lora_rank:].T


def _split_kv_b(cfg: ModelConfig, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    per_head = w.reshape(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    return (per_head[:, :cfg.qk_nope_head_dim].transpose(2, 0, 1),
            per_head[:, cfg.qk_nope_head_dim:].transpose(2, 0, 1))


def _join_kv_b(w_uk: np.ndarray, w_uv: np.ndarray) -> np.ndarray:
    per_head = np.concatenate([w_uk.transpose(1, 2, 0), w_uv.transpose(1, 2, 0)], axis=1)   # [H, K+V, C]
    return per_head.reshape(-1, per_head.shape[-1])


def _layer_slots(cfg: ModelConfig) -> list[tuple[tuple, int | None, str, bool]]:
    """(our block prefix, index in its stack or None, HF layer prefix, is MoE) for every block."""
    slots = []
    for i in range(cfg.num_layers):
        dense = i < cfg.num_dense_layers
        stack = "dense_layers" if dense else "moe_layers"
        slots.append(((stack,), i if dense else i - cfg.num_dense_layers, f"model.layers.{i}.", not dense))
    for j in range(cfg.mtp_depth):
        slots.append((("mtp", j, "block"), None, f"model.layers.{cfg.num_layers + j}.", cfg.num_moe_layers > 0))
    return slots


def _hf_names(cfg: ModelConfig) -> set[str]:
    """Every tensor name the checkpoint of this config holds (FP8 scales aside)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    for _, _, hf, use_moe in _layer_slots(cfg):
        names |= {hf + name for _, name, _, _ in _block_entries(cfg, use_moe)}
        names |= {hf + "self_attn.kv_a_proj_with_mqa.weight", hf + "self_attn.kv_b_proj.weight"}
        if use_moe:
            names |= {f"{hf}mlp.experts.{x}.{n}_proj.weight" for x in range(cfg.num_routed_experts)
                      for n in ("gate", "up", "down")}
    for j in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.num_layers + j}."
        names |= {hf + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                   "embed_tokens.weight", "shared_head.head.weight")}
    return names


def _to_ours(cfg: ModelConfig, read: Callable[[str], np.ndarray]) -> dict[tuple, np.ndarray]:
    """Every parameter of ours (flat path -> array, layers stacked) from HF names via read()."""
    out: dict[tuple, np.ndarray] = {("embed",): read("model.embed_tokens.weight"),
                                    ("final_norm", "weight"): read("model.norm.weight")}
    if not cfg.tie_embeddings:
        out[("head",)] = read("lm_head.weight").T
    stacked: dict[tuple, list] = {}

    def put(prefix, index, path, value):
        if index is None:
            out[prefix + path] = value
        else:
            stacked.setdefault(prefix + path, []).append(value)

    for prefix, index, hf, use_moe in _layer_slots(cfg):
        for path, name, load, _ in _block_entries(cfg, use_moe):
            put(prefix, index, path, load(read(hf + name)))
        wkv_a, wk_rope = _split_kv_a(cfg, read(hf + "self_attn.kv_a_proj_with_mqa.weight"))
        w_uk, w_uv = _split_kv_b(cfg, read(hf + "self_attn.kv_b_proj.weight"))
        for path, value in ((("attn", "wkv_a"), wkv_a), (("attn", "wk_rope"), wk_rope),
                            (("attn", "w_uk"), w_uk), (("attn", "w_uv"), w_uv)):
            put(prefix, index, path, value)
        if use_moe:
            for n in ("gate", "up", "down"):
                experts = [read(f"{hf}mlp.experts.{x}.{n}_proj.weight").T for x in range(cfg.num_routed_experts)]
                put(prefix, index, ("ffn", f"w_{n}"), np.stack(experts))
    for j in range(cfg.mtp_depth):
        hf = f"model.layers.{cfg.num_layers + j}."
        out[("mtp", j, "enorm", "weight")] = read(hf + "enorm.weight")
        out[("mtp", j, "hnorm", "weight")] = read(hf + "hnorm.weight")
        out[("mtp", j, "eh_proj")] = read(hf + "eh_proj.weight").T
        out[("mtp", j, "norm", "weight")] = read(hf + "shared_head.norm.weight")
        read(hf + "embed_tokens.weight")          # shared with the main model: consumed, not stored twice
        read(hf + "shared_head.head.weight")
    out.update({path: np.stack(values) for path, values in stacked.items()})
    return out


def _from_ours(cfg: ModelConfig, ours: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `_to_ours`: HF name -> array."""
    head = ours[("embed",)].T if cfg.tie_embeddings else ours[("head",)]
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": ours[("embed",)],
                                 "model.norm.weight": ours[("final_norm", "weight")]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = head.T
    for prefix, index, name, use_moe in _layer_slots(cfg):
        get = (lambda path: ours[prefix + path]) if index is None else (lambda path: ours[prefix + path][index])
        for path, hf_name, _, save in _block_entries(cfg, use_moe):
            hf[name + hf_name] = save(get(path))
        hf[name + "self_attn.kv_a_proj_with_mqa.weight"] = np.concatenate(
            [get(("attn", "wkv_a")).T, get(("attn", "wk_rope")).T])
        hf[name + "self_attn.kv_b_proj.weight"] = _join_kv_b(get(("attn", "w_uk")), get(("attn", "w_uv")))
        if use_moe:
            for n in ("gate", "up", "down"):
                for x, w in enumerate(get(("ffn", f"w_{n}"))):
                    hf[f"{name}mlp.experts.{x}.{n}_proj.weight"] = w.T
    for j in range(cfg.mtp_depth):
        name = f"model.layers.{cfg.num_layers + j}."
        hf[name + "enorm.weight"] = ours[("mtp", j, "enorm", "weight")]
        hf[name + "hnorm.weight"] = ours[("mtp", j, "hnorm", "weight")]
        hf[name + "eh_proj.weight"] = ours[("mtp", j, "eh_proj")].T
        hf[name + "shared_head.norm.weight"] = ours[("mtp", j, "norm", "weight")]
        hf[name + "shared_head.head.weight"] = head.T
        hf[name + "embed_tokens.weight"] = ours[("embed",)]
    return hf


# ---- public API ---------------------------------------------------------------------------------

def _model_paths(model_state) -> dict[tuple, object]:
    return {tuple(k): v for k, v in nnx.to_flat_state(model_state)}


def load_hf_checkpoint(path: str | Path, dtype: str = "float32", *, mtp: bool | None = None,
                       **config_overrides) -> Transformer:
    """Build a `Transformer` from a Hugging Face DeepSeek-V2/V3 checkpoint directory.

    dtype: parameter and compute dtype. mtp: load the MTP modules (None: when the checkpoint has
    them; transformers' `save_pretrained` drops them). Raises ValueError listing any checkpoint
    tensor that is not used or any parameter the checkpoint lacks.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found; expected a Hugging Face checkpoint directory")
    hf_cfg = json.loads((path / "config.json").read_text())
    config_from_hf(hf_cfg)                            # a bad config fails before any tensor is read
    files = _open_checkpoint(path)
    declared_mtp = hf_cfg.get("num_nextn_predict_layers", 0) if hf_cfg.get("model_type") == "deepseek_v3" else 0
    has_mtp = any(k.startswith(f"model.layers.{hf_cfg['num_hidden_layers']}.") for k in files)
    if mtp is None:
        mtp = has_mtp
        if declared_mtp and not has_mtp:
            log.warning("config.json declares %d MTP layer(s) but the checkpoint has none; loading without MTP",
                        declared_mtp)
    if mtp and not has_mtp:
        raise ValueError(f"mtp=True but {path} has no tensors under model.layers.{hf_cfg['num_hidden_layers']}.*")
    config_overrides.setdefault("mtp_depth", declared_mtp if mtp else 0)
    cfg = config_from_hf(hf_cfg, param_dtype=dtype, dtype=dtype, **config_overrides)

    expected = _hf_names(cfg)
    ignored = tuple(f"model.layers.{cfg.num_layers + j}." for j in range(declared_mtp)) if not mtp else ()
    scales = {name + "_scale_inv" for name in expected}
    missing = sorted(expected - set(files))
    unused = sorted(k for k in files if k not in expected and k not in scales and not k.startswith(ignored)
                    and not k.endswith("rotary_emb.inv_freq"))
    if missing or unused:
        raise ValueError(f"checkpoint {path} does not match the model built from its config.json:\n"
                         f"  missing tensors ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                         f"  unused tensors ({len(unused)}): {unused[:20]}{' ...' if len(unused) > 20 else ''}")

    def read(name: str) -> np.ndarray:
        w = files[name].get(name)
        if w.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in files:
                raise ValueError(f"FP8 tensor {name} has no {scale_name} in the checkpoint")
            return _dequantize(w, files[scale_name].get(scale_name))
        return w.astype(np.float32)

    ours = _to_ours(cfg, read)
    return _assemble(cfg, ours, path)


def _assemble(cfg: ModelConfig, ours: dict[tuple, np.ndarray], source) -> Transformer:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = _model_paths(state)
    extra = sorted(set(ours) - set(flat))
    absent = sorted(set(flat) - set(ours))
    if extra or absent:
        raise ValueError(f"{source}: converted tensors and model parameters differ: unexpected {extra}, missing {absent}")
    for key, var in flat.items():
        value = ours[key]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{source}: parameter {'.'.join(map(str, key))} has shape {value.shape}, "
                             f"the config implies {tuple(var.shape)}")
        var.set_value(jnp.asarray(value, var.dtype))
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(model: Transformer, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                       dtype: str | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + safetensors shards)."""
    from safetensors.flax import save_file

    cfg = model.cfg
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ours = {k: np.asarray(v[...], np.float32) for k, v in _model_paths(nnx.state(model)).items()}
    tensors = _from_ours(cfg, ours)
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    keep_fp32 = ("mlp.gate.weight", "e_score_correction_bias")
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name in sorted(tensors):
        dt = jnp.float32 if name.endswith(keep_fp32) else out_dtype
        arr = jnp.asarray(np.ascontiguousarray(tensors[name]), dt)
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    hf_cfg = config_to_hf(cfg.replace(param_dtype=str(out_dtype)))
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path
