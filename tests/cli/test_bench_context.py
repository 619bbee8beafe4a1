"""adl bench-context through the real entry point: the table, --json rows, one-line errors."""

import json

import pytest


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


def test_plot_draws_a_png_and_keeps_existing_files(rope_run, tmp_path, capsys, run):
    png = tmp_path / "ctx.png"
    code, out, err = run(["bench-context", rope_run, "--lengths", "16,32", "--position", "rope,yarn", "--plot", png], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    code, _, err = run(["bench-context", rope_run, "--lengths", "16", "--plot", png], capsys)
    assert code == 2 and "exists" in err and png.read_bytes() == before
