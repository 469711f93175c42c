"""Decoder-only transformers (GPT-2, Llama, Qwen2 families) and Hugging Face interop.

    from rlhf_jax import models
    model, params = models.load_hf("path/to/hf_dir")
    logits = model.apply({"params": params}, input_ids, attention_mask)   # [B, T, V]
"""

from rlhf_jax.models.config import (
    Family,
    RopeScaling,
    TransformerConfig,
    dtype_warning,
    flops_per_token,
)
from rlhf_jax.models.hf import (
    HEADS,
    abstract_params,
    head_of,
    init_model,
    load_hf,
    load_tokenizer,
    make_model,
    save_hf,
)
from rlhf_jax.models.transformer import (
    CausalLM,
    CausalLMWithValueHead,
    KVCache,
    RewardModel,
    init_cache,
    last_token_index,
    position_ids,
)

__all__ = [
    "CausalLM", "CausalLMWithValueHead", "Family", "HEADS", "KVCache", "RewardModel",
    "RopeScaling", "TransformerConfig", "abstract_params", "dtype_warning", "flops_per_token",
    "head_of", "init_cache", "init_model", "last_token_index", "load_hf", "load_tokenizer",
    "make_model", "position_ids", "save_hf",
]
