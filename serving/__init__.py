"""orcinus.serving: the inference engine (paged latent cache, scheduler, sampler, statistics)."""

from serving.cache import PAGE, BlockAllocator, CacheSpec
from serving.engine import Completion, Engine, EngineConfig, generate
from serving.sampler import SamplingParams
from serving.scheduler import Scheduler, Sequence
from serving.stats import ServingStats, format_summary

__all__ = ["PAGE", "BlockAllocator", "CacheSpec", "Completion", "Engine", "EngineConfig", "generate",
           "SamplingParams", "Scheduler", "Sequence", "ServingStats", "format_summary"]
