"""Test setup: 8 simulated CPU devices (set before jax is imported) and tiny HF checkpoints."""

import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session, shared with the CLI subprocesses the tests start:
# runs that compile the same programs (resume tests, repeated CLI runs) compile them once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# No size cap (jax's default): the session's cache is deleted at exit anyway, and `rlhf-jax`
# run in-process (tests/test_bad_input.py) then leaves jax's settings as they were.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FAMILIES = ("gpt2", "llama", "qwen2")


# Ragged response masks for the loss / advantage tests: two full rows, an empty row, others.
LENGTHS = [9, 4, 0, 6, 1, 9, 3]


def response_mask(lengths=LENGTHS, t=9):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def with_garbage(x, mask, seed=0):
    """x at real positions; huge values and NaN at padding (broadcast over trailing axes)."""
    rng = np.random.default_rng(seed)
    junk = rng.normal(size=x.shape) * 1e4
    junk[rng.uniform(size=x.shape) < 0.3] = np.nan
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return np.where(m > 0, x, junk).astype(np.float32)


def normal(*shape, seed, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(np.float32)


def hf_config(family: str, num_labels: int = 1, **kw):
    """A tiny transformers config; weights drawn wide (std 0.2) so attention is far from uniform."""
    import transformers as T

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels,
               initializer_range=0.2)
    if family == "gpt2":
        return T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=128,
                            **ids, **kw)
    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, vocab_size=97,
                  max_position_embeddings=128, **ids)
    common.update(kw)
    if family == "llama":
        return T.LlamaConfig(**common)
    return T.Qwen2Config(**{"tie_word_embeddings": True, **common})


def hf_class(family: str, head: str):
    import transformers as T

    names = {
        ("gpt2", "lm"): T.GPT2LMHeadModel, ("gpt2", "reward"): T.GPT2ForSequenceClassification,
        ("llama", "lm"): T.LlamaForCausalLM, ("llama", "reward"): T.LlamaForSequenceClassification,
        ("qwen2", "lm"): T.Qwen2ForCausalLM, ("qwen2", "reward"): T.Qwen2ForSequenceClassification,
    }
    return names[(family, head)]


def make_hf_model(family: str, head: str = "lm", seed: int = 0, **kw):
    """A random transformers (PyTorch) model in eval mode."""
    import torch

    torch.manual_seed(seed)
    return hf_class(family, head)(hf_config(family, **kw)).eval()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: saves a tiny random transformers model; returns (directory, torch model)."""
    def make(family: str, head: str = "lm", seed: int = 0, save_kw=None, **kw):
        model = make_hf_model(family, head, seed, **kw)
        path = tmp_path / f"{family}-{head}-{seed}"
        model.save_pretrained(path, **(save_kw or {}))
        return str(path), model

    return make


def padded_batch(lengths, total: int, vocab: int = 97, left: bool = True, seed: int = 0):
    """Random ids [B, total] with rows of the given real lengths, pad id 0 at masked slots."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for b, n in enumerate(lengths):
        sl = slice(total - n, total) if left else slice(0, n)
        ids[b, sl] = rng.integers(3, vocab, n)
        mask[b, sl] = 1
    return ids, mask


@pytest.fixture(scope="session")
def ppo_inputs(tmp_path_factory):
    """A tiny GPT-2 policy and reward model in Hugging Face format with a shared tokenizer,
    and a prompts file: what `rlhf-jax ppo` reads."""
    root = tmp_path_factory.mktemp("ppo_inputs")
    import jax

    from rlhf_jax import models
    from rlhf_jax.world.tiny import tiny_config, train_tokenizer

    words = ["the film was", "a great movie", "boring plot", "I loved it", "bad acting"]
    tok = train_tokenizer([" ".join(words)] * 50, vocab_size=300, path=str(root / "tok"))
    cfg = tiny_config("gpt2", vocab_size=320, max_position_embeddings=64)
    policy, pp = models.init_model(cfg, "lm", seed=0)
    models.save_hf(str(root / "policy"), policy, jax.device_get(pp), tok)
    rm, rp = models.init_model(cfg, "reward", seed=1)
    models.save_hf(str(root / "rm"), rm, jax.device_get(rp), tok)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": words[i % 5] + " " + words[(i * 3) % 5]}) + "\n")
    return root
