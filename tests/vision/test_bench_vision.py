"""adl bench-vision through the real entry point: equal budgets become per-family step counts from
the probe, every seed is an ordinary run, the baseline is scikit-learn's; bad input is one line."""

from __future__ import annotations

import json

import adl_cli.methods.ablate as ablate


def test_equal_budget_gives_each_family_the_steps_its_probe_allows(tmp_path, capsys, run, monkeypatch):
    probes = []

    def fake_probe(recipe, sets, folder, probe_steps, **kw):  # a deterministic clock: the Mixer twice as slow as the CNN
        probes.append((recipe.stem, sets))
        return 0.02 if recipe.stem == "mixer" else 0.01

    monkeypatch.setattr(ablate, "seconds_per_step", fake_probe)
    out, png = tmp_path / "bench", tmp_path / "b.png"
    args = ["bench-vision", "--models", "mixer,cnn", "--budget-seconds", "0.1", "--seeds", "2", "--set", "data.n=300",
            "--set", "cnn:model.widths=[8, 16]", "--out", out, "--json", "--plot", png]
    code, text, err = run(args, capsys)
    assert code == 0, err
    report = json.loads(text)
    rows = {r["family"]: r for r in report["rows"]}
    assert rows["mixer"]["steps"] == 5 and rows["cnn"]["steps"] == 10
    assert [p[1] for p in probes] == [["data.n=300"], ["data.n=300", "model.widths=[8, 16]"]]  # a family's own setting: its runs only
    assert report["settings"] == {"cnn": ["model.widths=[8, 16]"]}
    for fam, steps in (("mixer", 5), ("cnn", 10)):
        for seed in (0, 1):
            s = json.loads((out / fam / f"seed-{seed}" / "summary.json").read_text())
            assert s["steps"] == steps and s["test"]["n"] == 60
            widths = "widths = [8, 16]" in (out / fam / f"seed-{seed}" / "recipe.toml").read_text()
            assert widths == (fam == "cnn")
        assert sorted(rows[fam]["test_by_seed"])[0] == rows[fam]["test_min"]
    base = report["baselines"][0]
    assert base["test_images"] == 60 and 0.5 < base["test_accuracy"] <= 1.0  # logistic regression on 240 digits
    assert png.exists() and png.stat().st_size > 1000
    code, _, err = run(args, capsys)
    assert code == 2 and "b.png exists" in err
    code, _, err = run(args[:-3], capsys)  # the folder holds a benchmark now
    assert code == 2 and "is not empty" in err


def test_bad_input_is_one_line(tmp_path, capsys, run):
    for args, message in ((["--models", "vit,resnet"], "unknown family 'resnet'"), (["--seeds", "0"], "--seeds must be >= 1"),
                          (["--budget-seconds", "0"], "--budget-seconds must be a positive"),
                          (["--set", "train.lr=1"], "takes data.KEY=VALUE"),
                          (["--models", "cnn", "--set", "vit:model.patch=4"], "'vit' is not among the families benchmarked"),
                          (["--models", "slots"], "adl vision slots"), (["--set", "data.set=imagenet", "--models", "cnn"], "unknown image set 'imagenet'")):
        code, _, err = run(["bench-vision", *args, "--out", tmp_path / "x"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
