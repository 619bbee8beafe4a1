"""adl bench-sequence through the real entry point, on the shipped recipes cut to a few steps: the
table and the JSON; the learning rate kept is the grid's best on the validation set; the decode
state of a recurrent model is one size at every length while the GPT's cache grows with it; the
figure; bad input is one line and an earlier benchmark is kept."""

from __future__ import annotations

import json

SMALL = ["--task", "parity", "--set", "task.length=8", "--set", "task.eval_lengths=[16, 32]", "--set", "task.eval_examples=16"]


def test_models_side_by_side_with_a_tuned_learning_rate(tmp_path, capsys, run):
    out, png = tmp_path / "bench", tmp_path / "bench.png"
    code, stdout, err = run(["bench-sequence", "--models", "gru,mamba2,gpt", "--steps", "3", "--seeds", "2", "--tune-lr", "gru",
                             "--lrs", "1e-3,1e-2", *SMALL, "--out", out, "--plot", png, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["gru", "mamba2", "gpt"] and report["task"] == "parity" and report["lengths"] == [8, 16, 32]
    gru = rows["gru"]
    assert set(gru["lr_trials"]) == {"0.001", "0.01"}
    assert gru["lr"] == float(max(gru["lr_trials"], key=gru["lr_trials"].get))
    for r in rows.values():
        assert r["steps"] == 3 and len(r["scores_by_seed"]["8"]) == 2 and 0 <= r["scores"]["8"] <= 1
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert (out / "gru" / "lr-0.001").is_dir() and (out / "gru" / "lr-0.01").is_dir() and (out / "gru" / "seed-1").is_dir()
    assert not (out / "gru" / "seed-0").exists()  # seed 0 is the tuned run itself
    for name in ("gru", "mamba2"):  # a constant-size recurrent state
        assert len(set(rows[name]["state_bytes"].values())) == 1
    sizes = rows["gpt"]["state_bytes"]  # a cache per token: 9, 17, 33 tokens
    assert sizes["33"] / sizes["9"] == 33 / 9
    assert png.stat().st_size > 0 and json.loads((out / "report.json").read_text()) == report
    code, table, _ = run(["bench-sequence", "--models", "gru,gpt", "--steps", "2", "--seeds", "1", *SMALL, "--out", tmp_path / "b2"], capsys)
    assert code == 0 and "acc@32" in table and "2 steps each" in table


def test_bad_input_is_one_line_and_an_earlier_benchmark_is_kept(tmp_path, capsys, run):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for args, says in [(["--models", "lstm,transformer"], "unknown model 'transformer'"),
                       (["--models", "lstm,lstm"], "names a model twice"),
                       (["--steps", "5", "--budget-seconds", "3"], "two budgets"),
                       (["--models", "lstm", "--tune-lr", "gru"], "--tune-lr: unknown model 'gru'"),
                       (["--models", "lstm", "--tune-lr", "lstm", "--lrs", "fast"], "--lrs takes learning rates"),
                       (["--models", "lstm", "--set", "model.n_layer=3"], "FAMILY:KEY=VALUE"),
                       (["--models", "lstm", "--task", "sorting"], "task.name must be one of"),
                       (["--models", "lstm", "--steps", "2"], "is not empty")]:
        code, _, err = run(["bench-sequence", *args, "--out", out], capsys)
        assert code != 0 and says in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert (out / "keep.txt").read_text() == "x"
