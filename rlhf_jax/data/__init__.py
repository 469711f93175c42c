"""Datasets in, fixed-shape batches out (generated toy data lives in `rlhf_jax.world`).

  sources.py     local files, save_to_disk directories, hub names; held-out split; host slice
  formats.py     preference layouts (explicit, implicit, conversational, rankings) and row checks
  tokenize.py    [BOS] prompt response [EOS] within max_length, prompt truncation
  batching.py    deterministic, resumable batch plans with length buckets and groups
  preference.py  the pieces put together for preference pairs
"""

from rlhf_jax.data.config import DataConfig, Format, OnBadRow, Truncation
from rlhf_jax.data.formats import DataError
from rlhf_jax.data.preference import PreferenceData, load_preferences

__all__ = ["DataConfig", "DataError", "Format", "OnBadRow", "PreferenceData",
           "Truncation", "load_preferences"]
