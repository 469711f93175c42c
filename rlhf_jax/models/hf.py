"""Hugging Face model directories in and out, without torch.

`load_hf(path)` reads `config.json` + safetensors (one file or shards with an index) into one
of our modules and its params; `save_hf(path, model, params)` writes a directory that
`transformers`' `from_pretrained` loads with the same outputs.

Each family's layout is a table of `Entry`s: one Hugging Face tensor ↔ one or more of our
params (GPT-2's fused `c_attn` ↔ our q, k, v). PyTorch `Linear` stores [out, in], Flax
`Dense` [in, out]: those entries are transposed; GPT-2's `Conv1D` already stores [in, out].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.models import safetensors_io
from rlhf_jax.models.safetensors_io import ModelFileError
from rlhf_jax.models.config import (
    BASE_ARCH,
    CAUSAL_LM_ARCH,
    SEQ_CLS_ARCH,
    SUPPORTED_ARCHITECTURES,
    Family,
    TransformerConfig,
    from_hf_config,
    to_hf_config,
)
from rlhf_jax.models.transformer import CausalLM, CausalLMWithValueHead, RewardModel

log = logging.getLogger(__name__)

HEADS = ("lm", "lm+value", "reward")
VALUE_HEAD_FILE = "value_head.safetensors"
SCORE_BIAS_KEY = "rlhf_jax_score_bias"  # config.json key for a bias the HF head cannot hold


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str  # Hugging Face tensor name ("{i}" = layer index)
    ours: tuple[tuple[str, ...], ...]  # our param paths; several = split along the last axis
    transpose: bool


def _layer_entries(cfg: TransformerConfig) -> list[Entry]:
    if cfg.family == Family.GPT2:
        qkv = lambda leaf: tuple(("attn", p, leaf) for p in ("q", "k", "v"))  # noqa: E731
        return [
            Entry("h.{i}.ln_1.weight", (("attn_norm", "scale"),), False),
            Entry("h.{i}.ln_1.bias", (("attn_norm", "bias"),), False),
            Entry("h.{i}.attn.c_attn.weight", qkv("kernel"), False),
            Entry("h.{i}.attn.c_attn.bias", qkv("bias"), False),
            Entry("h.{i}.attn.c_proj.weight", (("attn", "o", "kernel"),), False),
            Entry("h.{i}.attn.c_proj.bias", (("attn", "o", "bias"),), False),
            Entry("h.{i}.ln_2.weight", (("mlp_norm", "scale"),), False),
            Entry("h.{i}.ln_2.bias", (("mlp_norm", "bias"),), False),
            Entry("h.{i}.mlp.c_fc.weight", (("mlp", "fc", "kernel"),), False),
            Entry("h.{i}.mlp.c_fc.bias", (("mlp", "fc", "bias"),), False),
            Entry("h.{i}.mlp.c_proj.weight", (("mlp", "down", "kernel"),), False),
            Entry("h.{i}.mlp.c_proj.bias", (("mlp", "down", "bias"),), False),
        ]
    entries = [
        Entry(f"layers.{{i}}.self_attn.{p}_proj.weight", (("attn", p, "kernel"),), True)
        for p in ("q", "k", "v", "o")
    ]
    if cfg.qkv_bias:
        entries += [
            Entry(f"layers.{{i}}.self_attn.{p}_proj.bias", (("attn", p, "bias"),), False)
            for p in ("q", "k", "v")
        ]
    entries += [
        Entry(f"layers.{{i}}.mlp.{p}_proj.weight", (("mlp", p, "kernel"),), True)
        for p in ("gate", "up", "down")
    ]
    entries += [
        Entry("layers.{i}.input_layernorm.weight", (("attn_norm", "scale"),), False),
        Entry("layers.{i}.post_attention_layernorm.weight", (("mlp_norm", "scale"),), False),
    ]
    return entries


def _trunk_prefix(cfg: TransformerConfig) -> str:
    return "transformer." if cfg.family == Family.GPT2 else "model."


def _top_entries(cfg: TransformerConfig, head: str) -> list[Entry]:
    if cfg.family == Family.GPT2:
        entries = [
            Entry("wte.weight", (("model", "embed", "embedding"),), False),
            Entry("wpe.weight", (("model", "pos_embed", "embedding"),), False),
            Entry("ln_f.weight", (("model", "final_norm", "scale"),), False),
            Entry("ln_f.bias", (("model", "final_norm", "bias"),), False),
        ]
    else:
        entries = [
            Entry("embed_tokens.weight", (("model", "embed", "embedding"),), False),
            Entry("norm.weight", (("model", "final_norm", "scale"),), False),
        ]
    prefix = _trunk_prefix(cfg)
    entries = [dataclasses.replace(e, hf=prefix + e.hf) for e in entries]
    if head in ("lm", "lm+value") and not cfg.tie_word_embeddings:
        entries.append(Entry("lm_head.weight", (("lm_head", "kernel"),), True))
    if head == "reward":
        entries.append(Entry("score.weight", (("score", "kernel"),), True))
    return entries


def make_model(cfg: TransformerConfig, head: str = "lm", gain: float = 1.0, bias: float = 0.0):
    """The Flax module for `head`: 'lm' (policy), 'lm+value' (policy + value head), 'reward'."""
    if head == "lm":
        return CausalLM(cfg)
    if head == "lm+value":
        return CausalLMWithValueHead(cfg)
    if head == "reward":
        return RewardModel(cfg, gain=gain, bias=bias)
    raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")


def head_of(model: nn.Module) -> str:
    if isinstance(model, RewardModel):
        return "reward"
    if isinstance(model, CausalLMWithValueHead):
        return "lm+value"
    if isinstance(model, CausalLM):
        return "lm"
    raise TypeError(f"{type(model).__name__} is not an rlhf_jax model")


def abstract_params(model: nn.Module) -> Any:
    """Shapes/dtypes of `model`'s params, boxed with logical axis names (nothing computed)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    with nn.logical_axis_rules(()):  # shapes only: no activation constraints, whatever the context
        return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]


def _get(tree: dict, path: Sequence[str]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer_path(cfg: TransformerConfig, i: int, path: tuple[str, ...]) -> tuple[str, ...]:
    return ("model", "layers", *path) if cfg.scan_layers else ("model", f"layers_{i}", *path)


def _expected_shape(abstract: dict, cfg, entry: Entry, i: Optional[int]) -> tuple[int, ...]:
    shapes = []
    for path in entry.ours:
        full = path if i is None else _layer_path(cfg, i, path)
        shape = tuple(shd.strip_boxes(_get(abstract, full)).shape)
        shapes.append(shape[1:] if (i is not None and cfg.scan_layers) else shape)
    merged = (*shapes[0][:-1], sum(s[-1] for s in shapes))
    return merged[::-1] if entry.transpose else merged


def _hf_to_ours(entry: Entry, x: np.ndarray) -> list[np.ndarray]:
    x = np.asarray(x, np.float32)
    if entry.transpose:
        x = x.T
    return np.split(x, len(entry.ours), axis=-1) if len(entry.ours) > 1 else [x]


def _ours_to_hf(entry: Entry, parts: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return np.ascontiguousarray(x.T if entry.transpose else x)


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path} not found: a Hugging Face model directory needs config.json and "
            "model.safetensors (or model.safetensors.index.json)"
        )
    with open(cfg_path) as f:
        hf = json.load(f)
    if hf.get("auto_map"):
        raise ModelFileError(
            f"{cfg_path} has auto_map (custom modelling code); rlhf_jax loads only its built-in "
            f"architectures ({', '.join(SUPPORTED_ARCHITECTURES)}) and never runs remote code"
        )
    return hf


def _head_from_architecture(hf: dict) -> str:
    archs = hf.get("architectures") or [CAUSAL_LM_ARCH.get(Family(hf["model_type"]), "")]
    arch = archs[0]
    if arch in CAUSAL_LM_ARCH.values():
        return "lm"
    if arch in SEQ_CLS_ARCH.values():
        num_labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
        if num_labels != 1:
            raise ModelFileError(
                f"{arch} with {num_labels} labels cannot be a reward model; it needs num_labels=1"
            )
        return "reward"
    if arch in BASE_ARCH.values():
        raise ModelFileError(
            f"{arch} is a trunk without a head: pass head='reward' to add a new score head, "
            "or head='lm' (tied embeddings only)"
        )
    raise ModelFileError(
        f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def load_hf(
    path: str,
    head: Optional[str] = None,
    *,
    mesh=None,
    rules=shd.DEFAULT_RULES,
    seed: int = 0,
    **config_overrides,
) -> tuple[nn.Module, Any]:
    """Loads a local Hugging Face model directory.

    Args:
      path: directory with config.json and model.safetensors (or sharded + index).
      head: 'lm', 'lm+value' or 'reward'; default from the checkpoint's architecture
        (`*ForCausalLM` → 'lm', `*ForSequenceClassification` with one label → 'reward').
        A head the checkpoint lacks (a reward head on a causal LM, a value head) is
        initialised from N(0, 0.02²) with `seed`, and logged.
      mesh, rules: when a mesh is given, params are placed sharded on it.
      **config_overrides: TransformerConfig fields such as dtype="bfloat16", remat=True,
        scan_layers=False.

    Returns:
      (model, params): `model.apply({"params": params}, input_ids, attention_mask)`.
    """
    hf = _read_config(path)
    head = head or _head_from_architecture(hf)
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
    cfg = from_hf_config(hf).replace(**config_overrides)
    bias = float(hf.get(SCORE_BIAS_KEY, 0.0))
    model = make_model(cfg, head, bias=bias)
    abstract = abstract_params(model)
    files = safetensors_io.CheckpointFiles(path)
    prefix = _trunk_prefix(cfg)

    def file_name(entry: Entry, i: Optional[int]) -> str:
        name = entry.hf if i is None else prefix + entry.hf.format(i=i)
        if name not in files and name.startswith(prefix) and name[len(prefix):] in files:
            name = name[len(prefix):]  # a bare trunk checkpoint (GPT2Model, LlamaModel)
        if name not in files:
            raise ModelFileError(f"{path}: tensor {name} is missing from the checkpoint")
        want = _expected_shape(abstract, cfg, entry, i)
        if files.shape(name) != want:
            raise ModelFileError(
                f"{path}: tensor {name} has shape {files.shape(name)} but the config implies {want}"
            )
        return name

    host: dict = {}
    for entry in _top_entries(cfg, head):
        if entry.ours[0][0] == "score" and entry.hf not in files:
            continue  # a causal LM loaded as a reward model: new head below
        name = file_name(entry, None)
        for j, p in enumerate(entry.ours):
            _set(host, p, LazyParam.of(files, [name], entry, j, stacked=False))
    for entry in _layer_entries(cfg):
        names = [file_name(entry, i) for i in range(cfg.num_layers)]
        for j, p in enumerate(entry.ours):
            if cfg.scan_layers:
                _set(host, _layer_path(cfg, 0, p), LazyParam.of(files, names, entry, j, True))
            else:
                for i, name in enumerate(names):
                    _set(host, _layer_path(cfg, i, p), LazyParam.of(files, [name], entry, j,
                                                                    False))
    _add_missing_heads(host, abstract, path, seed)
    return model, _to_device(host, model, abstract, mesh, rules)


class LazyParam:
    """One of our params, read from the checkpoint's files only where indexed: `param[idx]`
    reads just that slice (float32), so placing params sharded reads on each process only
    the slices its devices hold, never the whole model. `np.asarray(param)` reads it all.

    Our param is part `part` of the file tensors' last axis after the entry's transpose;
    `stacked` puts one file tensor per layer along a new first axis (scanned layers).
    """

    def __init__(self, shape: tuple, read):
        self.shape, self.ndim, self._read = tuple(shape), len(shape), read
        self.dtype = np.dtype(np.float32)

    @classmethod
    def of(cls, files, names: list, entry: Entry, part: int, stacked: bool) -> "LazyParam":
        hf_shape = files.shape(names[0])
        ours = hf_shape[::-1] if entry.transpose else hf_shape
        width = ours[-1] // len(entry.ours)
        shape = (*ours[:-1], width)

        def one(name: str, idx: tuple) -> np.ndarray:
            idx = _expand(idx, len(shape))
            last = idx[-1]
            start, stop, step = last.indices(width)
            idx = (*idx[:-1], slice(part * width + start, part * width + stop, step))
            data = files.get(name)
            x = data[idx[::-1]].T if entry.transpose else data[idx]
            return np.asarray(x, np.float32)

        if not stacked:
            return cls(shape, lambda idx: one(names[0], idx))

        def read(idx) -> np.ndarray:
            idx = _expand(idx, len(shape) + 1)
            return np.stack([one(names[i], idx[1:]) for i in range(len(names))[idx[0]]])

        return cls((len(names), *shape), read)

    def __getitem__(self, idx) -> np.ndarray:
        return self._read(idx)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self._read(())
        return x if dtype is None else x.astype(dtype)


def _expand(idx, ndim: int) -> tuple:
    """An index as `ndim` slices (integers are not used by sharded placement)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    return tuple(idx) + (slice(None),) * (ndim - len(idx))


def _add_missing_heads(host: dict, abstract: dict, path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    value_file = os.path.join(path, VALUE_HEAD_FILE)
    for name in ("score", "value_head"):
        if name not in abstract or name in host:
            continue
        if name == "value_head" and os.path.exists(value_file):
            f = safetensors_io.SafetensorsFile(value_file)
            host[name] = {"kernel": f.get("v_head.weight").T.astype(np.float32),
                          "bias": f.get("v_head.bias").astype(np.float32)}
            continue
        log.info("%s has no %s: initialising it from N(0, 0.02^2)", path, name)
        leaves = shd.strip_boxes(abstract[name])
        host[name] = {
            k: (rng.normal(0, 0.02, v.shape) if k == "kernel" else np.zeros(v.shape)).astype(np.float32)
            for k, v in leaves.items()
        }


def _to_device(host: dict, model, abstract, mesh, rules):
    got = jax.tree_util.tree_structure(host)
    want = jax.tree_util.tree_structure(shd.strip_boxes(abstract))
    if got != want:  # a table bug, not a user error: say which params differ
        raise AssertionError(f"loaded param tree differs from the model's: {got} vs {want}")
    if mesh is None:
        return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), host)
    return shd.place(host, shd.shardings_for(abstract, mesh, rules))


def host_array(x) -> np.ndarray:
    """A param as a float32 numpy array on this host. An array split over several processes
    is gathered (every process must call this, in the same order); anything else is copied
    from its devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)


def hf_tensors(model: nn.Module, params: Any) -> list[tuple[str, tuple, Any]]:
    """(Hugging Face name, shape, fetch) of every exported tensor, sorted by name; `fetch()`
    brings that one tensor to this host (`host_array` of its parts, a scanned layer's slice
    only), so an export holds one tensor at a time, never the whole model."""
    cfg, head = model.cfg, head_of(model)
    abstract = abstract_params(model)
    prefix = _trunk_prefix(cfg)
    out = []
    for entry in _top_entries(cfg, head):
        def fetch(entry=entry):
            return _ours_to_hf(entry, [host_array(_get(params, p)) for p in entry.ours])
        out.append((entry.hf, _expected_shape(abstract, cfg, entry, None), fetch))
    for entry in _layer_entries(cfg):
        for i in range(cfg.num_layers):
            def fetch(entry=entry, i=i):
                parts = [_get(params, _layer_path(cfg, i, p)) for p in entry.ours]
                return _ours_to_hf(entry, [host_array(x[i] if cfg.scan_layers else x)
                                           for x in parts])
            out.append((prefix + entry.hf.format(i=i), _expected_shape(abstract, cfg, entry, i),
                        fetch))
    if head == "reward":
        out = _fold_reward_normalisation(model, out, prefix)
    return sorted(out, key=lambda t: t[0])


def params_to_hf(model: nn.Module, params: Any) -> dict[str, np.ndarray]:
    """Our params → Hugging Face tensor names and layouts (float32 numpy), all at once."""
    return {name: fetch() for name, _, fetch in hf_tensors(model, params)}


def _fold_reward_normalisation(model: RewardModel, tensors: list, prefix: str) -> list:
    """Folds score = gain·(w·h) + bias into the exported weights.

    gain scales w. A bias fits only where the final norm has one (GPT-2's LayerNorm β):
    adding bias·w/|w|² to β adds exactly `bias` to w·h. Elsewhere it stays in config.json
    (`SCORE_BIAS_KEY`), which we read back; transformers' raw scores then lack that constant.
    """
    fetches = {name: fetch for name, _, fetch in tensors}
    score_w = lambda: (fetches["score.weight"]() * model.gain).astype(np.float32)  # noqa: E731
    new = {"score.weight": score_w}
    if model.bias and model.cfg.family == Family.GPT2:
        def ln_f_bias():
            w = score_w()  # [1, D]
            beta = fetches[prefix + "ln_f.bias"]()
            return (beta + model.bias * w[0] / np.dot(w[0], w[0])).astype(np.float32)
        new[prefix + "ln_f.bias"] = ln_f_bias
    return [(name, shape, new.get(name, fetch)) for name, shape, fetch in tensors]


def save_hf(
    path: str,
    model: nn.Module,
    params: Any,
    tokenizer=None,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Writes a Hugging Face model directory (config.json, safetensors, tokenizer if given).

    Files above `max_shard_bytes` are split into shards with `model.safetensors.index.json`,
    as transformers writes them. Tensors are fetched and written one at a time. With params
    split over several processes every process must call this (each tensor is gathered
    collectively); only process 0 writes. A `CausalLMWithValueHead` is written as a causal
    LM plus `value_head.safetensors`.
    """
    writer = jax.process_index() == 0
    cfg, head = model.cfg, head_of(model)
    arch = SEQ_CLS_ARCH[cfg.family] if head == "reward" else CAUSAL_LM_ARCH[cfg.family]
    hf_cfg = to_hf_config(cfg, arch)
    if head == "reward" and model.bias and cfg.family != Family.GPT2:
        hf_cfg[SCORE_BIAS_KEY] = float(model.bias)
        if writer:
            log.warning(
                "%s cannot hold the reward bias %.4g in its score head; it is stored as %s in "
                "config.json (rlhf_jax applies it; transformers' raw scores lack it)",
                arch, model.bias, SCORE_BIAS_KEY,
            )
    if writer:
        os.makedirs(path, exist_ok=True)
    _write_shards(path, hf_tensors(model, params), max_shard_bytes, writer)
    value_head = ({"v_head.weight": host_array(params["value_head"]["kernel"]).T.copy(),
                   "v_head.bias": host_array(params["value_head"]["bias"])}
                  if head == "lm+value" else None)
    if not writer:
        return
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if value_head is not None:
        safetensors_io.write(os.path.join(path, VALUE_HEAD_FILE), value_head)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _write_shards(path: str, tensors: list, max_shard_bytes: int, writer: bool) -> None:
    """Streams `hf_tensors` into one safetensors file, or shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own) with their index; files only where `writer`."""
    shards: list[list] = [[]]
    size = 0
    for name, shape, fetch in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, fetch))
        size += nbytes
    if writer:
        for stale in ("model.safetensors", "model.safetensors.index.json"):
            if os.path.exists(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    for fname, shard in zip(names, shards):
        arrays = (fetch() for _, _, fetch in shard)  # fetched by every process, in order
        if writer:
            safetensors_io.write_streamed(os.path.join(path, fname),
                                          [(n, shape, np.float32) for n, shape, _ in shard],
                                          arrays, {"format": "pt"})
        else:
            for _ in arrays:
                pass
    if len(shards) == 1 or not writer:
        return
    weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
    total = sum(int(np.prod(shape, dtype=np.int64)) * 4 for _, shape, _ in tensors)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def load_tokenizer(path: str):
    """`transformers.AutoTokenizer` from a local directory (no download, no remote code)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def init_model(
    cfg: TransformerConfig,
    head: str = "lm",
    seed: int = 0,
    mesh=None,
    rules=shd.DEFAULT_RULES,
) -> tuple[nn.Module, Any]:
    """A randomly initialised model (sharded on `mesh` when given)."""
    model = make_model(cfg, head)
    ids = jnp.zeros((1, 1), jnp.int32)
    return model, shd.init_params(model, jax.random.PRNGKey(seed), ids, mesh=mesh, rules=rules)

