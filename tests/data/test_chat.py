"""The chat template: special tokens, render/parse, loss masks, JSONL shapes and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adl_cli.data.chat import ChatTemplate, TemplateSection, read_jsonl
from adl_cli.data.packing import IGNORE, make_example
from adl_cli.data.tokenizer import Tokenizer
from adl_cli.errors import AdlError

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 30? Also: <|user|> is just text."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Thanks, ünïcode ✓"},
    {"role": "assistant", "content": "You're welcome.\nBye"},
]


@pytest.fixture(scope="module")
def bpe_tok(bpe_run):
    return Tokenizer.load(bpe_run)


@pytest.fixture(params=["bytes", "bpe"])
def chat(request, bpe_tok):
    base = Tokenizer("bytes") if request.param == "bytes" else bpe_tok
    tok, template = ChatTemplate.attach(base.with_single_digits(), TemplateSection())
    return base, tok, template


def test_markers_are_new_ids_that_ordinary_text_never_produces(chat):
    base, tok, template = chat
    ids = sorted(template.ids.values())
    assert ids == list(range(base.vocab_size, base.vocab_size + 4))  # after every BPE id and <|endoftext|>
    assert tok.vocab_size == base.vocab_size + 4
    for text in template.markers.values():
        pieces = tok.encode(text)
        assert len(pieces) > 1 and not set(pieces.tolist()) & set(ids)  # spelled as text, not the marker
        assert tok.decode([tok.special_id(text)]) == text
    assert set(ids) <= tok.special_ids


def test_render_then_parse_round_trips(chat):
    _, tok, template = chat
    ids, trained = template.render(CONV)
    assert template.parse(ids) == CONV
    prompt = template.prompt(CONV[:2])
    assert prompt[-1] == template.ids["assistant"] and template.parse(prompt)[:2] == CONV[:2]


def test_loss_covers_assistant_content_and_its_end_only(chat):
    _, tok, template = chat
    ids, trained = template.render(CONV)
    ids, trained = np.array(ids), np.array(trained)
    answers = [tok.encode(m["content"]).tolist() + [template.end_id] for m in CONV if m["role"] == "assistant"]
    assert ids[trained].tolist() == sum(answers, [])
    # the end of every assistant turn is a target, and no other end or marker is
    ends = np.flatnonzero(ids == template.end_id)
    assert trained[ends].tolist() == [m["role"] == "assistant" for m in CONV]
    assert not trained[np.isin(ids, [template.ids[r] for r in ("system", "user", "assistant")])].any()
    everything = np.array(template.render(CONV, train_on_prompt=True)[1])
    assert everything.all()


def test_the_eos_target_is_present_and_unmasked(chat):
    _, tok, template = chat
    ids, trained = template.render(CONV[1:3])
    ex = make_example(ids, trained, block_size=len(ids), truncation="drop")
    assert ex.targets[-1] == template.end_id  # the reply's end is the last target, trained
    assert (ex.targets != IGNORE).sum() == len(tok.encode("42")) + 1
    assert template.end_id not in ex.inputs.tolist()[-1:]  # the model reads up to the answer, predicts the end


def test_template_survives_the_run_folder(tmp_path, chat):
    _, tok, template = chat
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    again = ChatTemplate.of(back)
    assert again.ids == template.ids and again.render(CONV) == template.render(CONV)
    assert back.single_digits and [back.decode([i]) for i in back.encode("2024")] == ["2", "0", "2", "4"]


def test_single_digits_change_only_numbers(bpe_tok):
    text = "Section 12 of 2019 says x = 345 and more words here."
    split = bpe_tok.with_single_digits()
    pieces = [split.decode([i]) for i in split.encode(text)]
    assert all(len(p.strip()) <= 1 for p in pieces if any(c.isdigit() for c in p))
    assert split.decode(split.encode(text)) == text
    words = "no numbers in this sentence at all."
    assert split.encode(words).tolist() == bpe_tok.encode(words).tolist()


@pytest.mark.parametrize("section, message", [
    (TemplateSection(user="<|end|>"), "must differ"),
    (TemplateSection(assistant=""), "non-blank"),
    (TemplateSection(system="<|sys\n|>"), "one line"),
    (TemplateSection(end="<|endoftext|>"), "pretraining separator"),
])
def test_templates_the_tokenizer_cannot_express_are_refused(section, message):
    with pytest.raises(AdlError, match=message):
        ChatTemplate.attach(Tokenizer("bytes"), section)


def test_a_tokenizer_without_the_markers_cannot_carry_the_template():
    with pytest.raises(AdlError, match="cannot be expressed"):
        ChatTemplate(Tokenizer("bytes"), TemplateSection().markers())


def test_jsonl_reads_alpaca_and_chat_shapes(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi", "output": "hi"},
             {"messages": CONV}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    convs = read_jsonl(path)
    assert convs[0] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert convs[1][0]["content"] == "Say hi" and convs[2] == CONV


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], r"d.jsonl:2: missing field 'output'"),
    (['{"instruction": "a", "output": "b"}', "", "{not json"], r"d.jsonl:3: not valid JSON"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"d.jsonl:1: .*unknown role 'robot'"),
    (['{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}'], r"d.jsonl:1: .*only come first"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"d.jsonl:1: .*no assistant message"),
    (['{"text": "x"}'], r"d.jsonl:1: expected 'messages'"),
    (["", "  "], r"holds no examples"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(AdlError, match=message):
        read_jsonl(path)


def test_missing_data_file_is_one_clear_error(tmp_path):
    with pytest.raises(AdlError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
