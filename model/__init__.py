"""orcinus.model: the DeepSeek-V3 network in Flax NNX."""

from model.config import PRESETS, ModelConfig, YarnConfig
from model.hf import load_hf_checkpoint, save_hf_checkpoint
from model.transformer import LatentCache, ModelOutput, Transformer, param_count

__all__ = ["PRESETS", "LatentCache", "ModelConfig", "ModelOutput", "Transformer", "YarnConfig",
           "load_hf_checkpoint", "param_count", "save_hf_checkpoint"]
