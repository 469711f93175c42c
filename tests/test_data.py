"""Preference data: every source kind and layout loads, bad rows are named, batches are
fixed-shape, deterministic, resumable, and each host gets its own slice."""

import json

import numpy as np
import pandas as pd
import pytest

from rlhf_jax.data import DataConfig, DataError, load_preferences, sources
from rlhf_jax.data.batching import BatchPlan
from rlhf_jax.data.formats import split_common_prefix
from rlhf_jax.world.tiny import train_tokenizer

WORDS = "the cat sat on a mat and dog ran to park good bad very happy sad Human Assistant user"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [WORDS, WORDS.lower(), "Human: hi there\n\nAssistant: hello", "user: x\nassistant: y"]
    return train_tokenizer(texts * 20, 320, str(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def explicit_rows(n=12):
    return [{"prompt": f"the cat {i}", "chosen": " sat on a mat", "rejected": f" ran {i}"}
            for i in range(n)]


def load(path, tok, batch_size=4, **kw):
    return load_preferences(DataConfig(train=str(path), max_length=kw.pop("max_length", 48), **kw),
                            tok, batch_size=batch_size, seed=0)


def texts_of(data, tok, index=0):
    """(chosen, rejected) decoded texts of the first pair of batch `index`."""
    b = data.batch(index)
    out = []
    for j in range(2):
        ids = b["input_ids"][0, j][b["attention_mask"][0, j] == 1]
        out.append(tok.decode(ids))
    return out


def sorted_texts(data, tok):
    """Every pair's chosen text, decoded, sorted (order-free comparison)."""
    return sorted(tok.decode(s) for s in data.pairs.chosen)


# ----------------------------------------------------------------------------- sources & formats


def test_explicit_jsonl(tmp_path, tok):
    train, held_out = load(write_jsonl(tmp_path / "a.jsonl", explicit_rows()), tok)
    assert held_out is None and len(train) == 12 and train.batches_per_epoch() == 3
    chosen, rejected = texts_of(train, tok)
    assert chosen.startswith("<bos>the cat ") and chosen.endswith(" sat on a mat<eos>")
    assert rejected.startswith("<bos>the cat ") and " ran " in rejected
    assert rejected.endswith("<eos>")
    b = train.batch(0)
    assert b["input_ids"].shape == (4, 2, 32) and b["input_ids"].dtype == np.int32
    assert b["weight"].tolist() == [1.0] * 4 and b["margin"].tolist() == [0.0] * 4


def test_json_csv_parquet_and_save_to_disk_give_the_same_pairs(tmp_path, tok):
    import datasets

    rows = [{**r, "margin": float(i % 3)} for i, r in enumerate(explicit_rows())]
    with open(tmp_path / "a.json", "w") as f:
        json.dump(rows, f)
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    ref, _ = load(tmp_path / "a.json", tok)
    for source in ("a.csv", "a.parquet", "saved"):
        got, _ = load(tmp_path / source, tok)
        assert sorted_texts(got, tok) == sorted_texts(ref, tok), source
        np.testing.assert_array_equal(np.sort(got.pairs.margin), np.sort(ref.pairs.margin))
    assert sorted(ref.pairs.margin.tolist()) == sorted(float(i % 3) for i in range(12))
    train, held_out = load(tmp_path / "saved_dict", tok, eval=str(tmp_path / "saved_dict"))
    assert len(train) == 8 and len(held_out) == 4


def test_csv_columns_are_the_text_written(tmp_path, tok):
    # CSV has no types: "007" and "NA" stay text, a numeric column of answers stays text, and
    # a margin written as text is read as the number (an empty field is no margin).
    rows = [{"prompt": f"the cat {i}", "chosen": "007", "rejected": "NA" if i % 2 else str(i),
             "margin": "" if i == 0 else "1.5"} for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    read = sources.load_rows(str(tmp_path / "t.csv"))
    assert read["chosen"] == ["007"] * 4 and read["rejected"] == ["0", "NA", "2", "NA"]
    train, _ = load(tmp_path / "t.csv", tok)
    assert sorted(train.pairs.margin.tolist()) == [0.0, 1.5, 1.5, 1.5]


@pytest.mark.parametrize("name,content", [("h.csv", "prompt,chosen,rejected\n"),
                                          ("e.json", "[]"), ("w.jsonl", "\n \n")])
def test_a_file_without_rows_names_itself_and_the_fix(tmp_path, tok, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        load(tmp_path / name, tok)
    assert str(e.value).startswith(f"{tmp_path / name}: no rows (") and "; write " in str(e.value)


def test_fewer_pairs_than_a_batch_or_a_ranking_bigger_than_one_names_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "few.jsonl", explicit_rows(3))
    with pytest.raises(DataError) as e:
        load(path, tok, batch_size=4)
    assert str(e.value) == (f"{path}: 3 rows, none dropped; explicit format, 3 pairs: too few "
                            "for one batch of batch_size=4; lower batch_size or add rows")
    ranking = {"prompt": "a", "responses": [" x", " y", " z", " w"], "ranks": [1, 2, 3, 4]}
    path = write_jsonl(tmp_path / "rank.jsonl", [ranking] * 4)
    with pytest.raises(DataError, match=f"^{path}: a group of 6 items .* does not fit in a batch "
                                        "of 4; raise the batch size"):
        load(path, tok, batch_size=4)
    with pytest.raises(DataError, match=f"^{path}: cannot hold out 0.5 of 1 rows"):
        load(write_jsonl(path, [ranking]), tok, eval_fraction=0.5)


def test_implicit_prompt_split_at_turn_or_word_boundary():
    hh_c = "\n\nHuman: what is up?\n\nAssistant: I think the sky"
    hh_r = "\n\nHuman: what is up?\n\nAssistant: I think nothing much"
    assert split_common_prefix(hh_c, hh_r) == (
        "\n\nHuman: what is up?\n\nAssistant:", " I think the sky", " I think nothing much")
    assert split_common_prefix("I like cats", "I like cars") == ("I like", " cats", " cars")
    assert split_common_prefix("I like", "I like cats") == ("I", " like", " like cats")


def test_implicit_json(tmp_path, tok):
    rows = [{"chosen": f"Human: hi {i}\n\nAssistant: good dog",
             "rejected": f"Human: hi {i}\n\nAssistant: bad"} for i in range(8)]
    train, _ = load(write_jsonl(tmp_path / "hh.jsonl", rows), tok)
    assert len(train) == 8
    chosen, rejected = texts_of(train, tok)
    assert chosen.endswith("\n\nAssistant: good dog<eos>")
    assert rejected.endswith("\n\nAssistant: bad<eos>")


def test_conversational_rendered_with_chat_template(tmp_path, tok):
    def chat(i, answer):
        return [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": answer}]

    rows = [{"chosen": chat(i, "good"), "rejected": chat(i, "bad")} for i in range(4)]
    rows += [{"prompt": [{"role": "user", "content": "hi 9"}],
              "chosen": [{"role": "assistant", "content": "very good"}],
              "rejected": [{"role": "assistant", "content": "sad"}]}]
    train, _ = load(write_jsonl(tmp_path / "c.jsonl", rows), tok, batch_size=5, shuffle=False)
    b = train.batch(0)
    decoded = [tok.decode(b["input_ids"][i, j][b["attention_mask"][i, j] == 1])
               for i in range(5) for j in range(2)]
    assert decoded[0] == "<bos>user: hi 0\nassistant: good\n<eos>"
    assert decoded[1] == "<bos>user: hi 0\nassistant: bad\n<eos>"
    assert decoded[8] == "<bos>user: hi 9\nassistant: very good\n<eos>"


def test_rankings_expand_into_all_pairs_in_one_batch(tmp_path, tok):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        k = 3 + i % 2  # K = 3 or 4 responses
        ranks = rng.permutation(k) + 1
        rows.append({"prompt": f"the cat {i}", "responses": [f" dog {r}" for r in ranks],
                     "ranks": ranks.tolist()})
    train, _ = load(write_jsonl(tmp_path / "r.jsonl", rows), tok, batch_size=8)
    assert len(train) == 5 * 3 + 5 * 6  # Σ K(K-1)/2
    seen = []
    # two epochs: a partly filled last batch is dropped, in another order other groups are
    for k in range(train.batches_per_epoch(0) + train.batches_per_epoch(1)):
        items, _ = train.plan.batch(k)
        items = items[items >= 0]
        groups = train.pairs.group[items]
        for g in set(groups.tolist()):  # every pair of a ranking is in this batch
            assert (groups == g).sum() == (3 if g % 2 == 0 else 6)
        seen += groups.tolist()
    assert sorted(set(seen)) == list(range(10))
    for c, r in zip(train.pairs.chosen, train.pairs.rejected):  # chosen = better (lower) rank
        rank = [int(tok.decode(s[1:-1]).split()[-1]) for s in (c, r)]  # without BOS/EOS
        assert rank[0] < rank[1]


def test_columns_renamed_by_config(tmp_path, tok):
    rows = [{"question": r["prompt"], "good": r["chosen"], "rejected": r["rejected"]}
            for r in explicit_rows()]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    train, _ = load(path, tok, columns={"prompt": "question", "chosen": "good"})
    assert len(train) == 12


def test_hub_name_offline_is_a_clear_error(tok):
    with pytest.raises(DataError, match="not a local file or directory.*Hub"):
        load("someone/some-preferences", tok)
    with pytest.raises(DataError, match="no such file"):
        load("./missing.jsonl", tok)


# ----------------------------------------------------------------------------- bad rows


def test_misnamed_column_names_found_columns_and_closest(tmp_path, tok):
    rows = [{"prompt": "a", "choosen": "b", "rejected": "c"}]
    with pytest.raises(DataError) as e:
        load(write_jsonl(tmp_path / "m.jsonl", rows), tok)
    msg = str(e.value)
    assert "column 'chosen' is missing; did you mean 'choosen'?" in msg
    assert "Found columns ['prompt', 'choosen', 'rejected']" in msg and "rankings (" in msg


def bad(tmp_path, tok, row, index=3, **kw):
    rows = explicit_rows(6)
    rows[index] = {**rows[index], **row}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load(path, tok, **kw)
    return str(e.value)


def test_non_string_text(tmp_path, tok):
    msg = bad(tmp_path, tok, {"chosen": 5}, index=2)
    assert "row 2, column 'chosen'" in msg and "expected a string, got int" in msg


def test_empty_text(tmp_path, tok):
    assert "row 3, column 'rejected': the text is empty" in bad(tmp_path, tok, {"rejected": "  "})


def test_identical_chosen_and_rejected(tmp_path, tok):
    assert "row 4, column 'rejected': chosen and rejected are identical" in bad(
        tmp_path, tok, {"rejected": " sat on a mat"}, index=4)


def test_over_length_rows(tmp_path, tok):
    long_prompt = " ".join(["the cat sat"] * 20)
    msg = bad(tmp_path, tok, {"prompt": long_prompt}, prompt_truncation="none", max_length=24)
    assert "row 3, column 'prompt'" in msg and "exceed max_length=24" in msg
    msg = bad(tmp_path, tok, {"chosen": " " + long_prompt}, max_length=24)
    assert "row 3, column 'chosen'" in msg and "over max_length=24" in msg


@pytest.mark.parametrize("side", ["left", "right"])
def test_long_prompt_truncated_on_its_side(tmp_path, tok, side):
    prompt = "good " + "the cat sat " * 10 + "bad"
    rows = [{"prompt": prompt, "chosen": " dog", "rejected": " park"}] * 4
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, _ = load(path, tok, max_length=16, prompt_truncation=side)
    b = train.batch(0)
    assert b["attention_mask"][0, 0].sum() == 16
    text = tok.decode(b["input_ids"][0, 0])
    assert text.startswith("<bos>good") == (side == "right")
    assert ("bad dog<eos>" in text) == (side == "left")


def test_bad_rows_dropped_with_a_count(tmp_path, tok):
    rows = explicit_rows(10)
    rows[1]["chosen"] = ""
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[7]["prompt"] = None
    train, _ = load(write_jsonl(tmp_path / "d.jsonl", rows), tok, on_bad_row="drop")
    assert len(train) == 7 and sorted(set(range(10)) - set(train.pairs.group.tolist())) == [1, 4, 7]
    assert "dropped 3 of 10 rows" in train.summary
    assert "1 empty text" in train.summary and "1 identical chosen and rejected" in train.summary


def test_bad_ranking_rows(tmp_path, tok):
    rows = [{"prompt": "a", "responses": [" x", " y", " z"], "ranks": [1, 2, 3]}] * 3
    rows[1] = {"prompt": "a", "responses": [" x", " y"], "ranks": [1, 1]}
    with pytest.raises(DataError, match="row 1, column 'ranks'.*ties"):
        load(write_jsonl(tmp_path / "r.jsonl", rows), tok)


# ----------------------------------------------------------------------------- batching


def test_batches_deterministic_resumable_and_bucketed(tmp_path, tok):
    rows = [{"prompt": "the cat" * (1 + i % 7), "chosen": " dog", "rejected": " park"}
            for i in range(40)]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    cfg = DataConfig(train=path, max_length=64, buckets=(16, 32, 64))
    a, _ = load_preferences(cfg, tok, batch_size=8, seed=1)
    b, _ = load_preferences(cfg, tok, batch_size=8, seed=1)
    c, _ = load_preferences(cfg, tok, batch_size=8, seed=2)
    # batch k is a function of (seed, k) only: the same when asked for out of order
    late = [b.batch(k) for k in (12, 3, 7)]
    for k, got in zip((12, 3, 7), late):
        for key in got:
            np.testing.assert_array_equal(a.batch(k)[key], got[key])
    assert not np.array_equal(a.batch(0)["input_ids"], c.batch(0)["input_ids"])
    # an epoch covers every pair once; the next epoch is another order
    first = np.concatenate([a.plan.batch(k)[0] for k in range(5)])
    second = np.concatenate([a.plan.batch(k)[0] for k in range(5, 10)])
    assert sorted(first) == sorted(second) == list(range(40)) and not np.array_equal(first, second)
    for k in range(10):
        batch = a.batch(k)
        longest = batch["attention_mask"].sum(-1).max()
        assert batch["input_ids"].shape[-1] == min(x for x in (16, 32, 64) if x >= longest)


def test_eval_batches_keep_every_pair_with_padding(tmp_path, tok):
    _, held_out = load(write_jsonl(tmp_path / "e.jsonl", explicit_rows(22)), tok, eval_fraction=0.5)
    assert len(held_out) == 11
    batches = list(held_out.epoch_batches())
    assert len(batches) == 3 and sum(b["weight"].sum() for b in batches) == 11
    last = batches[-1]
    assert last["weight"].tolist() == [1, 1, 1, 0] and last["attention_mask"][3].sum() == 0


def test_each_host_loads_its_own_slice(tmp_path, tok):
    path = write_jsonl(tmp_path / "h.jsonl", explicit_rows(24))
    cfg = DataConfig(train=path, max_length=48)
    hosts = [load_preferences(cfg, tok, batch_size=8, seed=0, process_index=i, process_count=2)[0]
             for i in range(2)]
    rows = [set(h.pairs.group.tolist()) for h in hosts]
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(24))
    assert all(h.batch(0)["input_ids"].shape[0] == 4 for h in hosts)  # 8 / 2 hosts


def test_hosts_agree_on_batch_count_and_shapes():
    calls = []

    def agree(values, op):  # another host with one batch fewer and longer rows
        calls.append(op)
        other = values.copy()
        if op == "min":
            other = other - 1
        else:
            other = np.full_like(values, 64)
        return np.minimum(values, other) if op == "min" else np.maximum(values, other)

    plan = BatchPlan(np.full(12, 10), None, 4, (16, 32, 64), seed=0, agree=agree)
    assert plan.batches_per_epoch() == 2 and calls == ["min", "max"]
    assert plan.batch(1)[1] == 64
