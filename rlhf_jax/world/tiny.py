"""Tiny models and tokenizers made on the spot, for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in a second on
the texts given, and models are random transformers of a few layers.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from rlhf_jax.models.config import Family, TransformerConfig

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

# A small chat template in the Hugging Face (Jinja) format: one line per message.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_config(family: str = "gpt2", vocab_size: int = 512, **overrides) -> TransformerConfig:
    """A 2-layer, width-64 transformer of `family` (ids 0/1/2 = pad/bos/eos)."""
    family = Family(family)
    base = dict(
        family=family,
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4 if family == Family.GPT2 else 2,
        intermediate_size=128,
        max_position_embeddings=256,
        qkv_bias=family != Family.LLAMA,
        tie_word_embeddings=family != Family.LLAMA,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return TransformerConfig(**base)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    path: Optional[str] = None,
    chat_template: str = CHAT_TEMPLATE,
):
    """Trains a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast`.

    Special tokens: <pad>=0, <bos>=1, <eos>=2. Saved to `path` when given, so that
    `transformers.AutoTokenizer.from_pretrained(path)` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    fast.chat_template = chat_template
    if path is not None:
        os.makedirs(path, exist_ok=True)
        fast.save_pretrained(path)
    return fast
