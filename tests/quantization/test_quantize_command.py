"""adl quantize and adl bench-quantize: every method's run folder reloads bit-exactly and decodes;
the commands through the real entry point; bad input answered in one line."""

import json
import shutil

import pytest
import torch

from adl_cli.engine.checkpoint import model_tensors
from adl_cli.errors import AdlError
from adl_cli.methods.quantize import calibration_windows
from adl_cli.quantization.apply import quantize_model
from adl_cli.quantization.methods import METHODS, QuantOptions
from adl_cli.quantization.outliers import inject_outliers
from adl_cli.quantization.store import save_quantized_run
from adl_cli.runs import load_run


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_writes_a_run_that_reloads_bit_exactly(method, bpe_run, tmp_path):
    run = load_run(bpe_run)
    windows, _ = calibration_windows(run, samples=4, seed=0)
    x = windows[:2]
    ref = run.model(x)[0]
    specs, opts = quantize_model(run.model, method, QuantOptions(calib_samples=4), windows)
    assert len(specs) == 2 * 6  # q, k, v, out, and the MLP's two layers in each of 2 blocks; the tied head stays float
    assert opts.group_size == (METHODS.get(method).default_group and 32)  # 128 and 64 halved to the widths' 32
    got = run.model(x)[0]
    # a barely trained model: every method stays near the float logits (4-bit steps of the widest weights)
    assert (got - ref).abs().max() < 0.25 * ref.abs().max()
    save_quantized_run(tmp_path / "q", run, run.model, {"method": method, "layers": specs})
    again = load_run(tmp_path / "q")
    saved, loaded = model_tensors(run.model), model_tensors(again.model)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # bit-exact
    assert torch.equal(again.model(x)[0], got)  # and the same function
    assert again.tokenizer is not None and (tmp_path / "q" / "recipe.toml").exists()


def test_awq_shares_one_scale_between_the_layers_that_read_one_input(bpe_run):
    """AutoAWQ's grouping: q, k and v read the same normalised input, so they get one input scale
    (searched on the attention's output); the MLP's first layer and the output projections get
    their own."""
    run = load_run(bpe_run)
    windows, _ = calibration_windows(run, samples=4, seed=0)
    quantize_model(run.model, "awq", QuantOptions(calib_samples=4), windows)
    attn, mlp = run.model.transformer.h[0].attn, run.model.transformer.h[0].mlp
    assert torch.equal(attn.q_proj.input_scale, attn.k_proj.input_scale) and torch.equal(attn.q_proj.input_scale, attn.v_proj.input_scale)
    layers = [m for m in mlp.modules() if hasattr(m, "input_scale")]
    assert len(layers) == 2 and not torch.equal(layers[0].input_scale, attn.q_proj.input_scale)


def test_calibrated_methods_need_calibration_text(bpe_run):
    run = load_run(bpe_run)
    with pytest.raises(AdlError, match="gptq needs calibration text"):
        quantize_model(run.model, "gptq", QuantOptions(), None)


def test_injected_outliers_keep_the_function_and_make_large_channels(bpe_run):
    run = load_run(bpe_run)
    x = calibration_windows(run, samples=2, seed=1)[0]
    before = run.model(x)[0]
    seen = {}
    q = run.model.transformer.h[0].attn.q_proj
    h = q.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].abs().amax((0, 1))))
    run.model(x)
    plain = seen["x"].clone()
    assert inject_outliers(run.model, x, n=2, scale=50.0) == 2 * 2  # ln_1 and ln_2 of both blocks; ln_f feeds the tied head
    after = run.model(x)[0]
    run.model(x)
    h.remove()
    # fp32: each product and the norm's sums round at 2^-24 relative; a few hundred of them per logit
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    ratio = seen["x"] / plain
    assert int((ratio > 40).sum()) == 2 and int((ratio < 1.01).sum()) == len(ratio) - 2


def test_quantize_command_end_to_end(bpe_run, tmp_path, run, capsys):
    out = tmp_path / "int4"
    code, stdout, err = run(["quantize", bpe_run, "--method", "int4", "--group-size", "32", "--out", out], capsys)
    assert code == 0, err
    assert "12 linear layers" in stdout and "groups of 32" in stdout
    record = json.loads((out / "quantization.json").read_text())
    assert record["method"] == "int4" and record["layers"]["transformer.h.0.mlp.c_fc"]["bits"] == 4
    code, stdout, err = run(["eval", out, "--json"], capsys)
    assert code == 0, err
    q = json.loads(stdout)
    code, stdout, _ = run(["eval", bpe_run, "--json"], capsys)
    f = json.loads(stdout)
    assert q["tokens"] == f["tokens"] and abs(q["loss"] - f["loss"]) < 0.05 * f["loss"]
    code, stdout, err = run(["generate", out, "--prompt", "The ", "--max-new-tokens", "4", "--temperature", "0"], capsys)
    assert code == 0, err
    # bench-inference times the quantized layers themselves (the --quant rows and the transformers peer left out)
    code, stdout, err = run(["bench-inference", out, "--batch", "1", "--new-tokens", "4", "--rounds", "1", "--only", "cache,int8,transformers",
                             "--json", tmp_path / "bi.json"], capsys)
    assert code == 0, err
    bench = json.loads((tmp_path / "bi.json").read_text())
    assert "a quantized run (int4" in " ".join(bench["notes"])
    # nothing is replaced without --force, and --force replaces it whole
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(["quantize", bpe_run, "--method", "int8", "--out", out], capsys)
    assert code == 2 and "not empty" in err and (out / "model.safetensors").read_bytes() == before
    code, _, err = run(["quantize", bpe_run, "--method", "int8", "--out", out, "--force"], capsys)
    assert code == 0, err
    assert json.loads((out / "quantization.json").read_text())["method"] == "int8"
    assert not list(tmp_path.glob(".int4.tmp-*"))  # no temporary folder left behind


@pytest.mark.parametrize("args, message", [
    (["--method", "int4", "--group-size", "48"], "--group-size 48 does not divide the input width 32"),
    (["--method", "gptq", "--bits", "3"], "--bits for gptq is one of 4, 8, got 3"),
    (["--method", "nf4", "--bits", "8"], "--bits for nf4 is fixed at 4"),
    (["--method", "hqq", "--grid", "absmax"], "--grid applies to int8 and int4"),
    (["--method", "smoothquant", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--method", "llm-int8", "--group-size", "32"], "llm-int8 keeps one scale a row"),
    (["--method", "int8", "--calib-data", "pydoc"], "int8 reads no activations"),
    (["--method", "gtpq"], "unknown quantization method 'gtpq'"),
])
def test_bad_quantize_options_are_one_line_errors(args, message, bpe_run, tmp_path, run, capsys):
    code, stdout, err = run(["quantize", bpe_run, "--out", tmp_path / "q", *args], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_runs_it_cannot_quantize_are_clear_errors(bpe_run, tmp_path, run, capsys):
    bare = tmp_path / "bare"  # an imported run: no recipe, so no training split to calibrate on
    shutil.copytree(bpe_run, bare, ignore=shutil.ignore_patterns("recipe.toml", "checkpoints"))
    code, _, err = run(["quantize", bare, "--method", "gptq", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "has no recipe.toml" in err and "--calib-data" in err
    code, _, err = run(["quantize", bpe_run, "--method", "int8", "--out", tmp_path / "q8"], capsys)
    assert code == 0, err
    code, _, err = run(["quantize", tmp_path / "q8", "--method", "int4", "--out", tmp_path / "again"], capsys)
    assert code == 2 and "already quantized" in err
    code, _, err = run(["eval", tmp_path / "q8", "--quant", "int8"], capsys)
    assert code == 2 and "already quantized" in err


def test_bench_quantize_reports_every_contender(bpe_run, tmp_path, run, capsys):
    args = ["bench-quantize", bpe_run, "--method", "int8", "--method", "gptq", "--method", "int4", "--max-tokens", "600",
            "--rounds", "1", "--new-tokens", "4", "--calib-samples", "4", "--json"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    report = json.loads(stdout)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "int8", "gptq", "int4"]
    assert rows["fp32"]["kl"] == 0 and rows["fp32"]["bits_per_parameter"] == pytest.approx(32.0)
    assert all(rows[m]["kl"] >= 0 and rows[m]["decode_tok_s"] > 0 for m in rows)
    assert rows["int4"]["bits_per_parameter"] < rows["int8"]["bits_per_parameter"] < 32
    # the float model's loss here is eval's on the same tokens
    code, stdout, _ = run(["eval", bpe_run, "--json", "--max-tokens", "600"], capsys)
    assert rows["fp32"]["loss"] == pytest.approx(json.loads(stdout)["loss"], rel=1e-5)
    code, stdout, err = run(["bench-quantize", bpe_run, "--method", "int8", "--max-tokens", "600", "--rounds", "1", "--new-tokens", "4",
                             "--plot", tmp_path / "q.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG" and "int8" in stdout


def test_float_dtype_narrows_what_stays_float(bpe_run, tmp_path, run, capsys):
    for dtype in ("fp32", "bf16"):
        code, _, err = run(["quantize", bpe_run, "--method", "int8", "--float-dtype", dtype, "--out", tmp_path / dtype], capsys)
        assert code == 0, err
    small, full = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32"))
    assert small < full
    src = load_run(bpe_run).model.transformer.wte.weight
    got = load_run(tmp_path / "bf16").model.transformer.wte.weight
    assert got.dtype == torch.float32 and torch.equal(got, src.to(torch.bfloat16).float())  # stored bf16, loaded back as fp32
    q = load_run(tmp_path / "bf16").model.transformer.h[0].mlp.c_fc
    assert torch.equal(q.qweight, load_run(tmp_path / "fp32").model.transformer.h[0].mlp.c_fc.qweight)  # the quantized layers alike
    code, _, err = run(["quantize", bpe_run, "--method", "int8", "--float-dtype", "fp8", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--float-dtype must be one of fp32, bf16, fp16" in err
