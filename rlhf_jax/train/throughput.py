"""Model FLOPs of what a step computed, and throughput / MFU over a logging window.

MFU = model FLOPs / (seconds × the machine's measured matmul rate). Model FLOPs follow the
6·N rule (PaLM appendix B; nanoGPT's `estimate_mfu`), counted per matrix so that a head that
runs on only some columns is charged for those only:

    forward of one row of T tokens, logits at C columns:
        T · (2·N_body + 4·L·H·Dh·T)  +  C · 2·V·D
    training (forward + backward) = 3 × forward

N_body = the parameters a token multiplies by outside the LM head (every layer's matrices,
norms and biases; embedding and position lookups cost no FLOPs). Attention counts the full
context T for every token, as the peers do. Padding counts: it is what the device computes.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable

from rlhf_jax.models.config import TransformerConfig


def body_params(cfg: TransformerConfig) -> int:
    """N_body: parameters outside the embedding tables and the LM head."""
    tables = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    positions = cfg.max_position_embeddings * cfg.hidden_size if cfg.learned_positions else 0
    return cfg.num_params - tables - positions


def forward_flops(cfg: TransformerConfig, rows: int, seq_len: int, logit_columns: int) -> float:
    """FLOPs of a forward over `rows` rows of `seq_len` tokens, the LM head run at
    `logit_columns` of them (0 for a reward model or critic: its scalar head is O(D))."""
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    per_row = seq_len * (2 * body_params(cfg) + attention)
    per_row += logit_columns * 2 * cfg.vocab_size * cfg.hidden_size
    return float(rows * per_row)


def training_flops(cfg: TransformerConfig, rows: int, seq_len: int, logit_columns: int) -> float:
    """Forward + backward: 3 × `forward_flops`."""
    return 3.0 * forward_flops(cfg, rows, seq_len, logit_columns)


def generate_flops(cfg: TransformerConfig, rows: int, prompt_width: int, steps: int) -> float:
    """FLOPs of one `generate` call: the prefill of `rows` prompts of `prompt_width` tokens
    (logits at the last column), then `steps - 1` decode steps of one token per row, each at
    the context it has reached (the prefill yields the first token)."""
    flops = forward_flops(cfg, rows, prompt_width, 1)
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    token = 2 * body_params(cfg) + 2 * cfg.vocab_size * cfg.hidden_size
    for t in range(1, steps):
        flops += rows * (token + attention * (prompt_width + t))
    return float(flops)


@dataclasses.dataclass(frozen=True)
class Work:
    """What one step computed.

    Attributes:
      shape: what the step compiled for (its padded length, its prompt bucket): the first
        step of each shape compiled, so it is not a sample.
      flops: model FLOPs (see above).
      counts: such as {"tokens": real tokens}, reported as perf/<name>_per_s.
      slots: sequence slots computed, padding included (perf/fill = tokens / slots); 0 = none.
    """

    shape: Hashable
    flops: float
    counts: dict = dataclasses.field(default_factory=dict)
    slots: float = 0.0


class Throughput:
    """Counts per second and MFU over a logging window; calls that compiled are left out.

    `add(work, seconds)` records one step's `Work`.
    """

    def __init__(self, ceiling_flops_per_s: float):
        self.ceiling = ceiling_flops_per_s
        self.shapes: set = set()
        self.reset()

    def reset(self) -> None:
        self.seconds = self.flops = self.slots = 0.0
        self.counts: dict[str, float] = {}

    def add(self, work: Work, seconds: float) -> None:
        if work.shape not in self.shapes:
            self.shapes.add(work.shape)
            return
        self.seconds += seconds
        self.flops += work.flops
        self.slots += work.slots
        for k, v in work.counts.items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)

    def metrics(self) -> dict[str, float]:
        """perf/* of the window since the last call (empty when it held no sample)."""
        if not self.seconds:
            return {}
        out = {f"perf/{k}_per_s": v / self.seconds for k, v in self.counts.items()}
        if self.slots and "tokens" in self.counts:
            out["perf/fill"] = self.counts["tokens"] / self.slots
        out["perf/mfu"] = self.flops / self.seconds / self.ceiling
        self.reset()
        return out
