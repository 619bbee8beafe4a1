"""adl sft end to end through the real entry point: a tiny recipe from a BPE run, then chat,
generate --chat, export with the chat template, resume, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest

SFT_RECIPE = """
name = "s"
samples = 2

[init]
from = "{base}"

[data]
tasks = ["addition", "reverse"]
files = ["{jsonl}"]
train_examples = 64
val_examples = 8
eval_examples = 8
eval_examples_during = 4
operand_digits = 2

[train]
steps = 4
batch_size = 4
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 2
checkpoint_every = 2
log_every = 1
seed = 3
"""

LINES = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Repeat", "input": "ok", "output": "ok"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
] * 4


@pytest.fixture(scope="module")
def sft_run(bpe_run, tmp_path_factory):
    """(run folder, recipe path) of a tiny SFT run trained through `adl sft` (read-only for the tests)."""
    from adl_cli.cli import main

    root = tmp_path_factory.mktemp("sft")
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in LINES) + "\n", encoding="utf-8")
    recipe = root / "s.toml"
    recipe.write_text(SFT_RECIPE.format(base=bpe_run.as_posix(), jsonl=data.as_posix()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        try:
            main(["sft", str(recipe), "--out", str(root / "run"), "--no-progress"])
        except SystemExit as e:
            assert not e.code
    return root / "run", recipe


def test_sft_writes_a_chat_run_with_both_evaluations(sft_run, bpe_run):
    run, _ = sft_run
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["tasks"]) == {"addition", "reverse"}
    for t in summary["tasks"].values():
        for side in ("sft", "base"):
            r = t[side]
            assert r["n"] == 8 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
    assert summary["steps"] == 4 and summary["trained_tokens"] > 0 and summary["tokens_seen"] > summary["trained_tokens"]
    tok = json.loads((run / "tokenizer.json").read_text())
    base_tok = json.loads((bpe_run / "tokenizer.json").read_text())
    assert tok["chat"]["markers"]["end"] == "<|end|>" and tok["chat"]["single_digits"]
    assert sorted(tok["specials"].values()) == list(range(base_tok["vocab_size"], base_tok["vocab_size"] + 4))
    assert json.loads((run / "config.json").read_text())["vocab_size"] >= tok["vocab_size"]
    assert json.loads((run / "lineage.json").read_text())["parents"][0]["path"] == str(bpe_run)
    report = (run / "report.md").read_text()
    assert "| addition | 8 |" in report and "Generated answers" in report
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("exact_addition" in r and "val_loss" in r for r in rows)


def test_chat_and_generate_use_the_template(sft_run, run, capsys, monkeypatch):
    import io

    folder, _ = sft_run
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\n/exit\n"))
    code, out, err = run(["chat", folder, "--temperature", "0", "-n", "8"], capsys)
    assert code == 0, err
    assert "adl> " in out and "no chat template" not in err
    code, out, err = run(["generate", folder, "--chat", "--prompt", "What is 2 + 3?", "--temperature", "0", "-n", "6", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)["completions"][0]
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.data.tokenizer import Tokenizer

    template = ChatTemplate.of(Tokenizer.load(folder))
    assert row["finish_reason"] in ("eos", "length")
    if row["finish_reason"] == "eos":
        assert row["tokens"][-1] in template.stop_ids


def test_export_carries_the_chat_template(sft_run, run, capsys, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from adl_cli.data.chat import ChatTemplate
    from adl_cli.data.tokenizer import Tokenizer

    folder, _ = sft_run
    code, out, err = run(["export", "hf", folder, "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = Tokenizer.load(folder)
    template = ChatTemplate.of(tok)
    conv = [{"role": "user", "content": "What is 123 + 45? Say it"}, {"role": "assistant", "content": "168"},
            {"role": "user", "content": "And 7 * 8?"}]
    ids = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == template.prompt(conv)
    assert hf.encode("x = 2024 and 17 apples") == tok.encode("x = 2024 and 17 apples").tolist()
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert template.end_id in gen["eos_token_id"]


def test_resume_continues_and_a_finished_run_is_not_replaced(sft_run, run, capsys, tmp_path):
    folder, recipe = sft_run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    code, out, err = run(["sft", recipe, "--out", copy, "--no-progress", "--no-base"], capsys)
    assert code != 0 and "already holds a run" in err and "Traceback" not in err
    code, out, err = run(["sft", recipe, "--out", copy, "--resume", "--set", "train.steps=6", "--no-progress", "--no-base"], capsys)
    assert code == 0, err
    assert json.loads((copy / "summary.json").read_text())["steps"] == 6
    assert json.loads((copy / "tokenizer.json").read_text()) == json.loads((folder / "tokenizer.json").read_text())


def test_sft_tasks_lists_every_task(run, capsys):
    from adl_cli.data.tasks import TASKS

    code, out, err = run(["sft", "tasks"], capsys)
    assert code == 0 and all(name in out for name in TASKS.names())


@pytest.mark.parametrize("change, message", [
    (lambda r, d: r.replace('from = "', 'from_unused = "'), "unknown key"),
    (lambda r, d: r.replace("[init]\n", "[init]\nfrom = \"\"\n").replace(f'from = "{d["base"]}"\n', ""), "init.from must name the run"),
    (lambda r, d: r.replace('"addition", "reverse"', '"additon"'), "unknown task 'additon'"),
    (lambda r, d: r.replace(d["jsonl"], d["bad"]), "bad.jsonl:2: missing field 'output'"),
    (lambda r, d: r.replace(d["jsonl"], d["empty"]), "holds no examples"),
    (lambda r, d: r.replace(d["base"], d["notok"]), "has no tokenizer.json"),
    (lambda r, d: r + '\n[template]\nuser = "<|end|>"\n', "markers must differ"),
])
def test_bad_input_is_one_clear_line(sft_run, bpe_run, run, capsys, tmp_path, change, message):
    _, recipe = sft_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    notok = tmp_path / "notok"
    shutil.copytree(bpe_run, notok, ignore=shutil.ignore_patterns("tokenizer.*", "checkpoints"))
    text = recipe.read_text()
    base = text.split('from = "')[1].split('"')[0]
    jsonl = text.split('files = ["')[1].split('"')[0]
    paths = {"base": base, "jsonl": jsonl, "bad": bad.as_posix(), "empty": empty.as_posix(), "notok": notok.as_posix()}
    path = tmp_path / "r.toml"
    path.write_text(change(text, paths), encoding="utf-8")
    code, out, err = run(["sft", path, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_eval_scores_tasks_on_the_runs_own_held_out_problems(sft_run, run, capsys):
    from adl_cli.data.tasks import make_task, split_problems

    folder, _ = sft_run
    code, out, err = run(["eval", folder, "--task", "addition", "--task", "reverse", "--examples", "5", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["split_seed"] == 0 and got["operand_digits"] == 2  # the recipe's, so the problems are held out from its training
    assert [t["task"] for t in got["tasks"]] == ["addition", "reverse"] and all(t["n"] == 5 for t in got["tasks"])
    asked = [s["question"] for s in got["tasks"][0]["samples"]]
    want = [p.question for p in split_problems(make_task("addition", operand_digits=2), 5, held_out=True, seed=0)]
    assert asked == want[:len(asked)]
    code, out, err = run(["eval", folder, "--task", "additon"], capsys)
    assert code == 2 and "unknown task 'additon'" in err
    code, out, err = run(["eval", folder, "--task", "addition", "--data", "README.md"], capsys)
    assert code == 2 and "give one" in err
