"""Datasets in, fixed-shape batches out (generated toy data lives in `rlhf_jax.world`).

  config.py      the data section every stage shares (DataConfig)
  sources.py     local files, save_to_disk directories, hub names; held-out split; host slice
  checks.py      DataError, bad rows (error or drop), text/messages/column checks
  formats.py     preference layouts (explicit, implicit, conversational, rankings)
  tokenize.py    [BOS] prompt response [EOS] within max_length, prompt truncation, chat templates
  batching.py    deterministic, resumable batch plans with length buckets and groups; the
                 train/held-out splits of a data section served on this host
  preference.py  the pieces put together for preference pairs (reward model)
  sft.py         demonstrations with loss masks and packing (supervised fine-tuning)
  prompts.py     prompts for PPO
"""

from rlhf_jax.data.checks import DataError
from rlhf_jax.data.config import DataConfig, Format, OnBadRow, Truncation
from rlhf_jax.data.preference import PreferenceData, load_preferences

__all__ = ["DataConfig", "DataError", "Format", "OnBadRow", "PreferenceData",
           "Truncation", "load_preferences"]
