"""orcinus.serving: the inference engine (paged latent cache, scheduler, sampler)."""
