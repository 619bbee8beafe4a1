"""The CLI through its real entry point: pretrain, resume, generate, report, recipes, tokenizer."""

import json
import os
import subprocess
import sys






def test_pretrain_end_to_end_subprocess(tiny_recipe, tmp_path, run):
    out = tmp_path / "run"
    env = dict(os.environ, COLUMNS="120")
    p = subprocess.run(
        [sys.executable, "-m", "adl_cli", "pretrain", str(tiny_recipe), "--out", str(out), "--set", "train.steps=4", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    for name in ("recipe.toml", "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "summary.json", "report.md"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "elapsed_s", "train_s"} <= set(rows[0])
    last = [r for r in rows if "loss" in r][-1]
    assert 0 < last["train_s"] <= last["elapsed_s"]
    assert any("val_loss" in r for r in rows)
    assert "val bits per byte" in p.stdout and "loss curve" in p.stdout
    # the resolved recipe reproduces the run's settings
    resolved = (out / "recipe.toml").read_text()
    assert "steps = 4" in resolved


def test_resume_generate_report(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    code, _, err = run(["pretrain", tiny_recipe, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    code, _, err = run(["pretrain", out / "recipe.toml", "--resume", "--set", "train.steps=8", "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 8 and rows[: len(first) - 1] == first[: len(first) - 1]
    code, text, err = run(["generate", out, "--prompt", "The ", "--max-new-tokens", "20", "--seed", "1"], capsys)
    assert code == 0, err and text.startswith("The ")
    code2, text2, _ = run(["generate", out, "--prompt", "The ", "--max-new-tokens", "20", "--seed", "1"], capsys)
    assert text2 == text  # seeded sampling is reproducible
    one_line_error(*run(["generate", out, "--prompt", "x" * 100, "--max-new-tokens", "3"], capsys)[::2], "more than the model's context of 32")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The \nA longer prompt, padded less\nx\n")
    code, text, err = run(["generate", out, "--prompt-file", prompts, "-n", "8", "-t", "0", "--ignore-eos", "--json", "--batch", "3"], capsys)
    rows = json.loads(text)["completions"]
    assert code == 0 and [r["prompt"] for r in rows] == prompts.read_text().splitlines()
    for r in rows:  # the left-padded batch equals each prompt alone
        alone = json.loads(run(["generate", out, "--prompt", r["prompt"], "-n", "8", "-t", "0", "--ignore-eos", "--json"], capsys)[1])
        assert alone["completions"][0]["tokens"] == r["tokens"] and len(r["logprobs"]) == len(r["tokens"]) == 8
    code, text, _ = run(["report", out], capsys)
    assert code == 0 and "val loss" in text and "loss curve" in text
    greedy = ["generate", out, "--prompt", "The ", "--max-new-tokens", "12", "--temperature", "0"]
    code, plain, err = run(greedy, capsys)
    assert code == 0, err
    assert run(greedy + ["--stream"], capsys)[1] == plain  # streamed piece by piece: the same text
    stop = plain[len("The "):][2:4]
    code, text, err = run(greedy + ["--stop", stop], capsys)
    assert code == 0 and text == plain[: plain.index(stop, len("The ")) ] + "\n", (text, plain)
    for extra, kind in ((["--draft", out], "speculative: "), (["--lookup", "2", "--lookahead", "3"], "prompt lookup: ")):
        code, text, err = run(greedy + extra, capsys)
        assert code == 0 and text == plain and kind in err and "target passes" in err, err  # greedy: the same text
    one_line_error(*run(greedy + ["--draft", out, "--lookup", "2"], capsys)[::2], "give one")
    one_line_error(*run(greedy + ["--lookup", "0"], capsys)[::2], "--lookup must be >= 1")
    for scheme in ("int8", "int4"):
        code, text, err = run(greedy + ["--quant", scheme], capsys)
        assert code == 0 and text.startswith("The "), err
    one_line_error(*run(greedy + ["--quant", "int3"], capsys)[::2], "--quant must be one of int8, int4")
    other = tmp_path / "bpe-run"
    assert run(["pretrain", tiny_recipe, "--out", other, "--no-progress", "--set", "train.steps=2", "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"], capsys)[0] == 0
    one_line_error(*run(greedy + ["--draft", other], capsys)[::2], "another tokenizer")


def one_line_error(code, err, *pieces):
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for p in pieces:
        assert p in err, (p, err)


def test_bad_inputs_are_one_line_errors(tiny_recipe, tmp_path, capsys, run):
    bad = tmp_path / "bad.toml"
    one_line_error(*run(["pretrain", tmp_path / "missing.toml"], capsys)[::2], "recipe not found")
    bad.write_text("[train\nsteps = 3\n")
    one_line_error(*run(["pretrain", bad], capsys)[::2], "TOML syntax error", "line 1")
    one_line_error(*run(["pretrain", tiny_recipe, "--set", "train.stepz=3"], capsys)[::2], "did you mean 'train.steps'")
    one_line_error(*run(["pretrain", tiny_recipe, "--set", "train.lr=fast"], capsys)[::2], "train.lr", "must be a number")
    one_line_error(*run(["pretrain", tiny_recipe, "--set", f"data.corpus={tmp_path / 'nope.txt'}", "--out", tmp_path / "r"], capsys)[::2], "corpus not found")
    one_line_error(*run(["pretrain", tiny_recipe, "--out", tmp_path / "empty", "--resume"], capsys)[::2], "no checkpoint")


def test_resume_with_a_different_shape_and_corrupt_weights(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    assert run(["pretrain", tiny_recipe, "--out", out, "--no-progress", "--set", "train.steps=3"], capsys)[0] == 0
    one_line_error(*run(["pretrain", tiny_recipe, "--out", out, "--resume", "--set", "model.n_embd=64"], capsys)[::2], "model.n_embd 32 -> 64", "--force")
    # even with --force a checkpoint of another shape cannot be resumed
    one_line_error(*run(["pretrain", tiny_recipe, "--out", out, "--resume", "--force", "--set", "model.n_embd=64"], capsys)[::2], "n_embd=32", "64")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    one_line_error(*run(["generate", out, "--prompt", "a"], capsys)[::2], "truncated or not a safetensors")
    one_line_error(*run(["generate", tmp_path / "nowhere"], capsys)[::2], "run folder not found")
    one_line_error(*run(["generate", out, "--top-p", "2"], capsys)[::2], "--top-p")


def test_recipes_and_tokenizer_commands(tmp_path, capsys, run):
    code, text, _ = run(["recipes", "list"], capsys)
    assert code == 0 and "pretrain/tiny" in text
    code, text, _ = run(["recipes", "show", "tiny"], capsys)
    assert code == 0 and "[model]" in text
    assert run(["recipes", "cp", "tiny", tmp_path], capsys)[0] == 0
    assert (tmp_path / "tiny.toml").exists()
    one_line_error(*run(["recipes", "show", "tiyn"], capsys)[::2], "did you mean")
    ranks = tmp_path / "bpe.tiktoken"
    code, text, err = run(["tokenizer", "train", "pydoc", "--vocab-size", "600", "--out", ranks], capsys)
    assert code == 0, err and ranks.exists()
    code, text, _ = run(["tokenizer", "encode", "The with statement", "--tokenizer", ranks], capsys)
    assert code == 0 and "ids:" in text
    one_line_error(*run(["tokenizer", "train", "--corpus", tmp_path / "none.txt", "--out", tmp_path / "new.tiktoken"], capsys)[::2], "corpus not found")
    one_line_error(*run(["tokenizer", "train", "--corpus", "pydoc", "--vocab-size", "600", "--out", ranks], capsys)[::2], "exists", "--force")
    one_line_error(*run(["tokenizer", "encode", "x", "--tokenizer", "gpt3"], capsys)[::2], "unknown tokenizer")


def test_version_and_help(capsys, run):
    code, text, _ = run(["--version"], capsys)
    assert code == 0 and text.startswith("adl ")
    code, text, _ = run(["pretrain", "--help"], capsys)
    assert code == 0 and "--resume" in text and "--set" in text


def test_recipes_show_piped_is_the_file_itself(tmp_path):
    p = subprocess.run([sys.executable, "-m", "adl_cli", "recipes", "show", "tiny"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="60"), timeout=120)
    from adl_cli.cli.recipes import find_recipe

    assert p.returncode == 0 and p.stdout == find_recipe("tiny").read_text(encoding="utf-8")


def test_init_from_a_run(tiny_recipe, tmp_path, capsys, run):
    """`init.from`: a new run starts from another's weights and tokenizer and records where it came from."""
    base, child, bad = tmp_path / "base", tmp_path / "child", tmp_path / "bad"
    code, _, err = run(["pretrain", tiny_recipe, "--out", base, "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run(["pretrain", tiny_recipe, "--out", child, "--set", f"init.from={base}", "--set", "train.steps=2",
                        "--set", "train.lr=1e-9", "--set", "train.min_lr=0", "--no-progress"], capsys)
    assert code == 0, err
    lineage = json.loads((child / "lineage.json").read_text())["parents"]
    assert lineage[0]["kind"] == "init" and lineage[0]["path"] == str(base) and len(lineage[0]["sha256"]) == 64
    assert f"[init]\nfrom = \"{base}\"" in (child / "recipe.toml").read_text()
    first = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]["val_loss"]
    again = [json.loads(x) for x in (child / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]["val_loss"]
    assert abs(first - again) < 1e-3  # lr 1e-9: the child is the base model, evaluated on the same windows
    code, _, err = run(["pretrain", tiny_recipe, "--out", bad, "--set", f"init.from={base}", "--set", "model.n_embd=64", "--no-progress"], capsys)
    assert code == 2 and "n_embd 32 (run) vs 64 (recipe)" in err and not (bad / "model.safetensors").exists()
    code, _, err = run(["pretrain", tiny_recipe, "--out", bad, "--set", f"init.from={tmp_path / 'nope'}", "--no-progress"], capsys)
    assert code == 2 and "run folder not found" in err


def test_report_draws_the_loss_png_and_refuses_to_replace_a_named_file(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    code, _, err = run(["pretrain", tiny_recipe, "--out", out, "--set", "train.ema=0.9", "--no-progress"], capsys)
    assert code == 0, err
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written with the run
    assert (out / "model.ema.safetensors").exists() and "| ema_val_loss |" in (out / "report.md").read_text()
    png.unlink()
    code, out_text, err = run(["report", out], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "figure:" in out_text
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"keep me")
    code, _, err = run(["report", out, "--plot", mine], capsys)
    assert code == 2 and "exists" in err and mine.read_bytes() == b"keep me"
    code, _, err = run(["report", out, "--plot", tmp_path / "fig.svg"], capsys)
    assert code == 2 and "ending in .png" in err


def test_warm_ups_count_the_tokens_each_batch_holds(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    code, _, err = run(["pretrain", tiny_recipe, "--out", out, "--no-progress", "--set", "train.seq_len_warmup=4", "--set", "train.seq_len_start=16",
                        "--set", "data.align=document"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    # block 32, batch 4, 6 steps: windows of 16, 16, 16, 24 -> 16 (multiples of 16), then 32, 32
    assert summary["tokens"] == 4 * (16 + 16 + 16 + 16 + 32 + 32)
