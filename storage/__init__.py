"""orcinus.storage: the 3FS roles (Grain data loading, Orbax checkpoints, the on-disk KV-cache tier)."""
