"""Hugging Face interop: our models against transformers' PyTorch models on the same weights."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FAMILIES, hf_class, padded_batch
from rlhf_jax import models
from rlhf_jax.models import safetensors_io

LENGTHS = (12, 7, 3, 1)


def torch_outputs(model, ids, mask):
    pos = np.maximum(mask.cumsum(1) - 1, 0)  # what transformers' generate passes
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.numpy()


def max_err_at_real_tokens(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_logits_match_transformers(hf_checkpoint, family, scan_layers):
    path, torch_model = hf_checkpoint(family, "lm")
    ids, mask = padded_batch(LENGTHS, 12)
    model, params = models.load_hf(path, scan_layers=scan_layers)
    assert isinstance(model, models.CausalLM)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_outputs(torch_model, ids, mask)
    assert ours.shape == (4, 12, 97)
    assert max_err_at_real_tokens(ours, theirs, mask) < 1e-4
    # The comparison is sensitive: logits are far from constant.
    assert np.abs(theirs[mask.astype(bool)]).std() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_scores_match_transformers(hf_checkpoint, family):
    path, torch_model = hf_checkpoint(family, "reward")
    for left in (True, False):
        ids, mask = padded_batch(LENGTHS, 12, left=left)
        model, params = models.load_hf(path)
        assert isinstance(model, models.RewardModel)
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
        theirs = torch_outputs(torch_model, ids, mask)[:, 0]
        assert ours.shape == (4,)
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        assert np.ptp(theirs) > 1e-2  # rows differ, so reading the wrong token would show


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_rope_scaling_matches_transformers(hf_checkpoint, rope):
    path, torch_model = hf_checkpoint("llama", "lm", rope_scaling=rope, rope_theta=500.0)
    ids, mask = padded_batch((40, 25), 40)
    model, params = models.load_hf(path)
    assert model.cfg.rope_scaling.rope_type == rope["rope_type"]
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_outputs(torch_model, ids, mask)
    assert max_err_at_real_tokens(ours, theirs, mask) < 1e-4
    # Without the scaling the logits really differ: the test can tell.
    plain = models.make_model(model.cfg.replace(rope_scaling=None))
    unscaled = np.asarray(plain.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_err_at_real_tokens(unscaled, theirs, mask) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["lm", "reward"])
def test_save_hf_round_trip_loads_in_transformers(hf_checkpoint, tmp_path, family, head):
    path, torch_model = hf_checkpoint(family, head)
    model, params = models.load_hf(path)
    out = tmp_path / "export"
    models.save_hf(str(out), model, params)
    reloaded = hf_class(family, head).from_pretrained(out).eval()
    ids, mask = padded_batch(LENGTHS, 12)
    a, b = torch_outputs(torch_model, ids, mask), torch_outputs(reloaded, ids, mask)
    assert max_err_at_real_tokens(a, b, mask) < 1e-4 if head == "lm" else np.abs(a - b).max() < 1e-4
    # and back into ours
    model2, params2 = models.load_hf(str(out))
    ours = model2.apply({"params": params2}, jnp.asarray(ids), jnp.asarray(mask))
    ref = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert float(jnp.abs(ours - ref).max()) == 0.0


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    path, torch_model = hf_checkpoint("llama", "lm", save_kw={"max_shard_size": "40KB"})
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    model, params = models.load_hf(path)
    ids, mask = padded_batch(LENGTHS, 12)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_err_at_real_tokens(ours, torch_outputs(torch_model, ids, mask), mask) < 1e-4
    # our own sharded writer, read back by transformers
    out = tmp_path / "sharded"
    models.save_hf(str(out), model, params, max_shard_bytes=30_000)
    assert os.path.exists(out / "model.safetensors.index.json")
    reloaded = hf_class("llama", "lm").from_pretrained(out).eval()
    np.testing.assert_allclose(
        torch_outputs(reloaded, ids, mask), torch_outputs(torch_model, ids, mask), atol=1e-5
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_export_of_sharded_params_equals_the_export_of_host_params(tmp_path, scan_layers):
    """The export fetches one tensor at a time from wherever the params live: params split
    over a (2, 4) mesh give the same files, byte for byte, as the same params on the host."""
    from rlhf_jax import sharding as shd
    from rlhf_jax.world.tiny import tiny_config

    cfg = tiny_config("llama", vocab_size=128, scan_layers=scan_layers)
    mesh = shd.make_mesh((2, 4, 1))
    model, placed = models.init_model(cfg, "lm", seed=3, mesh=mesh)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(placed))
    models.save_hf(str(tmp_path / "placed"), model, placed, max_shard_bytes=60_000)
    models.save_hf(str(tmp_path / "host"), model, jax.device_get(placed), max_shard_bytes=60_000)
    files = sorted(os.listdir(tmp_path / "host"))
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert sorted(os.listdir(tmp_path / "placed")) == files
    for name in files:
        assert (tmp_path / "placed" / name).read_bytes() == (tmp_path / "host" / name).read_bytes()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sharded_load_reads_only_the_slices_devices_hold(hf_checkpoint, monkeypatch, scan_layers):
    """Placed on a mesh, each param is read from the files slice by slice, as the devices
    hold it (on several hosts each reads only its own): no split param is read whole, every
    element of it once; and the params equal those of a plain load."""
    from rlhf_jax import sharding as shd
    from rlhf_jax.models import hf

    path, _ = hf_checkpoint("llama", "lm")
    reads = []
    original = hf.LazyParam.__getitem__

    def recording(self, idx):
        out = original(self, idx)
        reads.append((self.shape, out.shape))
        return out

    monkeypatch.setattr(hf.LazyParam, "__getitem__", recording)
    mesh = shd.make_mesh((1, 8, 1))
    _, placed = models.load_hf(path, mesh=mesh, scan_layers=scan_layers)
    _, plain = models.load_hf(path, scan_layers=scan_layers)
    split = [(full, got) for full, got in reads if got != full]
    assert split and all(np.prod(got) * 8 == np.prod(full) for full, got in split)
    for x, y in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bfloat16_checkpoint_loads(hf_checkpoint):
    path, torch_model = hf_checkpoint("qwen2", "lm")
    bf16_model = torch_model.to(torch.bfloat16)
    bf16_model.save_pretrained(path)
    header, _ = safetensors_io.read_header(os.path.join(path, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    model, params = models.load_hf(path)
    emb = params["model"]["embed"]["embedding"]
    assert emb.dtype == jnp.float32  # params are float32 whatever the file holds
    expected = bf16_model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(emb), expected)


def test_reward_head_added_to_causal_lm_and_value_head_saved(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("gpt2", "lm")
    rm, rm_params = models.load_hf(path, head="reward", seed=3)
    assert rm_params["score"]["kernel"].shape == (64, 1)
    assert float(jnp.abs(rm_params["score"]["kernel"]).max()) > 0
    policy, pv_params = models.load_hf(path, head="lm+value")
    ids, mask = padded_batch(LENGTHS, 12)
    logits, values = policy.apply({"params": pv_params}, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (4, 12, 97) and values.shape == (4, 12)
    pv_params = {**pv_params, "value_head": {"kernel": pv_params["value_head"]["kernel"] + 1.0,
                                             "bias": pv_params["value_head"]["bias"] + 0.5}}
    models.save_hf(str(tmp_path / "pv"), policy, pv_params)
    _, again = models.load_hf(str(tmp_path / "pv"), head="lm+value")
    np.testing.assert_array_equal(np.asarray(again["value_head"]["kernel"]),
                                  np.asarray(pv_params["value_head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(again["value_head"]["bias"]), 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_normalisation_exported(hf_checkpoint, tmp_path, family):
    path, _ = hf_checkpoint(family, "reward")
    model, params = models.load_hf(path)
    normed = models.RewardModel(model.cfg, gain=2.5, bias=-0.75)
    ids, mask = padded_batch(LENGTHS, 12)
    ours = np.asarray(normed.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    raw = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, 2.5 * raw - 0.75, atol=1e-5)
    models.save_hf(str(tmp_path / "rm"), normed, params)
    model2, params2 = models.load_hf(str(tmp_path / "rm"))
    again = np.asarray(model2.apply({"params": params2}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(again, ours, atol=1e-4)
    theirs = torch_outputs(hf_class(family, "reward").from_pretrained(tmp_path / "rm").eval(),
                           ids, mask)[:, 0]
    if family == "gpt2":  # the bias folds into the final LayerNorm: transformers agrees exactly
        np.testing.assert_allclose(theirs, ours, atol=1e-4)
    else:  # RMSNorm has no bias: transformers' raw scores lack the stored constant
        np.testing.assert_allclose(theirs - 0.75, ours, atol=1e-4)


def test_tokenizer_and_chat_template_from_local_path(tmp_path):
    from rlhf_jax.world.tiny import train_tokenizer

    train_tokenizer(["the cat sat on the mat"] * 20 + ["hello world"] * 20, 300, str(tmp_path))
    tok = models.load_tokenizer(str(tmp_path))
    ids = tok("the cat")["input_ids"]
    assert tok.decode(ids) == "the cat"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "user: hi\nassistant:"


def test_clear_errors(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_hf(str(tmp_path / "empty"))
    path, _ = hf_checkpoint("gpt2", "lm")
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="Pickle-based weights"):
        models.load_hf(path)

    path, _ = hf_checkpoint("llama", "lm", seed=1)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for change, pattern in [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
         "unsupported architecture 'MistralForCausalLM'; supported: .*Qwen2ForCausalLM"),
        ({"architectures": ["LlamaModel"]}, "pass head='reward'"),
        ({"architectures": ["LlamaForTokenClassification"]},
         "unsupported architecture 'LlamaForTokenClassification'; supported: .*LlamaForCausalLM"),
        ({"architectures": ["LlamaForSequenceClassification"], "num_labels": 3},
         "3 labels cannot be a reward model"),
        ({"hidden_size": 32, "head_dim": 16}, r"tensor model.embed_tokens.weight has shape \(97, 64\)"),
        ({"auto_map": {"AutoModel": "x.Y"}}, "never runs remote code"),
    ]:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg, **change}, f)
        with pytest.raises(ValueError, match=pattern):
            models.load_hf(path)


def test_truncated_safetensors_is_reported(hf_checkpoint):
    path, _ = hf_checkpoint("gpt2", "lm", seed=2)
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated"):
        models.load_hf(path)
