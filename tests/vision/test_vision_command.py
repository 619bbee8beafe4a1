"""adl vision through the real entry point: a tiny recipe trains, reports and reloads; a resumed run
equals an uninterrupted one; bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adl_cli.runs import load_run

TINY = """
name = "v"
[model]
family = "{family}"
{extra}
[data]
set = "digits"
n = 300
[augment]
crop_pad = 1
[train]
steps = {steps}
batch_size = 16
lr = 3e-3
warmup = 2
eval_every = 0
checkpoint_every = {ck}
log_every = 5
precision = "fp32"
"""


def _recipe(tmp_path, family="vit", extra="dim = 16\ndepth = 1\nheads = 2", steps=12, ck=0, name="r.toml"):
    p = tmp_path / name
    p.write_text(TINY.format(family=family, extra=extra, steps=steps, ck=ck))
    return p


@pytest.mark.parametrize("family,extra", [("vit", "dim = 16\ndepth = 1\nheads = 2"), ("mixer", "dim = 16\ndepth = 1\ntoken_hidden = 8"),
                                          ("poolformer", "dim = 16\ndepth = 1"), ("fnet", "dim = 16\ndepth = 1"), ("cnn", "widths = [8, 16]"),
                                          ("axial", "dim = 16\ndepth = 1\nheads = 2"),
                                          ("swin", "dim = 8\ndepths = [1, 1]\nheads = [2, 2]\nwindow = 2\npatch = 2")])
def test_every_family_trains_reports_and_reloads(family, extra, tmp_path, capsys, run):
    code, out, err = run(["vision", _recipe(tmp_path, family, extra), "--out", tmp_path / "run", "--json", "--no-progress"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["family"] == family and s["test"]["n"] + s["val"]["n"] == 90  # 10% + 20% of 300
    conf = torch.tensor(s["test"]["confusion"])
    assert conf.sum() == s["test"]["n"] and abs(conf.diag().sum() / conf.sum() - s["test"]["accuracy"]) < 1e-9
    assert (tmp_path / "run" / "confusion.png").exists() and (tmp_path / "run" / "report.md").exists()
    assert ((tmp_path / "run" / "attention.png").exists()) == (family == "vit")
    assert ((tmp_path / "run" / "window_attention.png").exists()) == (family == "swin")
    model = load_run(tmp_path / "run").model
    from adl_cli.data.images import load_images, split
    from adl_cli.methods.vision import scores

    test = split(load_images("digits", n=300)).test
    assert abs(scores(model, test)["accuracy"] - s["test"]["accuracy"]) < 1e-9  # the saved model is the scored one


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys, run):
    """What a kill right after the step-5 checkpoint leaves, resumed, ends bit-identical to the
    uninterrupted run (batches and augmentations are functions of the seed and the step)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(["vision", _recipe(tmp_path, steps=10, ck=5), "--out", full, "--no-progress"], capsys)[0] == 0
    shutil.copytree(full, killed)
    for name in ("model.safetensors", "summary.json", "report.md"):
        (killed / name).unlink()
    shutil.rmtree(killed / "checkpoints" / "step-10")
    (killed / "checkpoints" / "latest").write_text("step-5\n")
    code, _, err = run(["vision", killed / "recipe.toml", "--out", killed, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    a, b = load_run(full).model.state_dict(), load_run(killed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tmp_path, capsys, run):
    cases = [
        (_recipe(tmp_path, "gpt", "n_layer = 1", name="gpt.toml"), "not an image family"),
        (_recipe(tmp_path, "vit", "patch = 3", name="patch.toml"), "must divide the image size"),
        (_recipe(tmp_path, "vit", "heads = 5", name="heads.toml"), "must divide model.dim"),
    ]
    for recipe, message in cases:
        code, _, err = run(["vision", recipe, "--out", tmp_path / "x", "--no-progress"], capsys)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(["vision", _recipe(tmp_path), "--set", "data.set=imagenet", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "unknown image set 'imagenet'" in err
    code, _, err = run(["vision", _recipe(tmp_path), "--set", "data.label=count", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "has no 'count' label" in err
    assert run(["vision", _recipe(tmp_path, steps=2), "--out", tmp_path / "done", "--no-progress"], capsys)[0] == 0
    before = (tmp_path / "done" / "model.safetensors").read_bytes()
    code, _, err = run(["vision", _recipe(tmp_path, steps=2), "--out", tmp_path / "done", "--no-progress"], capsys)
    assert code == 2 and "already holds a run" in err
    assert (tmp_path / "done" / "model.safetensors").read_bytes() == before


def test_the_batch_stream_reads_every_training_image_once_an_epoch():
    from adl_cli.data.images import Augment, load_images
    from adl_cli.methods.vision import ImageBatches

    data = load_images("digits", n=100)
    batches = ImageBatches(data, 64, 1, 3, Augment())
    seen = torch.cat([batches.indices(step, 0, 0, 1) for step in range(25)])  # 1,600 reads = 16 epochs, batches straddling them
    assert all(sorted(seen[e * 100:(e + 1) * 100].tolist()) == list(range(100)) for e in range(16))
    two = torch.cat([batches.indices(4, 0, r, 2) for r in range(2)])  # two ranks split one global batch
    assert torch.equal(two, ImageBatches(data, 128, 1, 3, Augment()).indices(4, 0, 0, 1))
