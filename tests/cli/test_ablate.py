"""adl ablate through the real entry point: variants at an equal budget, paired differences, figure."""

from __future__ import annotations

import json


def test_ablate_runs_variants_pairs_them_by_seed_and_draws(tiny_recipe, tmp_path, capsys, run):
    out, js, png = tmp_path / "abl", tmp_path / "abl.json", tmp_path / "abl.png"
    code, text, err = run(["ablate", tiny_recipe, "--vary", "model.norm=layernorm,rmsnorm", "--vary", "train.optimizer=muon",
                           "--steps", "3", "--seeds", "2", "--out", out, "--json", js, "--plot", png], capsys)
    assert code == 0, err
    data = json.loads(js.read_text())
    rows = {r["variant"]: r for r in data["summary"]}
    assert set(rows) == {"baseline", "model.norm=rmsnorm", "train.optimizer=muon"}  # layernorm is the recipe's own: the baseline
    variants = {v["name"]: v for v in data["variants"]}
    for name, v in variants.items():
        assert v["seeds"] == [7, 8] and len(v["val_bpb"]) == 2
        base = variants["baseline"]["val_bpb"]
        assert v["delta_bpb"] == [a - b for a, b in zip(v["val_bpb"], base)]  # paired with the baseline of the same seed
    assert rows["baseline"]["delta_bpb"] == 0.0 and rows["train.optimizer=muon"]["delta_bpb_sd"] is not None
    assert (out / "train.optimizer_muon" / "seed-8" / "summary.json").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Δ bpb ± sd" in text and "model.norm=rmsnorm" in text.replace("\n", "").replace("│", "").replace(" ", "")


def test_ablate_refuses_bad_variants_before_training(tiny_recipe, tmp_path, capsys, run):
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.norm=rmsnrom", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "variant model.norm=rmsnrom" in err and "did you mean 'rmsnorm'" in err and not (tmp_path / "a").exists()
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.norm", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "--vary takes KEY=V1,V2" in err
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.norm=layernorm", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "nothing to compare" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.norm=rmsnorm", "--out", tmp_path / "b"], capsys)
    assert code == 2 and "not empty" in err and (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_a_budget_in_seconds_gives_each_variant_the_steps_its_probe_allows(tiny_recipe, tmp_path, capsys, run, monkeypatch):
    import adl_cli.methods.ablate as ablate

    probes = []

    def fake_probe(recipe, sets, folder, probe_steps):  # a deterministic clock: the 4-layer variant is twice as slow
        probes.append(sets)
        return 0.01 if "model.n_layer=4" in sets else 0.005

    monkeypatch.setattr(ablate, "seconds_per_step", fake_probe)
    out, js = tmp_path / "abl", tmp_path / "abl.json"
    code, text, err = run(["ablate", tiny_recipe, "--vary", "model.n_layer=4", "--budget-seconds", "0.2", "--out", out, "--json", js], capsys)
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads(js.read_text())["summary"]}
    assert rows["baseline"]["steps"] == 40 and rows["model.n_layer=4"]["steps"] == 20 and len(probes) == 2
    assert json.loads((out / "model.n_layer_4" / "seed-7" / "summary.json").read_text())["steps"] == 20
    assert "0.2 s of training each" in text
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.n_layer=4", "--budget-seconds", "5", "--steps", "3", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "give one of --budget-tokens, --budget-seconds and --steps" in err
    code, _, err = run(["ablate", tiny_recipe, "--vary", "model.n_layer=4", "--budget-seconds", "-1", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--budget-seconds must be a positive number" in err


def test_the_time_probe_measures_training_steps_and_leaves_nothing(tiny_recipe, tmp_path):
    from adl_cli.methods.ablate import seconds_per_step

    per_step = seconds_per_step(tiny_recipe, [], tmp_path / "probe", 10)
    assert 0 < per_step < 60 and not (tmp_path / "probe").exists()
