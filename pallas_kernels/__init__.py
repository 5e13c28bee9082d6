"""orcinus.pallas_kernels: Hopper kernels (Mosaic GPU), one op per file, each with its jnp reference."""
