"""Texts → token sequences `[BOS] prompt response [EOS]` that fit `max_length`, and
conversations → texts with the tokenizer's chat template.

Prompt and responses are tokenised separately (so the prompt can be cut on its own) and
joined; an over-long prompt is cut from the configured side, and a row that still does
not fit is a bad row (`checks.BadRow`), reported with its row and column.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from rlhf_jax.data.checks import BadRow, DataError
from rlhf_jax.data.config import Truncation


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one fast batched call)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def special_ids(
    tokenizer, add_bos: bool, add_eos: bool
) -> tuple[Optional[int], Optional[int], int]:
    """(BOS or None, EOS or None, pad id): pad falls back to EOS, then to 0."""
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return bos, eos, pad


def join(
    prompt: list[int],
    responses: Sequence[list[int]],
    max_length: int,
    truncation: Truncation,
    bos: Optional[int] = None,
    eos: Optional[int] = None,
    names: Sequence[str] = ("chosen", "rejected"),
) -> tuple[list[np.ndarray], int]:
    """`[BOS] prompt response [EOS]` for each response, all sharing one prompt cut to fit.

    BOS (EOS) is not added again when the prompt already starts (a response already ends)
    with it, as chat templates often render it.

    Returns:
      (one int32 sequence per response, number of tokens before the response).

    Raises:
      BadRow: when a response does not fit even with an empty prompt, or the prompt does
        not fit and truncation is none. `names` name the responses' columns.
    """
    head = [bos] if bos is not None and prompt[:1] != [bos] else []
    tails = [[eos] if eos is not None and r[-1:] != [eos] else [] for r in responses]
    need = [len(r) + len(t) for r, t in zip(responses, tails)]
    longest = int(np.argmax(need))
    room = max_length - len(head) - need[longest]
    if room < 0:
        raise BadRow(names[longest], "over-length",
                     f"the response alone is {need[longest] + len(head)} tokens with BOS/EOS, "
                     f"over max_length={max_length}")
    if len(prompt) > room:
        truncation = Truncation(truncation)
        if truncation == Truncation.NONE:
            raise BadRow("prompt", "over-length",
                         f"prompt ({len(prompt)} tokens) and response ({need[longest]}) exceed "
                         f"max_length={max_length}; set data.prompt_truncation=left or right to "
                         "cut the prompt, or raise max_length")
        prompt = prompt[len(prompt) - room:] if truncation == Truncation.LEFT else prompt[:room]
    start = head + list(prompt)
    return [np.asarray(start + list(r) + t, np.int32) for r, t in zip(responses, tails)], len(start)


def require_chat_template(tokenizer, source: str, instead: str) -> None:
    """Raises a `DataError` when conversational data meets a tokenizer without a chat
    template; `instead` says what to give instead."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{source}: conversational data needs a tokenizer with a chat template; "
                        f"this tokenizer has none (set model.tokenizer to one that has, or "
                        f"{instead})")


def render_conversation(
    tokenizer, prompt: list[dict], response: list[dict], column: str = "chosen"
) -> tuple[str, str]:
    """(prompt text, response text) rendered with the tokenizer's chat template.

    Raises:
      BadRow: in `column`, when the template does not render the prompt as a prefix of the
        whole conversation.
    """
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    for generation_prompt in (True, False):
        head = ""
        if prompt:
            head = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        if full.startswith(head) and len(full) > len(head):
            return head, full[len(head):]
    raise BadRow(column, "chat template",
                 "the chat template does not render the prompt as a prefix of the conversation")
