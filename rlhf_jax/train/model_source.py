"""Where a run's models come from (a Hugging Face directory or a fresh architecture) and how
they compute: the `model` section of every stage's config, and the loading behind it."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from rlhf_jax import models
from rlhf_jax.config import ConfigError, check
from rlhf_jax.models.config import Family, TransformerConfig


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """A fresh transformer for from-scratch runs; vocabulary and special ids come from the
    tokenizer.

    Attributes:
      family: gpt2, llama or qwen2 (names and layout of the export).
      hidden_size: model width.
      num_layers: decoder blocks.
      num_heads: attention heads.
      num_kv_heads: key/value heads (none = num_heads).
      intermediate_size: MLP width.
      max_position_embeddings: longest sequence the model accepts.
    """

    family: Family = Family.GPT2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    intermediate_size: int = 128
    max_position_embeddings: int = 512


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a run's models are read and computed.

    Attributes:
      tokenizer: tokenizer directory; none = the (first) model's directory.
      dtype: compute dtype, float32 or bfloat16 (params stay float32). On CPU, bfloat16 is
        slower, not faster (a PPO iteration measured 1.7x slower than float32: XLA's CPU
        kernels convert it); it is for accelerators, and a run on CPU warns.
      remat: recompute each block in the backward pass (saves activation memory).
      scan_layers: run the blocks in one `lax.scan` (one block compiled, fastest to compile
        for deep models); false unrolls them: on CPU ~10% faster training steps (small
        benchmark model), longer compile. Keep it fixed across a run and its resumes.
    """

    tokenizer: Optional[str] = None
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True

    def __post_init__(self):
        check(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "float32 or bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelOptions):
    """Where a stage's model starts, and how it computes (the fields of `ModelOptions`).

    Attributes:
      path: a Hugging Face model directory: a causal LM, or a sequence-classification
        model with one label (ours or transformers'); a head the stage needs and the
        checkpoint lacks (an RM's score head) is added.
      init: or a fresh architecture, trained from scratch.
    """

    path: Optional[str] = None
    init: Optional[ArchConfig] = None

    def __post_init__(self):
        super().__post_init__()
        check((self.path is None) != (self.init is None), "path", self.path,
              "exactly one of model.path (a Hugging Face directory) and model.init (a fresh "
              "architecture)")

    @property
    def source(self):
        """`path` or `init`: what `load_model` starts from."""
        return self.path if self.path is not None else self.init


def require_model_dir(key: str, path: Optional[str]) -> None:
    """A config error naming `key` unless `path` is a model directory (config.json inside)."""
    if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise ConfigError(key, f"config key '{key}' = {path!r}: the directory {what}; give a "
                               "Hugging Face model directory (config.json + *.safetensors)")


def tokenizer_for(options: ModelOptions, default: Optional[str], key: str = "model.tokenizer"):
    """The tokenizer at `options.tokenizer`, else at `default` (the model's directory or the
    generated data's tokenizer)."""
    path = options.tokenizer or default
    if path is None:
        raise ConfigError(key, f"config key '{key}' is required when the model is trained from "
                               "scratch on files")
    if not os.path.isdir(path):
        raise ConfigError(key, f"config key '{key}' = {path!r}: no such tokenizer directory")
    return models.load_tokenizer(path)


def load_model(options: ModelOptions, source, tokenizer, mesh, seed: int, head: str):
    """(model with `head`, params placed on `mesh`) from `source`: a Hugging Face directory
    (a head the checkpoint lacks is added) or an `ArchConfig` (a fresh init)."""
    overrides = {"dtype": options.dtype, "remat": options.remat,
                 "scan_layers": options.scan_layers}
    if not isinstance(source, ArchConfig):
        return models.load_hf(source, head=head, mesh=mesh, seed=seed, **overrides)
    family = Family(source.family)
    cfg = TransformerConfig(
        family=family,
        vocab_size=-(-len(tokenizer) // 64) * 64,  # rounded up: divisible by tensor-parallel sizes
        hidden_size=source.hidden_size,
        num_layers=source.num_layers,
        num_heads=source.num_heads,
        num_kv_heads=source.num_kv_heads,
        intermediate_size=source.intermediate_size,
        max_position_embeddings=source.max_position_embeddings,
        qkv_bias=family != Family.LLAMA,
        tie_word_embeddings=family != Family.LLAMA,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    return models.init_model(cfg, head, seed=seed, mesh=mesh)


def check_vocab(tokenizer, *modules, key: str = "model.tokenizer") -> None:
    """A config error when the tokenizer has ids beyond a model's vocabulary."""
    for m in modules:
        if m is not None and len(tokenizer) > m.cfg.vocab_size:
            raise ConfigError(key, f"the tokenizer has {len(tokenizer)} tokens but a model's "
                                   f"vocabulary only {m.cfg.vocab_size}; use the model's "
                                   "tokenizer")
