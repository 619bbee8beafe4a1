"""The recurrent language-model families through the main job's commands: adl pretrain trains
each on text, adl generate decodes from its constant-size state (batched prompts equal each alone),
adl eval scores it in bits per byte."""

from __future__ import annotations

import json

import pytest

FAMILIES = {"mamba": 'family = "mamba"\nn_layer = 1\nn_embd = 32\nd_state = 4',
            "mamba2": 'family = "mamba2"\nn_layer = 1\nn_embd = 32\nd_state = 4\nheaddim = 16',
            "mlstm": 'family = "mlstm"\nn_layer = 1\nn_embd = 32\nn_head = 2',
            "slstm": 'family = "slstm"\nn_layer = 1\nn_embd = 32\nn_head = 2',
            "gru": 'family = "rnn"\ncell = "gru"\nn_layer = 1\nn_embd = 32'}


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_pretrain_generate_and_eval(fam, tmp_path, tiny_recipe, capsys, run):
    text = tiny_recipe.read_text()
    model = text[text.index("[model]"):text.index("[data]")]
    recipe = tmp_path / f"{fam}.toml"
    recipe.write_text(text.replace(model, f"[model]\n{FAMILIES[fam]}\nblock_size = 32\nvocab_multiple = 8\n\n")
                      .replace("[train]", '[train]\nprecision = "fp32"'))
    out = tmp_path / "run"
    code, _, err = run(["pretrain", recipe, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The with\nA\n")
    code, together, err = run(["generate", out, "--prompt-file", prompts, "-n", "6", "--temperature", "0", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(together)["completions"]
    assert [r["prompt"] for r in rows] == ["The with", "A"] and all(len(r["tokens"]) == 6 for r in rows)
    for row in rows:
        code, alone, err = run(["generate", out, "--prompt", row["prompt"], "-n", "6", "--temperature", "0", "--json"], capsys)
        assert code == 0, err
        assert json.loads(alone)["completions"][0]["tokens"] == row["tokens"]
    code, scored, err = run(["eval", out, "--json"], capsys)
    assert code == 0, err
    bpb = json.loads(scored)["bits_per_byte"]
    assert 0 < bpb < 8 and summary["val_bits_per_byte"] < 8  # below a uniform guess over 256 bytes after 6 steps
