"""adl lora end to end through the real entry point, on a tiny BPE run: LoRA with the chat
template's new token rows, QLoRA, bottleneck adapters, full fine-tuning and plain text; adapter
runs reload, generate and merge; checkpoints hold only what trains and resume exactly; bad input
is one clear line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

LORA_RECIPE = """
name = "l"
method = "{method}"
samples = 1

[init]
from = "{base}"

[data]
tasks = ["addition"]
train_examples = 64
val_examples = 8
eval_examples = 6
eval_examples_during = 0
operand_digits = 2

[lora]
r = 4
alpha = 8
targets = ["q_proj", "v_proj", "c_fc"]

[qlora]
compute = "fp32"

[adapter]
size = 8

[train]
steps = 4
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup = 1
eval_every = 0
checkpoint_every = 2
log_every = 1
seed = 3
"""


def _write(root, base, method, name=None):
    path = root / f"{name or method}.toml"
    path.write_text(LORA_RECIPE.format(base=base.as_posix(), method=method), encoding="utf-8")
    return path


def _train(recipe, out, *extra):
    from adl_cli.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        try:
            main(["lora", str(recipe), "--out", str(out), "--no-progress", *map(str, extra)])
        except SystemExit as e:
            assert not e.code


@pytest.fixture(scope="module")
def runs(bpe_run, tmp_path_factory):
    """{method: (run folder, recipe)} for lora, qlora and adapter runs from the BPE run (read-only)."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for method in ("lora", "qlora", "adapter"):
        recipe = _write(root, bpe_run, method)
        _train(recipe, root / method)
        out[method] = (root / method, recipe)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("method", ["lora", "qlora", "adapter"])
def test_an_adapter_run_holds_only_the_adapter_and_reloads_on_its_base(runs, bpe_run, method):
    from safetensors.torch import load_file

    from adl_cli.runs import file_digest, load_run

    folder, _ = runs[method]
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["kind"] == ("adapter" if method == "adapter" else "lora") and meta["config"]["token_rows"]
    assert ("qlora" in meta["config"]) == (method == "qlora")
    assert not (folder / "model.safetensors").exists()
    tensors = load_file(folder / "adapter.safetensors")
    assert tensors and all(("lora_" in k or "bottlenecks." in k or "ln_" in k or "trainable_tokens_delta" in k) for k in tensors)
    summary = json.loads((folder / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["parameters"] and summary["peak_tensor_bytes"] > summary["model_tensor_bytes"] > 0
    assert summary["tasks"]["addition"]["base"]["n"] == 6
    # checkpoints hold the trained tensors only, the same names as the final adapter's (plus peft's adapter suffix)
    ck = load_file(folder / "checkpoints" / "step-4" / "model.safetensors")
    assert all(("lora_" in k or "bottlenecks." in k or "ln_" in k or "trainable_tokens_delta" in k) for k in ck)
    run = load_run(folder)
    assert run.tokenizer.vocab_size == json.loads((folder / "tokenizer.json").read_text())["vocab_size"]
    assert run.lineage[0]["kind"] == "adapter-base"
    digest = json.loads((folder / "lineage.json").read_text())["parents"][0]["sha256"]
    assert digest == file_digest(bpe_run / "model.safetensors")  # the base is untouched


def test_a_resumed_adapter_run_ends_where_an_uninterrupted_one_does(runs, tmp_path):
    from safetensors.torch import load_file

    folder, recipe = runs["lora"]
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    (copy / "checkpoints" / "latest").write_text("step-2")
    for name in ("adapter.safetensors", "adapter.json", "summary.json"):
        (copy / name).unlink()
    _train(recipe, copy, "--resume", "--no-base", "--no-memory")
    want, got = load_file(folder / "adapter.safetensors"), load_file(copy / "adapter.safetensors")
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merge_writes_a_plain_run_with_the_same_logits(runs, run, capsys, tmp_path, method):
    from adl_cli.runs import load_run

    folder, _ = runs[method]
    code, out, err = run(["lora", "merge", folder, "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").exists() and not (tmp_path / "m" / "adapter.json").exists()
    adapter, merged = load_run(folder), load_run(tmp_path / "m")
    assert type(merged.model.transformer.wte) is torch.nn.Embedding
    ids = torch.tensor([adapter.tokenizer.encode("What is 12 + 7?").tolist() + [adapter.tokenizer.vocab_size - 1]])
    torch.testing.assert_close(_logits(merged.model, ids), _logits(adapter.model, ids), rtol=1e-4, atol=1e-4)
    code, out, err = run(["lora", "merge", folder, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err


def test_adapter_runs_generate_and_bottlenecks_refuse_to_merge(runs, run, capsys, tmp_path):
    folder, _ = runs["adapter"]
    code, out, err = run(["generate", folder, "--chat", "--prompt", "What is 2 + 3?", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    code, out, err = run(["lora", "merge", folder, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "cannot be folded" in err and not (tmp_path / "m").exists()
    lora_run, _ = runs["lora"]  # new token rows: transformers' GPT-2 cannot take them as a peft adapter
    code, out, err = run(["export", "hf", lora_run, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "adl lora merge" in err and not (tmp_path / "hf").exists()


def test_full_fine_tuning_and_plain_text(bpe_run, small_corpus, run, capsys, tmp_path):
    """method full writes a plain run; data.corpus trains on text with the base tokenizer, and
    the report measures the base's held-out loss on the same windows."""
    recipe = _write(tmp_path, bpe_run, "full")
    code, out, err = run(["lora", recipe, "--out", tmp_path / "full", "--no-progress", "--no-memory"], capsys)
    assert code == 0, err
    assert (tmp_path / "full" / "model.safetensors").exists() and not (tmp_path / "full" / "adapter.json").exists()
    s = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert s["trainable_parameters"] == s["parameters"]
    text = _write(tmp_path, bpe_run, "lora", "text")
    body = text.read_text().replace('tasks = ["addition"]', f'corpus = "{small_corpus.as_posix()}"\nval_windows = 4')
    text.write_text(body)
    code, out, err = run(["lora", text, "--out", tmp_path / "text", "--no-progress", "--no-memory"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "text" / "summary.json").read_text())
    assert s["tasks"] == {} and s["base_val_loss"] > 0 and s["val_loss"] > 0
    meta = json.loads((tmp_path / "text" / "adapter.json").read_text())
    assert "token_rows" not in meta["config"] and "grow" not in meta  # the base tokenizer as it is


@pytest.mark.parametrize("change, message", [
    (lambda r: r.replace('method = "lora"', 'method = "lorra"'), "method must be one of full, lora, dora, qlora, adapter"),
    (lambda r: r.replace('targets = ["q_proj", "v_proj", "c_fc"]', 'targets = ["query"]'), "no linear layer named 'query'"),
    (lambda r: r.replace("r = 4", "r = 0"), "lora.r (the rank) must be >= 1"),
    (lambda r: r.replace('tasks = ["addition"]', 'tasks = ["addition"]\ncorpus = "pydoc"'), "exclude each other"),
    (lambda r: r.replace("[train]", "[train]\noptimizer = \"adamw9bit\""), "adamw9bit"),
])
def test_bad_input_is_one_clear_line(bpe_run, run, capsys, tmp_path, change, message):
    path = _write(tmp_path, bpe_run, "lora")
    path.write_text(change(path.read_text()))
    code, out, err = run(["lora", path, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "adapter.json").exists()


def test_merge_needs_an_adapter_run_and_an_out(bpe_run, run, capsys, tmp_path):
    code, out, err = run(["lora", "merge", bpe_run, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "not an adapter run" in err
    code, out, err = run(["lora", "merge", bpe_run], capsys)
    assert code == 2 and "--out" in err
    code, out, err = run(["lora", "merge"], capsys)
    assert code == 2 and "name the adapter run" in err


LONGLORA = """
name = "long"
method = "longlora"
samples = 0

[init]
from = "{base}"

[data]
corpus = "{corpus}"
val_fraction = 0.1
val_windows = 4

[context]
length = 64
position = "yarn"

[lora]
r = 4
alpha = 8
targets = ["q_proj", "k_proj", "v_proj", "c_proj"]

[train]
steps = 4
batch_size = 2
lr = 3e-3
min_lr = 3e-4
warmup = 1
eval_every = 0
checkpoint_every = 2
log_every = 1
seed = 3
"""


def test_longlora_trains_at_4x_with_s2_and_reads_with_full_attention(rope_run, small_corpus, run, capsys, tmp_path):
    """LongLoRA from a RoPE run trained at 16 tokens: 64 tokens, YaRN, S2-Attn in groups of 16
    while training; the saved run reads at 64 with the base's attention, its embeddings and
    norms trained in full beside the adapters; merge gives the same logits."""
    from adl_cli.runs import load_run

    recipe = tmp_path / "long.toml"
    recipe.write_text(LONGLORA.format(base=rope_run.as_posix(), corpus=small_corpus.as_posix()))
    code, out, err = run(["lora", recipe, "--out", tmp_path / "long", "--no-progress"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "long" / "adapter.json").read_text())
    assert meta["model"]["block_size"] == 64 and meta["model"]["position"] == "yarn"
    assert meta["model"]["position_options"]["scale"] == 4.0 and meta["model"]["position_options"]["original_max_position"] == 16
    assert set(meta["config"]["modules_to_save"]) >= {"wte", "ln_1", "ln_2", "ln_f"}
    recipe_saved = (tmp_path / "long" / "recipe.toml").read_text()
    assert "s2_group = 0" in recipe_saved  # longlora's default: a quarter of the context
    s = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert s["val_loss"] > 0 and s["base_val_loss"] > 0
    adapter = load_run(tmp_path / "long")
    assert adapter.config.block_size == 64 and adapter.config.attention == "sdpa"
    assert all(m.kernel_options == {} for m in adapter.model.modules() if hasattr(m, "kernel_options"))
    code, out, err = run(["lora", "merge", tmp_path / "long", "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    merged = load_run(tmp_path / "merged")
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged.model, ids), _logits(adapter.model, ids), rtol=1e-4, atol=1e-4)
    assert merged.config.block_size == 64 and merged.config.position == "yarn"
    # bench-context reads the LongLoRA run as it was tuned (the base's corpus, trained length 16)
    code, out, err = run(["bench-context", tmp_path / "long", "--lengths", "16,64", "--position", "yarn", "--scale", "4",
                          "--passkey", "2", "--json", tmp_path / "ctx.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ctx.json").read_text())
    assert report["trained_length"] == 16 and report["passkey_trials"] == 2
    cells = {r["length"]: r for r in report["rows"]}
    assert cells[16]["passkey"] is None and 0.0 <= cells[64]["passkey"] <= 1.0  # 16 tokens cannot hold a trial
    assert all(r["ppl"] > 0 for r in report["rows"])
    assert "passkey retrieval" in out


def test_longlora_needs_a_rope_base_and_plain_text(bpe_run, rope_run, small_corpus, run, capsys, tmp_path):
    recipe = tmp_path / "long.toml"
    recipe.write_text(LONGLORA.format(base=bpe_run.as_posix(), corpus=small_corpus.as_posix()).replace("length = 64", "length = 256"))
    code, out, err = run(["lora", recipe, "--out", tmp_path / "a", "--no-progress"], capsys)
    assert code == 2 and "needs a RoPE base" in err and "Traceback" not in err
    recipe.write_text(LONGLORA.format(base=rope_run.as_posix(), corpus=small_corpus.as_posix()).replace("length = 64", "length = 16"))
    code, out, err = run(["lora", recipe, "--out", tmp_path / "d", "--no-progress"], capsys)
    assert code == 2 and "must be longer than the base's context (16)" in err
    recipe.write_text(LONGLORA.format(base=rope_run.as_posix(), corpus=small_corpus.as_posix()).replace("length = 64", "length = 0"))
    code, out, err = run(["lora", recipe, "--out", tmp_path / "b", "--no-progress"], capsys)
    assert code == 2 and "needs context.length" in err
    recipe.write_text(LONGLORA.format(base=rope_run.as_posix(), corpus=small_corpus.as_posix()).replace("length = 64", "length = 64\ns2_group = 24"))
    code, out, err = run(["lora", recipe, "--out", tmp_path / "c", "--no-progress"], capsys)
    assert code == 2 and "must divide context.length" in err
