"""adl bench-context through the real entry point: the table, --json rows, one-line errors."""

import json

import pytest

from adl_cli.cli import main




RECIPE = """
name = "ctx"
sample_prompt = "The "
sample_tokens = 2
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
vocab_multiple = 8
position = "rope"
[data]
corpus = "{corpus}"
tokenizer = "bytes"
[train]
steps = 6
batch_size = 4
lr = 3e-3
warmup = 2
min_lr = 3e-4
eval_every = 0
eval_batches = 1
checkpoint_every = 0
log_every = 3
"""


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    """A 1-layer RoPE GPT on bytes of pydoc text, trained 6 steps at 16 tokens."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("ctx-cli")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:20])[:20_000], encoding="utf-8")
    recipe = root / "ctx.toml"
    recipe.write_text(RECIPE.format(corpus=corpus.as_posix()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADL_CACHE", str(root / "cache"))
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)  # skip the roof measurement
        code = None
        try:
            main(["pretrain", str(recipe), "--out", str(root / "run"), "--no-progress"])
        except SystemExit as e:
            code = e.code
        assert not code
        yield root / "run"


def test_table_and_json(rope_run, tmp_path, capsys, monkeypatch, run):
    monkeypatch.setenv("COLUMNS", "160")
    path = tmp_path / "out" / "ctx.json"
    code, out, err = run(["bench-context", rope_run, "--lengths", "16,32", "--position", "rope,yarn", "--json", path], capsys)
    assert code == 0, err
    assert "perplexity by evaluation length" in out and "yarn" in out and "2x" in out
    assert "MHA" in out and "GQA" in out and "MLA" in out
    data = json.loads(path.read_text())
    assert [(r["position"], r["mode"], r["length"]) for r in data["rows"]] == [
        ("rope", "zero-shot", 16), ("rope", "zero-shot", 32), ("yarn", "zero-shot", 16), ("yarn", "zero-shot", 32)
    ]
    assert all(r["ppl"] > 1 for r in data["rows"]) and data["trained_length"] == 16
    assert {r["attention"] for r in data["kv_cache"]} == {"MHA", "GQA", "MLA"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "16", "--scale", "0.5"], "--scale"),
        (["--lengths", "16,999999"], "validation split"),
        (["--lengths", "16", "--position", "alibi"], "trained with position=rope"),
        (["--lengths", "16", "--batches", "0"], "--batches"),
        (["--lengths", "16", "--finetune-steps", "1", "--finetune-lr", "0"], "--finetune-lr"),
        (["--lengths", "16", "--position", "rope,learnt"], "did you mean 'learned'"),
    ],
)
def test_bad_input_exits_2_with_one_line(rope_run, capsys, args, message, run):
    code, out, err = run(["bench-context", rope_run, *args], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_run_dir(tmp_path, capsys, run):
    code, _, err = run(["bench-context", tmp_path / "missing", "--lengths", "16"], capsys)
    assert code == 2 and "run folder not found" in err and len(err.strip().splitlines()) == 1
