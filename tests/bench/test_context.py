"""Context extension (bench/context.py) on a tiny RoPE model trained for a few steps."""

import json
import math
import shutil

import pytest

from adl_cli.errors import AdlError
from adl_cli.bench.context import ROPE_FAMILY, bench_context, kv_cache_table

def test_finite_perplexity_per_length_and_position(rope_run):
    report = bench_context(rope_run, "16,32,64", "rope,pi,ntk,yarn")
    assert report.trained_length == 16 and report.lengths == [16, 32, 64]
    assert [(r.position, r.length) for r in report.rows] == [(p, n) for p in ROPE_FAMILY for n in (16, 32, 64)]
    for r in report.rows:
        assert math.isfinite(r.ppl) and 1.0 < r.ppl < 300, r  # bytes: at most ~vocab
        assert r.tokens == 64 * report.windows // r.length * r.length
    plain = {r.length: r for r in report.rows if r.position == "rope"}
    assert plain[16].ratio == pytest.approx(1.0)
    # s = length / trained for the scaled variants, none for plain rope
    assert [r.scale for r in report.rows if r.position == "yarn"] == [1.0, 2.0, 4.0]
    assert plain[64].scale is None


def test_scale_one_is_plain_rope(rope_run):
    report = bench_context(rope_run, [16, 32], "rope,pi,ntk,yarn", scale=1.0)
    by_len = {}
    for r in report.rows:
        by_len.setdefault(r.length, []).append(r.ppl)
    for ppls in by_len.values():
        assert max(ppls) == pytest.approx(min(ppls), rel=1e-5)


def test_finetune_writes_its_own_folder(rope_run, tmp_path):
    from adl_cli.bench.context import perplexity
    from adl_cli.runs import load_run

    before = {p.name: p.read_bytes() for p in rope_run.iterdir() if p.is_file()}
    report = bench_context(rope_run, [16, 32], "yarn", finetune_steps=2, out_dir=tmp_path)
    tuned_rows = [r for r in report.rows if r.mode == "finetuned"]
    assert [r.length for r in tuned_rows] == [16, 32] and all(r.scale == 2.0 and math.isfinite(r.ppl) for r in tuned_rows)
    assert {p.name: p.read_bytes() for p in rope_run.iterdir() if p.is_file()} == before  # the run is untouched
    target = tmp_path / "context-yarn"
    assert report.finetune["yarn"]["dir"] == str(target)
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["position"] == "yarn" and cfg["block_size"] == 32 and cfg["position_options"]["original_max_position"] == 16
    # the saved fine-tune reloads as a model that reads 32 tokens with YaRN s=2
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.pretrain import load_pretrain_recipe

    data = load_tokens(load_pretrain_recipe(rope_run / "recipe.toml").data)
    loss, _ = perplexity(load_run(target).model, data.val, 32, 32 * report.windows)
    assert math.exp(loss) == pytest.approx(tuned_rows[1].ppl, rel=1e-4)


def test_kv_cache_table(rope_run):
    from adl_cli.runs import load_run

    cfg = load_run(rope_run).model.config
    rows = {r["attention"]: r for r in kv_cache_table(cfg, 64)}
    assert rows["MHA"]["bytes_per_token"] == 2 * 1 * 2 * 16 * 2
    assert rows["GQA"]["bytes_per_token"] == 2 * 1 * 1 * 16 * 2
    assert rows["MLA"]["bytes_at_length"] == 64 * rows["MLA"]["bytes_per_token"]


def test_bad_inputs(rope_run, tmp_path):
    with pytest.raises(AdlError, match="run folder not found"):
        bench_context(tmp_path / "nope", [16])
    with pytest.raises(AdlError, match="validation split"):
        bench_context(rope_run, [100_000])
    with pytest.raises(AdlError, match="^scale must be a finite number >= 1") as e:  # the library names parameters, not flags
        bench_context(rope_run, [16], "pi", scale=0.5)
    assert e.value.cli_message().startswith("--scale must")  # the CLI names its flag
    with pytest.raises(AdlError, match="^lengths: 'abc' is not an integer"):
        bench_context(rope_run, "16,abc")
    with pytest.raises(AdlError, match="unknown position 'yarm'.*did you mean 'yarn'"):
        bench_context(rope_run, [16], "yarm")
    with pytest.raises(AdlError, match="trained with position=rope"):
        bench_context(rope_run, [16], "alibi")
    learned = tmp_path / "learned"
    shutil.copytree(rope_run, learned)
    cfg = json.loads((learned / "config.json").read_text())
    (learned / "config.json").write_text(json.dumps(dict(cfg, position="learned")))
    with pytest.raises(AdlError, match="must have been trained with.*rope|learned positions.*cannot extend beyond block_size"):
        bench_context(learned, [16, 32], "rope")
