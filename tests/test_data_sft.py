"""SFT data: each layout masks exactly the tokens to learn, bad rows give one-line errors,
over-long rows error, drop or truncate, packing keeps examples apart, and batches are
deterministic, resumable and sliced per host."""

import json

import numpy as np
import pytest

from rlhf_jax.data import DataError
from rlhf_jax.data.sft import (
    SFTDataConfig, SFTFormat, load_sft, pack,
)
from rlhf_jax.world import movies
from rlhf_jax.world.tiny import train_tokenizer

WORDS = "the cat sat on a mat and dog ran to park good bad very happy sad hi hello user x y"
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [WORDS, "user: hi\nassistant: hello\n", "assistant: y\nuser: x\n"]
    return train_tokenizer(texts * 20, 320, str(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def load(path, tok, batch_size=2, **kw):
    cfg = SFTDataConfig(train=str(path), max_length=kw.pop("max_length", 48), **kw)
    return load_sft(cfg, tok, batch_size=batch_size, seed=0)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def only_example(data):
    assert len(data) == 1
    return data.examples.ids[0].tolist(), data.examples.loss_mask[0].tolist()


# ----------------------------------------------------------------------------- layouts & masks


def test_prompt_completion_mask_is_the_completion_and_eos(tmp_path, tok):
    train, held_out = load(write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "the cat", "completion": " sat on a mat"}]), tok, batch_size=1)
    p, c = enc(tok, "the cat"), enc(tok, " sat on a mat")
    ids, mask = only_example(train)
    assert held_out is None
    assert ids == [BOS, *p, *c, EOS]
    assert mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
    batch = train.batch(0)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}  # no packing: no segments
    assert batch["input_ids"].shape == (1, 32) and batch["input_ids"].dtype == np.int32
    n = len(ids)
    assert batch["loss_mask"][0, :n].tolist() == mask and batch["loss_mask"][0, n:].sum() == 0
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (32 - n)


def test_conversational_mask_is_the_assistant_turns(tmp_path, tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    train, _ = load(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tok,
                    batch_size=1)
    # the template writes "role: content\n"; a reply follows the generation prompt "assistant:"
    pieces = [("user: hi\nassistant:", 0), (" hello\n", 1), ("user: x\nassistant:", 0), (" y\n", 1)]
    want_ids, want_mask = [BOS], [0]
    for text, target in pieces:
        want_ids += enc(tok, text)
        want_mask += [target] * len(enc(tok, text))
    ids, mask = only_example(train)
    assert ids == want_ids + [EOS] and mask == want_mask + [1]
    targets = np.asarray(ids)[np.asarray(mask) == 1]
    assert tok.decode(targets) == " hello\n y\n<eos>"


def test_text_mask_is_every_token_but_the_first(tmp_path, tok):
    train, _ = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "the dog ran to park"}]), tok,
                    batch_size=1)
    t = enc(tok, "the dog ran to park")
    ids, mask = only_example(train)
    assert ids == [BOS, *t, EOS] and mask == [0] + [1] * (len(t) + 1)
    train, _ = load(tmp_path / "t.jsonl", tok, batch_size=1, add_bos=False, add_eos=False)
    ids, mask = only_example(train)
    assert ids == t and mask == [0] + [1] * (len(t) - 1)  # the first token is never a target


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational", "text"])
def test_generated_demonstrations_load_in_each_layout(tmp_path, fmt):
    paths = movies.write_demonstrations(movies.DemonstrationsConfig(num_train=16, num_eval=4, format=fmt),
                                    str(tmp_path))
    from rlhf_jax import models

    tok = models.load_tokenizer(paths["tokenizer"])
    train, held_out = load_sft(SFTDataConfig(train=paths["train"], eval=paths["eval"],
                                             max_length=96), tok, batch_size=4, seed=0)
    assert len(train) == 16 and len(held_out) == 4 and f"{fmt} format" in train.summary
    ids, mask = train.examples.ids[0], train.examples.loss_mask[0]
    text = tok.decode(ids[mask == 1], skip_special_tokens=True)
    if fmt == "text":
        assert text.startswith("review of ")  # the whole text is learnt
    else:
        assert "review of" not in text and text.strip().endswith(".")  # the review only


# ----------------------------------------------------------------------------- bad rows


def one_line_error(path, tok, match, **kw):
    with pytest.raises(DataError, match=match) as e:
        load(path, tok, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_misnamed_column_names_found_columns_and_closest(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "the cat", "completions": " sat"}] * 2)
    msg = one_line_error(path, tok, r"column 'completion' is missing; did you mean 'completions'\?")
    assert "Found columns ['prompt', 'completions']" in msg
    assert "data.columns.completion=completions" in msg
    train, _ = load(path, tok, columns={"completion": "completions"})
    assert len(train) == 2
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": "a", "answer": "b"}])
    msg = one_line_error(path, tok, r"Found columns \['question', 'answer'\]")
    assert "accepted formats: prompt_completion" in msg


@pytest.mark.parametrize("row, match", [
    ({"prompt": "the cat", "completion": 5},
     r"row 1, column 'completion': expected a string, got int"),
    ({"prompt": "the cat", "completion": "  "}, r"row 1, column 'completion': the text is empty"),
    ({"prompt": None, "completion": " sat"}, r"row 1, column 'prompt': expected a string"),
])
def test_bad_prompt_completion_rows(tmp_path, tok, row, match):
    good = {"prompt": "the cat", "completion": " sat"}
    path = write_jsonl(tmp_path / "b.jsonl", [good, row, good])
    one_line_error(path, tok, match + r".*set data.on_bad_row=drop")
    train, _ = load(path, tok, on_bad_row="drop")
    assert len(train) == 2 and "dropped 1 of 3 rows" in train.summary


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], r"row 0, column 'messages': the conversation has no "
                                          "assistant message"),
    ([{"role": "user"}], r"row 0, column 'messages': message 0 must be \{'role': str"),
    ("hi", r"row 0, column 'messages': expected a non-empty list"),
    ([{"role": "assistant", "content": ""}], r"message 0 has empty content"),
])
def test_bad_conversations(tmp_path, tok, messages, match):
    path = write_jsonl(tmp_path / "bc.jsonl", [{"messages": messages}])
    one_line_error(path, tok, match)


def test_over_length_error_drop_truncate(tmp_path, tok):
    long_prompt = " ".join(["the cat sat on a mat"] * 6)
    rows = [{"prompt": "the cat", "completion": " sat on a mat"},
            {"prompt": long_prompt, "completion": " sat on a mat"}]
    path = write_jsonl(tmp_path / "o.jsonl", rows)
    p, c = enc(tok, long_prompt), enc(tok, " sat on a mat")
    assert 2 + len(p) + len(c) > 16
    one_line_error(path, tok, r"row 1, column 'completion': the example is \d+ tokens with "
                              r"BOS/EOS, over data.max_length=16; set data.over_length=truncate "
                              "or drop", max_length=16, over_length="error")
    train, _ = load(path, tok, max_length=16, over_length="drop", batch_size=1)
    assert len(train) == 1 and "dropped 1 of 2 rows (1 over-length)" in train.summary
    for side, kept in (("left", p[-(14 - len(c)):]), ("right", p[:14 - len(c)])):
        train, _ = load(path, tok, max_length=16, over_length="truncate", prompt_truncation=side,
                        shuffle=False)
        ids, mask = train.examples.ids[1].tolist(), train.examples.loss_mask[1].tolist()
        assert ids == [BOS, *kept, *c, EOS], side  # the prompt is cut, the completion kept
        assert mask == [0] * (1 + len(kept)) + [1] * (len(c) + 1)
        assert "1 truncated" in train.summary
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": long_prompt}])
    train, _ = load(text, tok, max_length=8, over_length="truncate", batch_size=1)
    assert train.examples.ids[0].tolist() == [BOS, *p[:7]]  # text keeps its start
    no_room = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "", "completion": long_prompt}])
    train, _ = load(no_room, tok, max_length=8, over_length="truncate", batch_size=1)  # completion's start
    assert train.examples.ids[0].tolist() == [BOS, *p[:7]]
    train, _ = load(path, tok, max_length=16, over_length="truncate", prompt_truncation="none",
                    on_bad_row="drop", batch_size=1)  # the end goes first: no target is left
    assert "1 no target left after truncation" in train.summary


# ----------------------------------------------------------------------------- packing & batches


def test_pack_best_fit_keeps_every_example_once():
    lengths = np.asarray([5, 9, 3, 7, 2, 8, 4, 6, 1, 10])
    rows = pack(lengths, 12, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(lengths[r].sum() <= 12 for r in rows)
    assert len(rows) <= 6  # 55 tokens: a best fit needs 5 rows of 12, allow one more
    assert rows == pack(lengths, 12, seed=0)


def test_packed_rows_keep_examples_apart(tmp_path, tok):
    rows = [{"prompt": f"the {w}", "completion": f" sat on a {w}"}
            for w in ("cat", "dog", "mat", "park", "cat dog", "hi", "user", "x y")]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    plain, _ = load(path, tok, batch_size=8, max_length=32)
    packed, held_out = load(path, tok, batch_size=2, max_length=32, packing=True,
                            eval_fraction=0.25)
    assert "packed into" in packed.summary and len(held_out) == 2
    train = load(path, tok, batch_size=2, max_length=32, packing=True)[0]
    assert set(train.batch(0)) == {"input_ids", "attention_mask", "loss_mask", "segment_ids"}
    assert len(train.rows) < 8  # several examples in a row
    batch = train.collate(np.arange(len(train.rows)), 32)  # every packed row
    seen = []
    for ids, seg, mask, att in zip(batch["input_ids"], batch["segment_ids"], batch["loss_mask"],
                                   batch["attention_mask"]):
        assert att.tolist() == (seg > 0).astype(int).tolist()
        for s in range(1, seg.max() + 1):
            span = np.flatnonzero(seg == s)
            assert span.tolist() == list(range(span[0], span[-1] + 1))  # contiguous
            assert ids[span[0]] == BOS and mask[span[0]] == 0  # never predicted across examples
            seen.append((tuple(ids[span]), tuple(mask[span])))
    alone = [(tuple(i), tuple(m)) for i, m in zip(plain.examples.ids, plain.examples.loss_mask)]
    assert sorted(seen) == sorted(alone)  # each example once, exactly as it is alone


def test_batches_deterministic_resumable_and_sliced_per_host(tmp_path, tok):
    rows = [{"text": " ".join(WORDS.split()[: 2 + i % 7])} for i in range(24)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a, _ = load(path, tok, batch_size=4)
    b, _ = load(path, tok, batch_size=4)
    steps = [a.batch(k) for k in range(8)]  # 6 batches an epoch: crosses into epoch 2
    for k in (7, 2, 5):  # any order, any starting point: a resumed run sees the same data
        for key in steps[k]:
            np.testing.assert_array_equal(b.batch(k)[key], steps[k][key])
    assert not np.array_equal(steps[0]["input_ids"], steps[6]["input_ids"])  # reshuffled
    cfg = SFTDataConfig(train=path, max_length=48)
    hosts = [load_sft(cfg, tok, batch_size=4, seed=0, process_index=i, process_count=2)[0]
             for i in range(2)]
    mine = [set(h.examples.row.tolist()) for h in hosts]
    assert mine[0].isdisjoint(mine[1]) and mine[0] | mine[1] == set(range(24))
    assert all(h.batch(0)["input_ids"].shape[0] == 2 for h in hosts)  # 4 / 2 hosts


def test_format_can_be_forced(tmp_path, tok):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "the cat", "completion": " sat",
                                               "text": "x"}])
    assert "prompt_completion format" in load(path, tok, batch_size=1)[0].summary
    train, _ = load(path, tok, batch_size=1, format=SFTFormat.TEXT)
    assert "text format" in train.summary and train.examples.ids[0].tolist() == [
        BOS, *enc(tok, "x"), EOS]
