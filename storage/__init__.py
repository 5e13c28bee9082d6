"""orcinus.storage: the 3FS roles (Grain data loading, Orbax checkpoints, the on-disk KV-cache tier).

  prepare_corpus / prepare_embedded_corpus / open_corpus   text -> ArrayRecord shards + manifest
  LoaderConfig / make_loader / make_dataset                the Grain pipeline (shuffle, pack, shard)
  Checkpointer                                             Orbax: model, optimizer, data state, config
  KVTier                                                   latent-cache blocks in TensorStore, LRU
"""

from storage.checkpoint import CheckpointConfigError, Checkpointer
from storage.corpus import ByteTokenizer, embedded_corpus
from storage.dataset import CorpusSource, Loader, LoaderConfig, make_dataset, make_loader
from storage.kv_tier import KVTier
from storage.prepare import (Corpus, CorpusError, HFTokenizer, load_tokenizer, open_corpus, prepare_corpus,
                             prepare_embedded_corpus)

__all__ = ["ByteTokenizer", "CheckpointConfigError", "Checkpointer", "Corpus", "CorpusError", "CorpusSource",
           "HFTokenizer", "KVTier", "Loader", "LoaderConfig", "embedded_corpus", "load_tokenizer", "make_dataset",
           "make_loader", "open_corpus", "prepare_corpus", "prepare_embedded_corpus"]
