"""What a stage's data section says: where the rows come from and how they are read,
checked, tokenised and batched. Shared by every stage that reads a dataset."""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from rlhf_jax.config import check


class Format(str, enum.Enum):
    AUTO = "auto"  # detected from the columns
    EXPLICIT = "explicit"  # prompt, chosen, rejected strings
    IMPLICIT = "implicit"  # chosen, rejected full texts sharing the prompt as a prefix
    CONVERSATIONAL = "conversational"  # chosen, rejected (and prompt) lists of messages
    RANKINGS = "rankings"  # prompt, responses [K], ranks [K] (1 = best)


class Truncation(str, enum.Enum):
    LEFT = "left"  # keep the end of an over-long prompt (the part next to the response)
    RIGHT = "right"  # keep its beginning
    NONE = "none"  # an over-long row is a bad row


class OnBadRow(str, enum.Enum):
    ERROR = "error"  # stop with a message naming the row and column
    DROP = "drop"  # skip it, report how many were dropped and why


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A dataset and how to turn it into fixed-shape batches.

    Attributes:
      train: training rows: a .json/.jsonl/.csv/.parquet file (or glob), a `save_to_disk`
        directory, or a Hugging Face Hub name (tried only when no such local path exists).
      train_split: split to read from a hub dataset or a saved DatasetDict.
      eval: held-out rows (same kinds of source); none = `eval_fraction` of `train`.
      eval_split: split to read from `eval` (a hub dataset or a saved DatasetDict; files
        have one split).
      eval_fraction: share of `train` held out when there is no eval source (0 = no eval).
      format: auto (detected from the columns), explicit, implicit, conversational, rankings.
      columns: our column name → the name in the data, e.g. {prompt: question}.
      max_length: tokens per sequence (prompt + response, with BOS/EOS).
      prompt_truncation: how a prompt too long for max_length is cut: left (keep its end),
        right (keep its start) or none (the row is bad).
      on_bad_row: error (stop, naming row and column) or drop (skip and report a count).
      buckets: padded lengths a batch may have; none = powers of two from 32 up to max_length.
      add_bos: put the tokenizer's BOS token before each sequence.
      add_eos: put its EOS token after each response (the reward is read there).
      shuffle: shuffle training rows each epoch (by seed and epoch).
    """

    train: str = ""
    train_split: str = "train"
    eval: Optional[str] = None
    eval_split: str = "test"
    eval_fraction: float = 0.0
    format: Format = Format.AUTO
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    max_length: int = 512
    prompt_truncation: Truncation = Truncation.LEFT
    on_bad_row: OnBadRow = OnBadRow.ERROR
    buckets: tuple[int, ...] = ()
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True

    def __post_init__(self):
        check(bool(self.train) or self.generated(), "train", self.train,
              "a file, saved dataset directory or hub name" + self.GENERATED_HINT)
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction,
              "a fraction in [0, 1)")
        check(self.max_length >= 4, "max_length", self.max_length, "4 or more tokens")
        check(all(b > 0 for b in self.buckets) and list(self.buckets) == sorted(set(self.buckets)),
              "buckets", self.buckets, "increasing positive lengths")
        check(not self.buckets or self.buckets[-1] >= self.max_length, "buckets", self.buckets,
              f"a list whose last entry covers max_length={self.max_length}")

    GENERATED_HINT = ""  # how a stage's subclass offers generated data instead

    def generated(self) -> bool:
        """True when the rows are generated (a stage's subclass) rather than read from `train`."""
        return False

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets:
            return self.buckets
        out, b = [], 32
        while b < self.max_length:
            out.append(b)
            b *= 2
        return (*out, self.max_length)
