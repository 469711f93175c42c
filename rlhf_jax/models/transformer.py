"""Flax Linen decoder-only transformer: GPT-2, Llama and Qwen2 families from one config.

Shapes: B batch, T new tokens, S cache slots, D width, H query heads, K key/value heads,
G = H / K query heads per key/value head, Dh head width, V vocabulary, L layers.

Padding: every call takes `attention_mask` [B, T] (1 = real token). Position ids count real
tokens only (`cumsum(mask) - 1`), and keys at padded slots are never attended to, so a
left- or right-padded sequence gives the same logits at its real tokens as the sequence alone.

KV cache: `KVCache` is an explicit pytree. A call with `cache=` writes the new keys/values
at `cache.index`, attends over the cache (earlier tokens plus the new ones, causally) and
returns the updated cache next to the output. Prefill is a call with the whole prompt,
decode a call with T = 1. Keys/values are stored [B, K, S, Dh] per layer, the layout the
attention dots read without a transpose; unrolled layers (`scan_layers=False`) keep one
array per layer, so that a decode loop reads and updates each in place instead of slicing
a stacked array.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import Family, TransformerConfig

Array = jax.Array


def _param_init(init, names):
    return nn.with_logical_partitioning(init, names)


_kernel_init = nn.initializers.normal(stddev=0.02)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    Attributes:
      k, v: keys and values (compute dtype): [L, B, K, S, Dh] with `scan_layers`, else a
        tuple of L arrays [B, K, S, Dh].
      mask: [B, S] bool, True where the slot holds a real token.
      lengths: [B] int32, real tokens seen per sequence (the next position id).
      index: int32 scalar, the next slot to write (the same for the whole batch).
    """

    k: Array
    v: Array
    mask: Array
    lengths: Array
    index: Array


def init_cache(cfg: TransformerConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for `batch_size` sequences of at most `max_len` tokens in all."""
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)

    def zeros():
        if cfg.scan_layers:
            return jnp.zeros((cfg.num_layers, *shape), dtype)
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

    return KVCache(
        k=zeros(),
        v=zeros(),
        mask=jnp.zeros((batch_size, max_len), bool),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def position_ids(attention_mask: Array, start: Optional[Array] = None) -> Array:
    """Position of each token among the real tokens of its row: [B, T] int32.

    `start` [B] offsets the count (real tokens already in the cache). Padded slots get the
    position of the previous real token; they are never attended to, so the value is moot.
    """
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return jnp.maximum(pos, 0)


def segment_position_ids(attention_mask: Array, segment_ids: Array) -> Array:
    """Position of each token among the real tokens of its own segment: [B, T] int32.

    For packed rows (several examples per row): each example starts again at position 0,
    as if it were alone in its row.
    """
    real = attention_mask.astype(jnp.int32)
    seen = jnp.cumsum(real, axis=1)  # real tokens up to and including t
    first = jnp.ones_like(segment_ids[:, :1], bool)
    starts = jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    before_segment = jax.lax.cummax(jnp.where(starts, seen - real, 0), axis=1)
    return jnp.maximum(seen - 1 - before_segment, 0)


def rope_frequencies(cfg: TransformerConfig) -> Array:
    """Inverse frequencies [Dh/2] with optional linear or Llama-3 scaling."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / cfg.head_dim))
    scaling = cfg.rope_scaling
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotates pairs (i, i + Dh/2) of `x` [B, T, N, Dh] by angle position·freq_i."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _param_init(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * y).astype(self.dtype)


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
    dtype = jnp.dtype(cfg.dtype)
    if cfg.family == Family.GPT2:
        return nn.LayerNorm(
            epsilon=cfg.norm_eps,
            dtype=dtype,
            scale_init=_param_init(nn.initializers.ones, ("norm",)),
            bias_init=_param_init(nn.initializers.zeros, ("norm",)),
            name=name,
        )
    return RMSNorm(cfg.norm_eps, dtype, name=name)


def _declare_dense(module: nn.Module, in_features: int, features: int, names: tuple,
                   use_bias: bool):
    """`nn.Dense`'s params on `module`: kernel [in, features] and bias [features] (or None)."""
    kernel = module.param("kernel", _param_init(_kernel_init, names), (in_features, features),
                          jnp.float32)
    bias = (module.param("bias", _param_init(nn.initializers.zeros, names[-1:]), (features,),
                         jnp.float32) if use_bias else None)
    return kernel, bias


class _DenseWeights(nn.Module):
    """A dense layer's parameters, kernel [in, features] (and bias), declared but not applied.

    Same names and shapes as `nn.Dense`'s, so checkpoints and the Hugging Face mapping see no
    difference; `_fused_dense` applies several of them as one matmul.
    """

    features: int
    names: tuple
    use_bias: bool

    @nn.compact
    def __call__(self, in_features: int):
        return _declare_dense(self, in_features, self.features, self.names, self.use_bias)


class _Dense(nn.Module):
    """`nn.Dense` (same params, same result) as a 2-D matmul: [B, T, D] → [B·T, D] @ [D, F].

    With the leading axes flattened, the kernel's gradient is a plain [B·T, D]ᵀ × [B·T, F]
    dot. From `nn.Dense`'s [B, T, D] form, XLA:CPU first transposed the output gradient to
    [F, B·T] and ran the dot on a slower kernel: the base model's (12 layers, width 768)
    PPO forward + backward of policy and critic over 16 × 64 tokens took 6.1–6.3 s on 2 cores,
    5.7–5.9 s flattened. (Flattening the tied LM head or `_fused_dense`'s input the same way
    measured no better.) Batch is the leading, sharded axis, so [B·T] keeps its sharding.
    """

    features: int
    names: tuple
    use_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel, bias = _declare_dense(self, x.shape[-1], self.features, self.names, self.use_bias)
        y = _matmul(self, "kernel", x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel,
                    self.dtype)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y.reshape(*x.shape[:-1], self.features)


def panel_dot(x: Array, panels, dtype) -> Array:
    """x [M, K] times a kernel given as its column panels (`panels.column_panels`): [M, N]."""
    return jnp.concatenate([jnp.dot(x, p.astype(dtype)) for p in panels], axis=-1)


def _matmul(module: nn.Module, name: str, x: Array, kernel: Array, dtype) -> Array:
    """x [M, K] @ kernel [K, N], or from the kernel's column panels when the caller passed
    them in the "panels" collection under `name` (the decode loop on CPU does; see
    rlhf_jax/models/panels.py)."""
    if module.has_variable("panels", name):
        return panel_dot(x, module.get_variable("panels", name), dtype)
    return jnp.dot(x, kernel.astype(dtype))


def _fused_dense(module: nn.Module, name: str, x: Array, weights: list, dtype) -> list:
    """[x @ W_i + b_i for each (W_i, b_i)] computed as one matmul over the stacked kernels.

    The kernels (all [D, F]) are stacked on a new middle axis, [D, n, F], so one dot of
    width n·F replaces n narrow ones (on CPU a [2048, 256] × [256, 256] dot runs at half the
    rate of a [256, 768] one), and a kernel sharded on F stays sharded without moving data.
    `name` is the panels' name on `module` (see `_matmul`).
    """
    if module.has_variable("panels", name):
        y = panel_dot(x.reshape(-1, x.shape[-1]).astype(dtype),
                      module.get_variable("panels", name), dtype)
        y = y.reshape(*x.shape[:-1], len(weights), -1)
    else:
        kernel = jnp.stack([k for k, _ in weights], axis=1).astype(dtype)
        y = jnp.einsum("...d,dnf->...nf", x.astype(dtype), kernel)
    if weights[0][1] is not None:
        y = y + jnp.stack([b for _, b in weights]).astype(dtype)
    return [y[..., i, :] for i in range(len(weights))]


def _attention_weights(scores: Array, allowed: Array) -> Array:
    """Softmax over the last axis in float32, with disallowed keys at the most negative value.

    A row with no allowed key (a padded query) gets uniform weights instead of NaN.
    """
    scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, token_mask, layer_cache=None, cache_mask=None, index=None,
                 segment_ids=None):
        """x [B, T, D] → (out [B, T, D], (k, v)).

        Without a cache, (k, v) are the tokens' own, each [B, T, K, Dh]. With this layer's
        `layer_cache` (k, v) [B, K, S, Dh], the new keys/values are first written at slot
        `index` and every query attends over the cache up to its own slot, where
        `cache_mask` [B, S] (new tokens included) is set; (k, v) is the updated cache.
        Writing before reading lets XLA update the cache in place inside a decode loop.
        `segment_ids` [B, T] (packed rows, no cache): a query sees only keys of its segment.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        h, kh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = h // kh
        d_in = x.shape[-1]
        wq = _DenseWeights(h * dh, ("embed", "heads"), cfg.qkv_bias, name="q")(d_in)
        wk = _DenseWeights(kh * dh, ("embed", "kv_heads"), cfg.qkv_bias, name="k")(d_in)
        wv = _DenseWeights(kh * dh, ("embed", "kv_heads"), cfg.qkv_bias, name="v")(d_in)
        if kh == h:  # one matmul for q, k and v
            q, k, v = _fused_dense(self, "qkv", x, [wq, wk, wv], dtype)
        else:  # grouped-query attention: q is wider than k and v
            (q,) = _fused_dense(self, "q", x, [wq], dtype)
            k, v = _fused_dense(self, "kv", x, [wk, wv], dtype)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, kh, dh), v.reshape(b, t, kh, dh)
        if not cfg.learned_positions:
            inv_freq = rope_frequencies(cfg)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        q = q.reshape(b, t, kh, g, dh) * jnp.asarray(1.0 / math.sqrt(dh), dtype)
        if layer_cache is None:
            # Each token sees the earlier (causal) real tokens.
            causal = jnp.tril(jnp.ones((t, t), bool))
            allowed = causal[None, None, None] & token_mask[:, None, None, None, :].astype(bool)
            if segment_ids is not None:  # packed rows: only keys of the query's own example
                same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
                allowed = allowed & same[:, None, None]
            weights = _attention_weights(jnp.einsum("btkgd,bskd->bkgts", q, k), allowed)
            out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(dtype), v)
            new_kv = (k, v)
        else:
            new_kv = tuple(
                jax.lax.dynamic_update_slice(
                    stored, jnp.swapaxes(new, 1, 2).astype(stored.dtype), (0, 0, index, 0))
                for stored, new in zip(layer_cache, (k, v))
            )  # [B, K, S, Dh] each
            cached_k, cached_v = new_kv
            slots = jnp.arange(cached_k.shape[2])
            causal = slots[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
            allowed = causal[None, None, None] & cache_mask[:, None, None, None, :]
            weights = _attention_weights(jnp.einsum("btkgd,bksd->bkgts", q, cached_k), allowed)
            out = jnp.einsum("bkgts,bksd->btkgd", weights.astype(dtype), cached_v)
        out = out.reshape(b, t, h * dh)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads"))
        use_o_bias = cfg.family == Family.GPT2
        out = _Dense(cfg.hidden_size, ("heads", "embed"), use_o_bias, dtype, name="o")(out)
        return out, new_kv


class MLP(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        f, d = cfg.intermediate_size, cfg.hidden_size
        if cfg.family == Family.GPT2:
            fc = _Dense(f, ("embed", "mlp"), True, dtype, name="fc")
            hidden = jax.nn.gelu(fc(x), approximate=True)
        else:
            weights = [_DenseWeights(f, ("embed", "mlp"), False, name=n)(d) for n in ("gate", "up")]
            gate, up = _fused_dense(self, "gate_up", x, weights, dtype)
            hidden = jax.nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
        return _Dense(d, ("mlp", "embed"), cfg.family == Family.GPT2, dtype, name="down")(hidden)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, token_mask, cache_mask, index, segment_ids=None):
        attn_out, new_kv = Attention(self.cfg, name="attn")(
            _norm(self.cfg, "attn_norm")(x), positions, token_mask, layer_cache, cache_mask, index,
            segment_ids,
        )
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, new_kv


class Transformer(nn.Module):
    """The trunk: embeddings, L blocks, final norm. Returns hidden states [B, T, D]."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=jnp.dtype(cfg.dtype),
            embedding_init=_param_init(_kernel_init, ("vocab", "embed")),
        )
        if cfg.learned_positions:
            self.pos_embed = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=jnp.dtype(cfg.dtype),
                embedding_init=_param_init(nn.initializers.normal(0.01), (None, "embed")),
            )
        block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
        if cfg.scan_layers:
            # Block's (x, layer_cache, ...) -> (x, new_kv) is scan's (carry, xs) -> (carry, ys).
            self.layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = _norm(cfg, "final_norm")

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        cache: Optional[KVCache] = None,
        segment_ids: Optional[Array] = None,
    ) -> tuple[Array, Optional[KVCache]]:
        """input_ids [B, T] → (hidden [B, T, D], updated cache or None).

        `segment_ids` [B, T] int (calls without a cache only) packs several examples in a
        row: 1, 2, … number them, 0 is padding. Tokens attend only within their example and
        positions restart at each, so every example gets the logits it would get alone.
        """
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) apply only to calls without a cache")
            attention_mask = attention_mask * (segment_ids > 0)
        token_mask = attention_mask.astype(bool)
        if segment_ids is None:
            positions = position_ids(attention_mask, None if cache is None else cache.lengths)
        else:
            positions = segment_position_ids(attention_mask, segment_ids)
        x = self.embed(input_ids)
        if cfg.learned_positions:
            x = x + self.pos_embed(positions)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if cache is None:
            cache_mask = index = None
        else:
            index = cache.index
            cache_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
        if cfg.scan_layers:
            layer_caches = None if cache is None else (cache.k, cache.v)
            x, new_kv = self.layers(x, layer_caches, positions, token_mask, cache_mask, index,
                                    segment_ids)
        else:
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x, (k, v) = layer(x, layer_cache, positions, token_mask, cache_mask, index,
                                  segment_ids)
                new_k.append(k)
                new_v.append(v)
            new_kv = (tuple(new_k), tuple(new_v))
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(
            k=new_kv[0],
            v=new_kv[1],
            mask=cache_mask,
            lengths=cache.lengths + token_mask.sum(axis=1, dtype=jnp.int32),
            index=index + token_mask.shape[1],
        )


def last_token_index(attention_mask: Optional[Array], length: int) -> Array:
    """Index of the rightmost real token of each row [B] (left or right padding)."""
    if attention_mask is None:
        return jnp.full((1,), length - 1, jnp.int32)
    idx = jnp.arange(length, dtype=jnp.int32)[None, :] * attention_mask.astype(jnp.int32)
    return jnp.argmax(idx, axis=1).astype(jnp.int32)


class CausalLM(nn.Module):
    """Policy / reference model: logits [B, T, V] in float32 (plus the cache when given)."""

    cfg: TransformerConfig

    def setup(self):
        self.model = Transformer(self.cfg)
        if not self.cfg.tie_word_embeddings:
            self.lm_head = _Dense(self.cfg.vocab_size, ("embed", "vocab"), False,
                                  jnp.dtype(self.cfg.dtype), name="lm_head")

    def logits(self, hidden: Array) -> Array:
        if self.cfg.tie_word_embeddings:
            logits = self.model.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, cache=None, segment_ids=None,
                 logit_columns: Optional[tuple[int, int]] = None):
        """Logits [B, T, V]; with `logit_columns` (start, stop) only those of columns
        start … stop − 1 [B, stop − start, V] (the LM head is not run on the others: PPO
        needs the logits that predict the response only)."""
        hidden, cache = self.model(input_ids, attention_mask, cache, segment_ids)
        logits = self.logits(_columns(hidden, logit_columns))
        return logits if cache is None else (logits, cache)


def _columns(hidden: Array, columns: Optional[tuple[int, int]]) -> Array:
    return hidden if columns is None else hidden[:, columns[0]:columns[1]]


class CausalLMWithValueHead(CausalLM):
    """Policy with a value head on the shared trunk: (logits [B, T, V], values [B, T])."""

    def setup(self):
        super().setup()
        self.value_head = _Dense(1, ("embed", None), True, jnp.float32, name="value_head")

    def __call__(self, input_ids, attention_mask=None, cache=None,
                 logit_columns: Optional[tuple[int, int]] = None):
        """As `CausalLM`; the values [B, T] always cover every column."""
        hidden, new_cache = self.model(input_ids, attention_mask, cache)
        values = self.value_head(hidden.astype(jnp.float32))[..., 0]
        out = (self.logits(_columns(hidden, logit_columns)), values)
        return out if cache is None else (*out, new_cache)


class RewardModel(nn.Module):
    """Scalar head on the trunk, `score` as in `*ForSequenceClassification`.

    Returns the score at the rightmost real token [B], or at every token [B, T] with
    `per_token=True` (how a separate critic initialised from the reward model is used).
    Scores are `gain · (w·h) + bias`; gain and bias come from reward normalisation.
    """

    cfg: TransformerConfig
    gain: float = 1.0
    bias: float = 0.0

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, per_token: bool = False):
        hidden, _ = Transformer(self.cfg, name="model")(input_ids, attention_mask)
        head = _Dense(1, ("embed", None), False, jnp.float32, name="score")
        scores = head(hidden.astype(jnp.float32))[..., 0] * self.gain + self.bias  # [B, T]
        if per_token:
            return scores
        last = last_token_index(attention_mask, input_ids.shape[1])
        return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]
