"""The rollout engine: sampling from a causal LM with a KV cache, in one jit-compiled loop.

    generate = make_generate_fn(model, SamplingConfig(max_new_tokens=64, temperature=0.7))
    ids, mask = tokenize_prompts(tokenizer, ["Once upon a time"], sampling_cfg, max_positions)
    rollout = generate(params, ids, mask, jax.random.key(0))   # Rollout of [B, R] arrays

What is here, in order: `SamplingConfig`; the token pickers (top-k / top-p filters, the
sampled and greedy pick); the jitted rollout (`generate`: `_prefill`, then `_decode_step`
in a while loop, each step ending in `_sample`) and `make_generate_fn`, which closes over
the model and decides whether the decode steps read column panels (rlhf_jax/models/panels.py);
and the host side that turns prompt strings into bucketed, padded id arrays. The
`rlhf-jax generate` command around it is rlhf_jax/tools/generate.py.

Shapes: B rows, P prompt width (padded, bucketed), R = max_new_tokens, V vocabulary,
S = P + R cache slots.

One call is one XLA program: a prefill writes the prompts' keys/values into a cache of S
slots and keeps only the last real position's logits; a `lax.while_loop` then samples a
token per row, feeds it back (one cached decode step), and stops as soon as every row has
produced a stop token or R tokens. The cache is part of the loop carry, so XLA updates it in
place; nothing leaves the device until the loop is over. Prompt widths are rounded up to a
bucket, so a run compiles once per (bucket, batch size), not once per batch.

A row that has stopped is fed the pad id with attention mask 0: its cache slot is masked and
its position count does not move, so the rows still running are unaffected by it.

Log-probabilities: `Rollout.logprobs[b, r] = log_softmax(logits / temperature)[token]`, the
full temperature-scaled distribution *without* the top-k / top-p filter (as TRL and
OpenRLHF do). This is exactly what the PPO update recomputes from a forward pass
(`ppo.policy_logprobs`), so the first PPO epoch sees ratio 1; the filter only decides
which tokens may be drawn.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import check
from rlhf_jax.models.panels import PanelCache, panels_pay
from rlhf_jax.models.transformer import KVCache, init_cache, last_token_index, panel_dot


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled.

    Attributes:
      max_new_tokens: R, the most tokens per response (the width of every returned array).
      temperature: logits are divided by it to sample and in the returned log-probs.
      top_k: draw only among the k most likely tokens (0 = no limit).
      top_p: draw only from the smallest set of most likely tokens whose probability
        reaches p, after top-k (1.0 = no limit).
      greedy: take the most likely token instead of drawing one (log-probs still use
        `temperature`).
      stop_token_ids: tokens that end a response, besides EOS; the stop token is part of
        the response.
      stop_at_eos: whether the EOS id (the tokenizer's, else the model config's) ends a response.
      prompt_bucket: prompt widths are rounded up to a multiple of this, so that a run
        compiles once per bucket; 0 rounds up to a power of two (at least 8).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop_at_eos: bool = True
    prompt_bucket: int = 64

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "1 or more")
        check(self.temperature > 0, "temperature", self.temperature,
              "a positive number (for greedy decoding set greedy: true)")
        check(self.top_k >= 0, "top_k", self.top_k, "0 (off) or a positive number of tokens")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]; 1.0 is off")
        check(self.prompt_bucket >= 0, "prompt_bucket", self.prompt_bucket,
              "0 (powers of two) or a positive multiple")


# ---------------------------------------------------------------------------------------------
# Sampling: filters restrict the support, pickers choose a token. Logits are [B, V] float32.


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Logits outside the k largest of each row set to -inf (ties at the k-th value kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches p; -inf elsewhere.

    Token i (in descending order) is kept when the mass of the tokens before it is < p, so the
    most likely token always is. (Holtzman et al. 2020, "nucleus sampling".)
    """
    if p >= 1.0:
        return logits
    desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def greedy_token(logits: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


_CDF_BLOCK = 64  # tokens per block of the two-level CDF in `sampled_token`


def sampled_token(logits: jax.Array, key: jax.Array, logp: Optional[jax.Array] = None):
    """A draw from softmax(logits) per row, by inverting its CDF at one uniform per row.

    Exact, like the Gumbel-max trick of `jax.random.categorical`, but it needs B random
    numbers instead of B·V. The CDF is inverted in two levels: the vocabulary is split into
    blocks of `_CDF_BLOCK` tokens, a cumulative sum over the block masses finds the block the
    draw falls in, and a cumulative sum inside that block finds the token. A prefix sum over
    the whole vocabulary costs ~4× more on CPU (it dominated the sampling step). Tokens at
    -inf (filtered) have probability 0 and are never drawn. `logp` may pass
    log_softmax(logits).
    """
    if logp is None:
        logp = jax.nn.log_softmax(logits, axis=-1)
    b, v = logits.shape
    n = -(-v // _CDF_BLOCK)
    probs = jnp.pad(jnp.exp(logp), ((0, 0), (0, n * _CDF_BLOCK - v))).reshape(b, n, _CDF_BLOCK)
    block_cdf = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)  # [B, n]
    u = 1.0 - jax.random.uniform(key, (b, 1), probs.dtype)  # (0, 1]
    target = u * block_cdf[:, -1:]  # [B, 1], at most the total mass
    # The first block whose cumulative mass reaches the target (it has mass > 0).
    block = jnp.minimum(jnp.sum(block_cdf < target, axis=-1), n - 1)  # [B]
    before = jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], axis=1)[:, 0]
    before = jnp.where(block > 0, before, 0.0)  # mass of the earlier blocks, < target
    inner = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [B, _CDF_BLOCK]
    cdf = before[:, None] + jnp.cumsum(inner, axis=-1)
    possible = inner > 0
    hit = (cdf >= target) & possible  # the first hit is the token
    # Rounding can leave the block without a hit: then its last possible token.
    last = _CDF_BLOCK - 1 - jnp.argmax(possible[:, ::-1], axis=-1)
    pos = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)
    return jnp.minimum(block * _CDF_BLOCK + pos, v - 1).astype(jnp.int32)


def pick_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig):
    """(token [B], its log-prob [B] under log_softmax(logits / temperature), unfiltered)."""
    scaled = logits / cfg.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if cfg.greedy:
        token = greedy_token(scaled, key)
    elif cfg.top_k or cfg.top_p < 1:
        token = sampled_token(top_p_filter(top_k_filter(scaled, cfg.top_k), cfg.top_p), key)
    else:
        token = sampled_token(scaled, key, logp)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------
# The jit-compiled rollout.


@flax.struct.dataclass
class Rollout:
    """Responses sampled for a batch of prompts. R = max_new_tokens.

    `input_ids` / `attention_mask` give prompt + response as one [B, P + R] sequence, the
    layout PPO scores (the response is right-padded after its end).
    """

    prompt_ids: jax.Array  # [B, P] as given (padded)
    prompt_mask: jax.Array  # [B, P]
    tokens: jax.Array  # [B, R] response tokens, pad id after each row's end
    response_mask: jax.Array  # [B, R] int32, 1 at real response tokens (stop token included)
    logprobs: jax.Array  # [B, R] float32, log π(token) at temperature, 0 where masked
    lengths: jax.Array  # [B] int32, response tokens per row
    ended_with_stop: jax.Array  # [B] bool, the response ends with a stop token
    num_steps: jax.Array  # int32 scalar, tokens sampled per row before the loop stopped (≤ R)

    @property
    def input_ids(self) -> jax.Array:
        return jnp.concatenate([self.prompt_ids, self.tokens], axis=1)

    @property
    def attention_mask(self) -> jax.Array:
        return jnp.concatenate([self.prompt_mask.astype(jnp.int32), self.response_mask], axis=1)


@flax.struct.dataclass
class _Loop:
    step: jax.Array  # [] tokens sampled so far (the next column to write)
    cache: KVCache
    logits: jax.Array  # [B, V] predicting the token at `step`
    last: jax.Array  # [B] token sampled at step - 1
    done: jax.Array  # [B] bool, the row has produced a stop token
    lengths: jax.Array  # [B] real tokens sampled per row
    tokens: jax.Array  # [B, R]
    logprobs: jax.Array  # [B, R]


def _trunk(module, ids, mask, cache):
    return module.model(ids, mask, cache)


def _lm_head(model: nn.Module, params: Any) -> jax.Array:
    """The LM head as [D, V]: an untied head's kernel, or the tied embedding transposed once
    per call, for prefill and decode. Inside the decode loop the LM head is then a plain
    [B, D] × [D, V] matmul instead of one against the transposed [V, D] table, which XLA's
    CPU kernels run ~25% slower at batch 16 (the loop boundary keeps XLA from folding the
    transpose back into the dot)."""
    if model.cfg.tie_word_embeddings:
        return jnp.transpose(params["model"]["embed"]["embedding"])
    return params["lm_head"]["kernel"]


def _project(hidden: jax.Array, head: jax.Array, dtype, panels=None) -> jax.Array:
    """Logits [B, T, V] in float32 from hidden [B, T, D] and the [D, V] head of `_lm_head`
    (what `CausalLM.logits` computes), or from its column panels."""
    if panels is None:
        logits = jnp.einsum("btd,dv->btv", hidden.astype(dtype), head.astype(dtype))
    else:
        b, t, d = hidden.shape
        logits = panel_dot(hidden.reshape(b * t, d).astype(dtype), panels, dtype)
        logits = logits.reshape(b, t, -1)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab")).astype(jnp.float32)


def _constrain(loop: _Loop) -> _Loop:
    """Rows on the batch mesh axes, kv heads and vocabulary on `tensor` (no-op without a mesh)."""
    def kv(x):  # [B, K, S, Dh] per layer
        return nn.with_logical_constraint(x, ("batch", "kv_heads", "length", None))

    cache = loop.cache.replace(k=tuple(map(kv, loop.cache.k)), v=tuple(map(kv, loop.cache.v)))
    return loop.replace(cache=cache,
                        logits=nn.with_logical_constraint(loop.logits, ("batch", "act_vocab")))


def unrolled(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """The same model with unrolled layers (one param and cache array per layer).

    Decoding reads each layer's weights and cache in place; a scanned model would slice
    its stacked arrays (a copy) at every step. The unstacking copy happens once per call.
    """
    if not model.cfg.scan_layers:
        return model, params
    trunk = dict(params["model"])
    layers = trunk.pop("layers")
    for i in range(model.cfg.num_layers):
        trunk[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
    return model.clone(cfg=model.cfg.replace(scan_layers=False)), {**params, "model": trunk}


def _sample(loop: _Loop, *, rng: jax.Array, cfg: SamplingConfig, stop_ids: jax.Array,
            pad_id: int) -> _Loop:
    """Picks the token at `loop.step` from `loop.logits` and records it; rows already done
    get `pad_id` and log-prob 0. A row is done once it has drawn one of `stop_ids`."""
    token, logp = pick_token(loop.logits, jax.random.fold_in(rng, loop.step), cfg)
    live = ~loop.done
    token = jnp.where(live, token, pad_id)
    logp = jnp.where(live, logp, 0.0)
    col = (0, loop.step)
    return loop.replace(
        step=loop.step + 1,
        last=token,
        done=loop.done | (live & jnp.any(token[:, None] == stop_ids[None, :], axis=1)),
        lengths=loop.lengths + live.astype(jnp.int32),
        tokens=jax.lax.dynamic_update_slice(loop.tokens, token[:, None], col),
        logprobs=jax.lax.dynamic_update_slice(loop.logprobs, logp[:, None], col),
    )


def _prefill(model: nn.Module, params: Any, head: jax.Array, prompt_ids: jax.Array,
             prompt_mask: jax.Array, r: int, pad_id: int) -> _Loop:
    """The prompts' keys and values written into a cache of P + R slots, and the loop state
    before the first token: logits at each row's last real prompt token, nothing sampled."""
    b, p = prompt_ids.shape
    cache = init_cache(model.cfg, b, p + r)
    hidden, cache = model.apply({"params": params}, prompt_ids, prompt_mask, cache,
                                method=_trunk)
    last = last_token_index(prompt_mask, p)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    logits = _project(hidden, head, jnp.dtype(model.cfg.dtype))[:, 0]
    return _Loop(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits,
        last=jnp.full((b,), pad_id, jnp.int32),
        done=jnp.zeros((b,), bool),
        lengths=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, r), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, r), jnp.float32),
    )


def _decode_step(loop: _Loop, *, model: nn.Module, variables: dict, head: jax.Array,
                 head_panels: Optional[list], sample) -> _Loop:
    """One cached step: feeds the last token (masked for rows that are done) and samples
    the next one with `sample`. `variables` holds the params (and the "panels" collection
    when decoding from panels; `head_panels` are then the LM head's)."""
    live = (~loop.done).astype(jnp.int32)[:, None]
    hidden, cache = model.apply(variables, loop.last[:, None], live, loop.cache, method=_trunk)
    logits = _project(hidden, head, jnp.dtype(model.cfg.dtype), head_panels)[:, 0]
    return sample(_constrain(loop.replace(logits=logits, cache=cache)))


def generate(
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    panels: Optional[dict] = None,
    *,
    model: nn.Module,
    cfg: SamplingConfig,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
) -> Rollout:
    """Samples up to `cfg.max_new_tokens` tokens after each prompt (pure; jit it).

    Args:
      params: the causal LM's params (`CausalLM` or `CausalLMWithValueHead`).
      prompt_ids, prompt_mask: [B, P] prompts, padded (left padding is the usual layout;
        any padding works since positions count real tokens only).
      rng: PRNG key; step t draws with `fold_in(rng, t)`. The same key gives the same rollout.
      panels: optional `decode_panels(model.cfg, params)`, placed like params: the decode
        steps multiply by these column panels instead of the kernels (faster on CPU; the
        prefill uses the kernels). `make_generate_fn` passes them where they pay.
      model, cfg, stop_ids, pad_id: static; close over them (see `make_generate_fn`).
    """
    r = cfg.max_new_tokens
    sample = functools.partial(_sample, rng=rng, cfg=cfg,
                               stop_ids=jnp.asarray(stop_ids, jnp.int32), pad_id=pad_id)
    model, params = unrolled(model, params)
    head = _lm_head(model, params)
    variables, head_panels = {"params": params}, None
    if panels is not None:
        variables = {**variables, "panels": {"model": panels["model"]}}
        head_panels = panels["lm_head"]["kernel"]
    step = functools.partial(_decode_step, model=model, variables=variables, head=head,
                             head_panels=head_panels, sample=sample)

    def running(loop: _Loop):
        return (loop.step < r) & ~jnp.all(loop.done)

    loop = sample(_constrain(_prefill(model, params, head, prompt_ids, prompt_mask, r, pad_id)))
    loop = jax.lax.while_loop(running, step, loop)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=loop.tokens,
        response_mask=(jnp.arange(r)[None, :] < loop.lengths[:, None]).astype(jnp.int32),
        logprobs=loop.logprobs,
        lengths=loop.lengths,
        ended_with_stop=loop.done,
        num_steps=loop.step,
    )


def stop_ids_for(model_cfg, cfg: SamplingConfig, eos_token_id: Optional[int] = None) -> tuple:
    """The ids that end a response: `cfg.stop_token_ids` plus EOS when `cfg.stop_at_eos`."""
    eos = eos_token_id if eos_token_id is not None else model_cfg.eos_token_id
    ids = list(cfg.stop_token_ids)
    if cfg.stop_at_eos and eos is not None:
        ids.append(int(eos))
    return tuple(sorted(set(ids)))


def make_generate_fn(
    model: nn.Module,
    cfg: SamplingConfig,
    *,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    cpu_panels: Optional[bool] = None,
):
    """`generate(params, prompt_ids, prompt_mask, rng) -> Rollout`, jit-compiled.

    EOS and pad ids default to the model config's (pad falls back to 0). On a mesh, pass
    params placed with `rlhf_jax.sharding` and the batch via `shard_batch`, and call it inside
    `sharding.use_mesh(mesh)`: the cache follows the batch sharding (kv heads on `tensor`).
    One compilation per distinct (B, P); bucket P with `pad_prompts` / `tokenize_prompts`.

    With `cpu_panels`, params that live on CPU (one device, or replicated) are decoded from
    column panels (rlhf_jax/models/panels.py): same tokens, decode steps ~27% shorter at
    91 M params (39 → 28 ms for 16 rows on 2 cores), for a host copy of the weights kept
    until the next params (cut once per params: 0.07 s at 91 M) and a longer first compile
    (+3–6 s there, +67–116 s for a Qwen2-0.5B shape). None (the default) leaves the choice
    to `panels.panels_pay(model.cfg)`: on for models up to the base benchmark model's size.
    """
    pad = pad_token_id if pad_token_id is not None else model.cfg.pad_token_id
    fn = functools.partial(
        generate, model=model, cfg=cfg, stop_ids=stop_ids_for(model.cfg, cfg, eos_token_id),
        pad_id=int(pad or 0),
    )
    jitted = jax.jit(functools.wraps(generate)(fn))
    if not (panels_pay(model.cfg) if cpu_panels is None else cpu_panels):
        return jitted
    panels_for = PanelCache(model.cfg)

    @functools.wraps(generate)
    def call(params, prompt_ids, prompt_mask, rng):
        return jitted(params, prompt_ids, prompt_mask, rng, panels_for(params))
    return call


# ---------------------------------------------------------------------------------------------
# Host side: prompts to bucketed, padded id arrays.


def bucket_width(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (to a power of two ≥ 8 when bucket is 0)."""
    length = max(int(length), 1)
    if bucket == 0:
        return max(8, 1 << (length - 1).bit_length())
    return -(-length // bucket) * bucket


def pad_prompts(
    prompts: Sequence[Sequence[int]], bucket: int, pad_id: int, batch_size: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → left-padded (ids, mask), each [B, P] int32, P = the bucketed longest.

    With `batch_size`, rows are added (one pad token, mask 1) up to it, so a short last batch
    reuses the compiled program; drop those rows from the output.
    """
    rows = [list(p) for p in prompts]
    if batch_size is not None:
        rows += [[pad_id]] * (batch_size - len(rows))
    width = bucket_width(max(len(r) for r in rows), bucket)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    max_positions: int,
    *,
    chat_template: bool = False,
    truncate: bool = False,
) -> list[list[int]]:
    """Prompt strings → token lists that leave room for `cfg.max_new_tokens` new tokens.

    A prompt longer than `max_positions - max_new_tokens` tokens is an error, or keeps its
    last tokens with `truncate`. `chat_template` wraps each prompt as one user message.
    """
    room = max_positions - cfg.max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
            f"{max_positions} positions; lower max_new_tokens"
        )
    out = []
    for n, text in enumerate(prompts, 1):
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {n} is empty after tokenization; remove it or give it text")
        if len(ids) > room:
            if not truncate:
                raise ValueError(
                    f"prompt {n} has {len(ids)} tokens but the model's {max_positions} positions "
                    f"minus max_new_tokens={cfg.max_new_tokens} leave {room}; shorten it, lower "
                    "max_new_tokens, or left-truncate long prompts (--truncate)"
                )
            ids = ids[-room:]
        out.append(ids)
    return out


def tokenize_prompts(tokenizer, prompts: Sequence[str], cfg: SamplingConfig, max_positions: int,
                     *, chat_template: bool = False, truncate: bool = False,
                     batch_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt strings → left-padded, bucketed (ids, mask) [B, P] ready for `generate`."""
    rows = encode_prompts(tokenizer, prompts, cfg, max_positions, chat_template=chat_template,
                          truncate=truncate)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_prompts(rows, cfg.prompt_bucket, int(pad or 0), batch_size)
