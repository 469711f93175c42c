"""Architecture of a decoder-only transformer, and its mapping to Hugging Face `config.json`.

One frozen dataclass describes every supported family; the family only chooses defaults
(GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings; Llama: RoPE, RMSNorm,
SwiGLU, grouped-query attention; Qwen2: Llama plus q/k/v biases).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, Optional

from rlhf_jax.models.safetensors_io import ModelFileError


class Family(str, enum.Enum):
    GPT2 = "gpt2"
    LLAMA = "llama"
    QWEN2 = "qwen2"


# Hugging Face architecture names we read and write, per family and head.
CAUSAL_LM_ARCH = {
    Family.GPT2: "GPT2LMHeadModel",
    Family.LLAMA: "LlamaForCausalLM",
    Family.QWEN2: "Qwen2ForCausalLM",
}
SEQ_CLS_ARCH = {
    Family.GPT2: "GPT2ForSequenceClassification",
    Family.LLAMA: "LlamaForSequenceClassification",
    Family.QWEN2: "Qwen2ForSequenceClassification",
}
BASE_ARCH = {Family.GPT2: "GPT2Model", Family.LLAMA: "LlamaModel", Family.QWEN2: "Qwen2Model"}
SUPPORTED_ARCHITECTURES = sorted(
    [*CAUSAL_LM_ARCH.values(), *SEQ_CLS_ARCH.values(), *BASE_ARCH.values()]
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` / `rope_parameters` in Hugging Face configs)."""

    rope_type: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of the transformer trunk.

    Attributes:
      family: which architecture family the weights follow (names and layout on export).
      vocab_size: rows of the token embedding.
      hidden_size: model width D.
      num_layers: number of decoder blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads (H for multi-head, fewer for grouped-query attention).
      head_dim: per-head width; D // H when None.
      intermediate_size: MLP hidden width.
      max_position_embeddings: longest sequence (size of the learned position table for GPT-2).
      norm_eps: epsilon of LayerNorm / RMSNorm.
      rope_theta: RoPE base frequency (RoPE families only).
      rope_scaling: optional RoPE frequency scaling.
      qkv_bias: bias on the q/k/v projections.
      tie_word_embeddings: LM head shares the token embedding.
      pad_token_id / bos_token_id / eos_token_id: special ids carried through to exports.
      dtype: compute dtype, "float32" or "bfloat16" (params are always float32).
      remat: rematerialise each block in the backward pass (saves activation memory).
      scan_layers: run the blocks with `nn.scan` (params stacked on a leading layer axis);
        compiles in constant time in the depth. False unrolls the blocks.
    """

    family: Family = Family.LLAMA
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "family", Family(self.family))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is not supported: use 'float32' or 'bfloat16'")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in (
            "default", "linear", "llama3"
        ):
            raise ValueError(
                f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported: "
                "use 'default', 'linear' or 'llama3'"
            )

    @property
    def learned_positions(self) -> bool:
        return self.family == Family.GPT2

    @property
    def num_params(self) -> int:
        """Parameter count of the trunk plus LM head (the N in FLOPs ≈ 6·N·tokens)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = d * f * (2 if self.family == Family.GPT2 else 3)
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        pos = self.max_position_embeddings * d if self.learned_positions else 0
        return self.num_layers * (attn + mlp) + emb + pos

    def replace(self, **kw) -> "TransformerConfig":
        return dataclasses.replace(self, **kw)


def dtype_warning(dtype: str, backend: str) -> Optional[str]:
    """The one-line warning for computing in `dtype` on `backend` (`jax.default_backend()`),
    or None when there is nothing to say.

    bfloat16 pays on GPUs and TPUs, whose matrix units run it natively; XLA's CPU backend
    computes it through conversions, and our PPO iteration ran 1.7x slower in bfloat16 than
    in float32 on the 2-core CPU of benchmarks/README.md. Commands print the warning and go on.
    """
    if dtype == "bfloat16" and backend == "cpu":
        return ("dtype bfloat16 on the CPU runs slower than float32 (XLA:CPU converts it: a PPO "
                "iteration took 1.7x as long); use float32 on the CPU, bfloat16 on a GPU or TPU")
    return None


def _first(d: Mapping[str, Any], *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Optional[RopeScaling]]:
    params = dict(hf.get("rope_parameters") or {})  # transformers >= 5
    legacy = hf.get("rope_scaling") or {}  # transformers 4.x
    params = {**legacy, **params}
    theta = float(_first(params, "rope_theta", default=_first(hf, "rope_theta", default=10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ModelFileError(
            f"RoPE scaling {rope_type!r} is not supported; supported: 'default', 'linear', 'llama3'"
        )
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _token_id(value):
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(hf: Mapping[str, Any]) -> TransformerConfig:
    """Reads a Hugging Face `config.json` dict into a TransformerConfig."""
    model_type = hf.get("model_type")
    ids = dict(
        pad_token_id=_token_id(hf.get("pad_token_id")),
        bos_token_id=_token_id(hf.get("bos_token_id")),
        eos_token_id=_token_id(hf.get("eos_token_id")),
    )
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ModelFileError(
                "GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                "are not supported; set them to false"
            )
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelFileError(
                f"GPT-2 activation {hf.get('activation_function')!r} is not supported; use 'gelu_new'"
            )
        d = hf["n_embd"]
        return TransformerConfig(
            family=Family.GPT2,
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * d,
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            qkv_bias=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **ids,
        )
    if model_type in ("llama", "qwen2"):
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelFileError(f"activation {hf.get('hidden_act')!r} is not supported; use 'silu'")
        if model_type == "llama" and (hf.get("mlp_bias") or hf.get("attention_bias")):
            raise ModelFileError("Llama attention_bias / mlp_bias are not supported; set them to false")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ModelFileError("Qwen2 use_sliding_window=true is not supported; set it to false")
        theta, scaling = _rope_from_hf(hf)
        family = Family.LLAMA if model_type == "llama" else Family.QWEN2
        return TransformerConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=family == Family.QWEN2,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            **ids,
        )
    raise ModelFileError(
        f"unsupported model_type {model_type!r}; supported families: "
        f"{', '.join(f.value for f in Family)}"
    )


def to_hf_config(cfg: TransformerConfig, architecture: str, num_labels: int = 1) -> dict:
    """Writes the Hugging Face `config.json` dict for `cfg` and the given architecture name."""
    ids = {
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    common = {"architectures": [architecture], "tie_word_embeddings": cfg.tie_word_embeddings,
              "dtype": "float32", **ids}
    if architecture.endswith("ForSequenceClassification"):
        common["num_labels"] = num_labels
        common["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        common["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if cfg.family == Family.GPT2:
        return {
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            **common,
        }
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dataclasses.asdict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    out = {
        "model_type": cfg.family.value,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "attention_dropout": 0.0,
        **common,
    }
    if cfg.family == Family.LLAMA:
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def flops_per_token(cfg: TransformerConfig, seq_len: int, training: bool) -> float:
    """Model FLOPs per token: 2·N forward (6·N training) plus attention's 2·2·L·D·T per token.

    Attention FLOPs per token at context T: QKᵀ and AV each 2·T·H·Dh per layer (forward);
    averaged over a causal sequence this is about half, but we count the full T as peers do
    (PaLM appendix B, nanoGPT `estimate_mfu`).
    """
    n = cfg.num_params - (cfg.max_position_embeddings * cfg.hidden_size if cfg.learned_positions else 0)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    fwd = 2 * n + attn
    return 3 * fwd if training else fwd
