import tomllib

import pytest

from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import PretrainRecipe, load_pretrain_recipe
from adl_cli.recipe import dump_recipe, load_recipe


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_defaults_and_types(tmp_path):
    r = load_pretrain_recipe(write(tmp_path, "[model]\nn_layer = 3\n[train]\nlr = 1\n"))
    assert r.model.n_layer == 3
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)  # ints coerce to float fields
    assert r.model.n_head == 6 and r.data.corpus == "pydoc"


def test_overrides_coerce_types(tmp_path):
    r = load_pretrain_recipe(
        write(tmp_path, "[train]\nsteps = 5\n"),
        ["train.steps=200", "model.attention=naive", "train.compile=true", "train.lr=1e-3", "model.n_kv_head=none", "data.corpus=1.txt", "model.position_options.theta=500"],
    )
    assert r.train.steps == 200 and r.model.attention == "naive" and r.train.compile is True
    assert r.train.lr == pytest.approx(1e-3) and r.model.n_kv_head is None
    assert r.data.corpus == "1.txt"  # a string field keeps the literal text
    assert r.model.position_options == {"theta": 500}


@pytest.mark.parametrize(
    "text, overrides, pieces",
    [
        ("[train]\nsteeps = 5\n", [], ["train.steeps", "did you mean 'train.steps'", "r.toml"]),
        ("[trian]\nsteps = 5\n", [], ["'trian'", "did you mean 'train'"]),
        ("[train]\nsteps = 'many'\n", [], ["train.steps", "must be an integer", "'many'"]),
        ("[train]\ncompile = 1\n", [], ["train.compile", "true or false"]),
        ("[train]\nsteps = 5\n", ["train.stepz=3"], ["train.stepz", "did you mean 'train.steps'"]),
        ("[train]\nsteps = 5\n", ["train.steps=abc"], ["train.steps", "integer"]),
        ("[train]\nsteps = 5\n", ["train.steps"], ["key=value"]),
        ("[train]\nsteps = 5\n", ["train=3"], ["section"]),
        ("[train]\nprecision = 'fp8'\n", [], ["precision", "auto, fp32, bf16, fp16"]),
        ("[train]\nsteps = 0\n", [], ["train.steps must be >= 1"]),
        ("[model]\nattention = 'flsh'\n", [], ["model.attention", "did you mean"]),
        ("[model]\nn_embd = 100\nn_head = 3\n", [], ["multiple of model.n_head"]),
        ("[data]\nval_fraction = 0.9\n", [], ["val_fraction"]),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, overrides, pieces):
    with pytest.raises(AdlError) as e:
        load_pretrain_recipe(write(tmp_path, text), overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for piece in pieces:
        assert piece in msg, (piece, msg)


def test_syntax_error_names_line(tmp_path):
    with pytest.raises(AdlError) as e:
        load_pretrain_recipe(write(tmp_path, "[train]\nsteps = 5\nlr = = 2\n"))
    assert "line 3" in str(e.value) and "r.toml" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(AdlError, match="recipe not found"):
        load_pretrain_recipe(tmp_path / "nope.toml")


def test_dump_round_trip(tmp_path):
    r = load_pretrain_recipe(write(tmp_path, 'name = "x"\nsample_prompt = "a \\"q\\"\\n"\n[model]\nposition_options = { theta = 100.0 }\n[train]\nsteps = 9\n'))
    text = dump_recipe(r, header="resolved")
    tomllib.loads(text)
    p = tmp_path / "again.toml"
    p.write_text(text)
    assert load_recipe(p, PretrainRecipe) == r


def test_shipped_recipes_parse():
    from adl_cli.cli.recipes import all_recipes

    found = all_recipes()
    assert "pretrain/tiny" in found
    for name, path in found.items():
        if name.startswith("pretrain/"):
            load_pretrain_recipe(path)
