"""Preference pairs: the built-in sets are checkable and split, JSONL shapes and their errors,
token rows that train only the answers, the length-only baselines."""

from __future__ import annotations

import json
import re

import pytest
import torch

from adl_cli.data.preferences import PAIR_SETS, encode_pairs, length_baselines, make_pairs, read_pairs
from adl_cli.errors import AdlError


def _sum(question: str) -> int:
    a, b = map(int, re.findall(r"\d+", question)[:2])
    return a + b


def test_arithmetic_pairs_are_right_against_wrong_of_equal_length():
    pairs = make_pairs("arithmetic", 300, held_out=False, seed=0)
    for p in pairs:
        assert p.chosen == str(_sum(p.prompt[-1]["content"]))
        assert p.rejected != p.chosen and len(p.rejected) == len(p.chosen) and p.rejected.isdigit()
        assert not (len(p.rejected) > 1 and p.rejected.startswith("0"))
    tokens = torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs])
    assert length_baselines(tokens) == {"shorter": 0.5, "longer": 0.5}


def test_format_pairs_give_the_asked_form_and_length_does_not_decide():
    pairs = make_pairs("format", 400, held_out=True, seed=0)
    longer_chosen = 0
    for p in pairs:
        total = str(_sum(p.prompt[-1]["content"]))
        asked_number = p.prompt[-1]["content"].endswith("number only.")
        assert p.chosen == (total if asked_number else f"The answer is {total}.")
        assert p.rejected == (f"The answer is {total}." if asked_number else total)
        longer_chosen += len(p.chosen) > len(p.rejected)
    assert 0.4 < longer_chosen / len(pairs) < 0.6


@pytest.mark.parametrize("name", PAIR_SETS.names())
def test_train_and_held_out_pairs_never_share_a_problem(name):
    train = {p.prompt[-1]["content"].split("?")[0] for p in make_pairs(name, 2000, held_out=False, seed=4)}
    held = {p.prompt[-1]["content"].split("?")[0] for p in make_pairs(name, 300, held_out=True, seed=4)}
    assert held and not train & held
    assert make_pairs(name, 5, held_out=True, seed=4) == make_pairs(name, 5, held_out=True, seed=4)


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_pairs_in_three_shapes(tmp_path):
    user = {"role": "user", "content": "Hi"}
    path = _write(tmp_path, [
        {"prompt": "Say yes", "chosen": "yes", "rejected": "no"},
        "",
        {"prompt": [{"role": "system", "content": "Be brief."}, user], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Hello there, how are you?"}]},
        {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user, {"role": "assistant", "content": "b"}]},
    ])
    pairs = read_pairs(path)
    assert [p.prompt for p in pairs] == [[{"role": "user", "content": "Say yes"}], [{"role": "system", "content": "Be brief."}, user], [user]]
    assert [(p.chosen, p.rejected) for p in pairs] == [("yes", "no"), ("Hello.", "Hello there, how are you?"), ("a", "b")]


@pytest.mark.parametrize("line,message", [
    ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "the same answer"),
    ({"prompt": "x", "chosen": 3, "rejected": "a"}, "chosen must be a string"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "end with a user message"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "end with an assistant message"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_line_names_the_file_and_the_line(tmp_path, line, message):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(AdlError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        read_pairs(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(AdlError, match="not found"):
        read_pairs(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(AdlError, match="no preference pairs"):
        read_pairs(tmp_path / "empty.jsonl")


def test_pair_rows_train_only_the_answers_and_drop_what_does_not_fit(chat_run):
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.data.packing import IGNORE
    from adl_cli.data.tokenizer import Tokenizer
    from adl_cli.data.preferences import Pair

    tok = Tokenizer.load(chat_run)
    template = ChatTemplate.of(tok)
    pairs = make_pairs("arithmetic", 6, held_out=True, seed=0) + [Pair([{"role": "user", "content": "word " * 200}], "1", "2")]
    rows = encode_pairs(template, pairs, 64)
    assert len(rows) == 6 and rows.dropped == 1 and rows.kept == list(range(6))
    batch = rows.collate(torch.tensor([2, 0]))
    assert batch["inputs"].shape == batch["targets"].shape and batch["inputs"].shape[0] == 4
    for r, (pair, which) in enumerate([(pairs[2], "chosen"), (pairs[0], "chosen"), (pairs[2], "rejected"), (pairs[0], "rejected")]):
        answer = getattr(pair, which)
        trained = batch["targets"][r][batch["targets"][r] != IGNORE].tolist()
        assert trained == [*map(int, tok.encode(answer)), template.end_id]
        assert batch["full"][r, batch["last"][r]].item() == template.end_id  # a reward reads the end marker
        assert torch.equal(batch["full"][r, :batch["last"][r]], batch["inputs"][r, :batch["last"][r]])
    assert rows.answer_tokens[0].tolist() == [len(tok.encode(pairs[0].chosen)) + 1, len(tok.encode(pairs[0].rejected)) + 1]
