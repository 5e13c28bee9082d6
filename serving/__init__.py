"""orcinus.serving: the inference engine (paged latent cache, scheduler, sampler, statistics)."""

from serving.cache import PAGE, BlockAllocator, CacheSpec
from serving.engine import Completion, DataParallelEngine, Engine, EngineConfig, generate, make_engine
from serving.sampler import SamplingParams
from serving.scheduler import Scheduler, Sequence
from serving.stats import ServingStats, format_summary

__all__ = ["PAGE", "BlockAllocator", "CacheSpec", "Completion", "DataParallelEngine", "Engine", "EngineConfig",
           "generate", "make_engine",
           "SamplingParams", "Scheduler", "Sequence", "ServingStats", "format_summary"]
