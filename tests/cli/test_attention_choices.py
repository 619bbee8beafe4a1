"""Every attention name either trains, samples and generates, or is refused when the recipe is read."""

import pytest

from adl_cli.methods.pretrain import load_pretrain_recipe
from adl_cli.nn.attention import ATTENTION, ATTENTION_BLOCKS

OPTIONS = {"window": ["--set", "model.attention_options.window=8"], "s2": ["--set", "model.attention_options.group=8"]}


@pytest.mark.parametrize("name", ATTENTION.names() + ATTENTION_BLOCKS.names())
def test_every_attention_trains_samples_and_generates(name, tiny_recipe, tmp_path, capsys, run, monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
    out = tmp_path / name
    code, _, err = run(["pretrain", tiny_recipe, "--out", out, "--no-progress", "--set", f"model.attention={name}",
                        "--set", "train.steps=2", "--set", "sample_tokens=5", *OPTIONS.get(name, [])], capsys)
    assert code == 0, err
    for prompt in ("Th", "The with statement is used"):  # shorter than any shard or group, and a longer odd length
        code, text, err = run(["generate", out, "--prompt", prompt, "--max-new-tokens", "4"], capsys)
        assert code == 0 and text.startswith(prompt), err


@pytest.mark.parametrize("sets, piece", [
    (["model.attention=window"], "needs model.attention_options.window"),
    (["model.attention=s2"], "needs model.attention_options.group"),
    (["model.attention=s2", "model.attention_options.group=5"], "divides model.block_size"),
    (["model.attention=flash", "model.attention_options.windw=4"], "no option 'windw' (did you mean 'window'?)"),
    (["model.attention=sdpa", "model.attention_options.block_q=4"], "'sdpa' has no option 'block_q'"),
    (["model.attention=ring", "model.attention_options.window=4"], "'ring' has no option 'window'"),
    (["model.attention=mla", "model.attention_options.rank=4"], "'mla' has no option 'rank'"),
])
def test_bad_kernel_options_are_refused_when_the_recipe_is_read(sets, piece, tiny_recipe):
    from adl_cli.errors import AdlError

    with pytest.raises(AdlError, match=None) as e:
        load_pretrain_recipe(tiny_recipe, sets)
    assert piece in str(e.value)
