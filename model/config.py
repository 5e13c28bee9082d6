"""Model configuration: one frozen dataclass, validated on construction, with named presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]
Remat = Literal["none", "full", "dots"]
DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "pallas"]


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN rope scaling (Peng et al.), as DeepSeek-V2/V3 configure it."""

    factor: float = 40.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        _require(self.factor >= 1.0, "rope_scaling.factor", self.factor, "must be >= 1")
        _require(self.original_max_position > 0, "rope_scaling.original_max_position",
                 self.original_max_position, "must be > 0")
        _require(self.beta_fast > self.beta_slow > 0, "rope_scaling.beta_fast/beta_slow",
                 (self.beta_fast, self.beta_slow), "need beta_fast > beta_slow > 0")

    @staticmethod
    def get_mscale(factor: float, mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0

    @property
    def attention_factor(self) -> float:
        """Multiplier on cos/sin (as Hugging Face and the YaRN paper apply it)."""
        if self.mscale and self.mscale_all_dim:
            return self.get_mscale(self.factor, self.mscale) / self.get_mscale(self.factor, self.mscale_all_dim)
        return self.get_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """m in softmax_scale = qk_head_dim^-0.5 * m^2 (DeepSeek's mscale_all_dim)."""
        return self.get_mscale(self.factor, self.mscale_all_dim) if self.mscale_all_dim else 1.0


def _require(ok: bool, field: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture. Field names follow the paper; HF names in comments."""

    vocab_size: int = 512
    d_model: int = 256                      # hidden_size
    num_layers: int = 4                     # num_hidden_layers
    num_dense_layers: int = 1               # first_k_dense_replace
    num_heads: int = 4                      # num_attention_heads
    q_lora_rank: int | None = 96            # None: no query compression (V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    dense_ffn_dim: int = 512                # intermediate_size
    moe_ffn_dim: int = 64                   # moe_intermediate_size
    num_routed_experts: int = 16            # n_routed_experts
    num_shared_experts: int = 1             # n_shared_experts
    num_experts_per_tok: int = 4
    num_expert_groups: int = 4              # n_group
    num_limited_groups: int = 2             # topk_group
    score_func: ScoreFunc = "sigmoid"
    group_score: GroupScore = "top2_sum"    # V3: sum of top-2; V2 group_limited_greedy: max
    router_bias: bool = True                # e_score_correction_bias (selection only)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = None
    max_seq_len: int = 1024                 # max_position_embeddings
    mtp_depth: int = 1                      # num_nextn_predict_layers
    tie_embeddings: bool = False
    init_std: float = 0.02                  # initializer_range
    param_dtype: DType = "float32"
    dtype: DType = "float32"                # activation / compute dtype
    remat: Remat = "none"
    fp8: bool = False                       # FP8 GEMMs in linear layers (V3 recipe; model/fp8.py)
    scan_layers: bool = True
    seq_aux_alpha: float = 1e-4             # complementary sequence-wise balance loss
    # training / scoring self-attention core: "xla" (jnp), or "pallas": the FlashAttention-3 style
    # kernels of pallas_kernels/mla_attention.py on a GPU (their jnp reference elsewhere)
    attention: AttentionImpl = "xla"

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "max_seq_len")
        for name in positive:
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", self.q_lora_rank,
                 "must be > 0, or None for no query compression")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
                 "must be even (rope rotates pairs)")
        _require(0 <= self.num_dense_layers <= self.num_layers, "num_dense_layers", self.num_dense_layers,
                 f"must be in [0, num_layers={self.num_layers}]")
        _require(self.mtp_depth >= 0, "mtp_depth", self.mtp_depth, "must be >= 0")
        _require(self.rms_eps > 0, "rms_eps", self.rms_eps, "must be > 0")
        _require(self.init_std > 0, "init_std", self.init_std, "must be > 0")
        _require(self.seq_aux_alpha >= 0, "seq_aux_alpha", self.seq_aux_alpha, "must be >= 0")
        _require(self.score_func in ("softmax", "sigmoid"), "score_func", self.score_func,
                 "must be 'softmax' or 'sigmoid'")
        _require(self.group_score in ("max", "top2_sum"), "group_score", self.group_score,
                 "must be 'max' or 'top2_sum'")
        _require(self.remat in ("none", "full", "dots"), "remat", self.remat, "must be 'none', 'full' or 'dots'")
        for name in ("param_dtype", "dtype"):
            _require(getattr(self, name) in ("float32", "bfloat16", "float16"), name, getattr(self, name),
                     "must be 'float32', 'bfloat16' or 'float16'")
        _require(self.attention in ("xla", "pallas"), "attention", self.attention, "must be 'xla' or 'pallas'")
        if self.attention == "pallas":
            for name in ("qk_head_dim", "v_head_dim"):
                d = getattr(self, name)
                _require(d % 64 == 0 and 64 <= d <= 256, "attention", self.attention,
                         f"the Pallas kernel takes head dims that are multiples of 64 in [64, 256], but "
                         f"{name}={d}; use attention='xla' for this model")
            _require(self.dtype == "bfloat16", "attention", self.attention,
                     f"the Pallas kernel computes in bfloat16, but dtype={self.dtype!r}; set dtype='bfloat16' "
                     "(train.py --precision bf16 or fp8) or use attention='xla'")
        if self.num_moe_layers > 0 or self.mtp_depth > 0:
            self._validate_moe()
        if self.num_dense_layers > 0:
            _require(self.dense_ffn_dim > 0, "dense_ffn_dim", self.dense_ffn_dim, "must be > 0")

    def _validate_moe(self):
        E, G = self.num_routed_experts, self.num_expert_groups
        _require(E > 0, "num_routed_experts", E, "must be > 0")
        _require(self.moe_ffn_dim > 0, "moe_ffn_dim", self.moe_ffn_dim, "must be > 0")
        _require(self.num_shared_experts >= 0, "num_shared_experts", self.num_shared_experts, "must be >= 0")
        _require(G > 0 and E % G == 0, "num_expert_groups", G,
                 f"num_routed_experts={E} must be divisible by num_expert_groups")
        _require(0 < self.num_limited_groups <= G, "num_limited_groups", self.num_limited_groups,
                 f"must be in [1, num_expert_groups={G}]")
        _require(0 < self.num_experts_per_tok <= E, "num_experts_per_tok", self.num_experts_per_tok,
                 f"top-k must be in [1, num_routed_experts={E}]")
        kept = self.num_limited_groups * (E // G)
        _require(self.num_experts_per_tok <= kept, "num_experts_per_tok", self.num_experts_per_tok,
                 f"top-k exceeds the {kept} experts in the {self.num_limited_groups} kept groups")
        _require(self.group_score != "top2_sum" or E // G >= 2, "group_score", self.group_score,
                 "'top2_sum' needs at least 2 experts per group")

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def softmax_scale(self) -> float:
        m = self.rope_scaling.softmax_mscale if self.rope_scaling else 1.0
        return self.qk_head_dim ** -0.5 * m * m

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


V3_YARN = YarnConfig(factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1,
                     mscale=1.0, mscale_all_dim=1.0)

PRESETS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores: ~4M parameters, 16 routed experts, V3-style routing and MTP.
    "tiny": ModelConfig(),
    # A GPU-sized model for benchmarks: ~1.6B parameters, 64 experts.
    "small": ModelConfig(
        vocab_size=32768, d_model=1024, num_layers=12, num_dense_layers=1, num_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, dense_ffn_dim=4096,
        moe_ffn_dim=512, num_routed_experts=64, num_shared_experts=2, num_experts_per_tok=6,
        num_expert_groups=8, num_limited_groups=4, max_seq_len=4096, dtype="bfloat16"),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, d_model=2048, num_layers=27, num_dense_layers=1, num_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dense_ffn_dim=10944,
        moe_ffn_dim=1408, num_routed_experts=64, num_shared_experts=2, num_experts_per_tok=6,
        num_expert_groups=1, num_limited_groups=1, score_func="softmax", group_score="max",
        router_bias=False, norm_topk_prob=False, routed_scaling_factor=1.0, max_seq_len=163840,
        rope_scaling=YarnConfig(factor=40.0, original_max_position=4096, beta_fast=32, beta_slow=1,
                                mscale=0.707, mscale_all_dim=0.707),
        mtp_depth=0, dtype="bfloat16"),
    "deepseek-v3": ModelConfig(
        vocab_size=129280, d_model=7168, num_layers=61, num_dense_layers=3, num_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dense_ffn_dim=18432,
        moe_ffn_dim=2048, num_routed_experts=256, num_shared_experts=1, num_experts_per_tok=8,
        num_expert_groups=8, num_limited_groups=4, routed_scaling_factor=2.5, max_seq_len=163840,
        rope_scaling=V3_YARN, mtp_depth=1, dtype="bfloat16", param_dtype="bfloat16"),
}
