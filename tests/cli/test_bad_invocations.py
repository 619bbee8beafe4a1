"""A list of bad invocations across every command: each ends in one clear line on stderr, a non-zero
exit, no traceback, and every file that existed before is byte-for-byte intact.

Categories: missing files, garbage files, truncated files, existing outputs, wrong types,
out-of-range numbers, usage errors, unwritable outputs (a parent that is a regular file), a full
disk (RLIMIT_FSIZE, which root cannot bypass), SIGINT and SIGTERM mid-run."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adl_cli.cli import main

TINY = ["--set", "data.extra_train=[]", "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set", "model.block_size=32",
        "--set", "model.vocab_multiple=8", "--set", "data.tokenizer=bytes", "--set", "train.steps=2", "--set", "train.eval_batches=1",
        "--set", "sample_tokens=2", "--set", "model.tie_embeddings=true", "--set", "model.unet_skips=false", "--no-progress"]  # exportable to GPT-2


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_corpus):
    """A folder with a finished run, an export, shards, a tokenizer, a garbage and a truncated file."""
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        for args in (
            ["pretrain", "recipes/pretrain/tiny.toml", "--out", root / "run", "--set", f"data.corpus={small_corpus}", *TINY],
            ["export", "hf", root / "run", "--out", root / "hf"],
            ["data", "shard", small_corpus, "--tokenizer", "bytes", "--out", root / "shards", "--shard-tokens", "20000"],
            ["tokenizer", "train", "--corpus", small_corpus, "--vocab-size", "300", "--out", root / "bpe.tiktoken"],
        ):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                assert not e.code, args
    (root / "garbage.toml").write_text("[model\nn_layer = = 3\n")
    (root / "garbage.bin").write_bytes(os.urandom(3000))
    (root / "blocker").write_text("a regular file, not a folder\n")
    trunc = root / "truncated"
    shutil.copytree(root / "run", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 3])
    (trunc / "config.json").write_text('{"n_layer": 1, "n_head"')
    (trunc / "summary.json").write_text('{"name": "t", "steps"')
    ranks = (root / "bpe.tiktoken").read_bytes()
    (root / "truncated.tiktoken").write_bytes(ranks[: len(ranks) // 2 - 3])
    (root / "text.txt").write_text(small_corpus.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


W = "{W}"  # stands for the world folder in the table below

CASES = [
    # --- missing files
    ("missing", ["pretrain", "{W}/nope.toml"], "recipe not found"),
    ("missing", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "data.corpus={W}/nope.txt", "--out", "{W}/new"], "corpus not found"),
    ("missing", ["generate", "{W}/nope"], "run folder not found"),
    ("missing", ["eval", "{W}/nope"], "run folder not found"),
    ("missing", ["eval", "{W}/run", "--data", "{W}/nope.txt"], "corpus not found"),
    ("missing", ["generate", "{W}/run", "--prompt-file", "{W}/nope.txt"], "does not exist"),
    ("missing", ["report", "{W}/nope"], "not"),
    ("missing", ["tokenizer", "encode", "x", "--tokenizer", "{W}/nope.tiktoken"], "not found"),
    ("missing", ["data", "shard", "{W}/nope.txt", "--tokenizer", "bytes", "--out", "{W}/s2"], "corpus not found"),
    ("missing", ["import", "hf-gpt2", "{W}/nope", "--out", "{W}/imp"], "not found"),
    ("missing", ["export", "hf", "{W}/nope", "--out", "{W}/exp"], "not found"),
    ("missing", ["bench-context", "{W}/nope", "--lengths", "32"], "not found"),
    ("missing", ["recipes", "show", "nope"], "no recipe named"),
    ("missing", ["pretrain", "recipes/pretrain/tiny.toml", "--out", "{W}/new", "--set", "init.from={W}/nope"], "run folder not found"),
    ("missing", ["pretrain", "recipes/pretrain/tiny.toml", "--out", "{W}/run", "--resume-from", "{W}/run/checkpoints/step-99"], "not a checkpoint folder"),
    # --- garbage files
    ("garbage", ["pretrain", "{W}/garbage.toml"], "TOML syntax error"),
    ("garbage", ["tokenizer", "encode", "x", "--tokenizer", "{W}/garbage.bin"], "garbage.bin"),
    ("garbage", ["pretrain", "recipes/pretrain/tiny.toml", "--out", "{W}/new", "--set", "data.corpus=shards:{W}/garbage.bin", "--set", "data.extra_train=[]"], "magic number"),
    ("garbage", ["report", "{W}/blocker"], "blocker"),
    ("garbage", ["generate", "{W}/blocker"], "blocker"),
    ("garbage", ["generate", "{W}/run", "--prompt-file", "{W}/garbage.bin"], "not a UTF-8 text file"),
    # --- truncated files
    ("truncated", ["generate", "{W}/truncated"], "config.json"),
    ("truncated", ["export", "hf", "{W}/truncated", "--out", "{W}/exp"], "config.json"),
    ("truncated", ["import", "hf-gpt2", "{W}/truncated", "--out", "{W}/imp"], "config.json"),
    ("truncated", ["report", "{W}/truncated"], "summary.json"),
    ("truncated", ["bench-context", "{W}/truncated", "--lengths", "32"], "config.json"),
    ("truncated", ["tokenizer", "encode", "x", "--tokenizer", "{W}/truncated.tiktoken"], "truncated.tiktoken"),
    ("truncated", ["pretrain", "recipes/pretrain/tiny.toml", "--out", "{W}/new", "--set", "data.tokenizer={W}/truncated.tiktoken", "--set", "data.extra_train=[]"], "truncated.tiktoken"),
    # --- existing outputs
    ("existing", ["pretrain", "{W}/run/recipe.toml"], "already holds a run"),
    ("existing", ["export", "hf", "{W}/run", "--out", "{W}/hf"], "not empty"),
    ("existing", ["import", "hf-gpt2", "{W}/hf", "--out", "{W}/run"], "not empty"),
    ("existing", ["tokenizer", "train", "--corpus", "{W}/text.txt", "--vocab-size", "300", "--out", "{W}/bpe.tiktoken"], "exists"),
    ("existing", ["data", "shard", "{W}/text.txt", "--tokenizer", "bytes", "--out", "{W}/shards"], "already holds shards"),
    ("existing", ["recipes", "cp", "tiny", "{W}/bpe.tiktoken"], "exists"),
    ("existing", ["report", "{W}/run", "--plot", "{W}/text.txt"], "ending in .png"),
    ("existing", ["bench-attention", "--lengths", "32", "--json", "{W}/text.txt"], "exists"),
    ("existing", ["pretrain", "{W}/run/recipe.toml", "--resume", "--set", "train.lr=1"], "differs from the run's own"),
    # --- wrong types
    ("type", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "train.steps=many"], "must be an integer"),
    ("type", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "model.dropout=yes"], "must be a number"),
    ("type", ["generate", "{W}/run", "-n", "abc"], "'--max-new-tokens'"),
    ("type", ["tokenizer", "train", "--vocab-size", "lots", "--out", "{W}/x.tiktoken"], "'--vocab-size'"),
    ("type", ["bench-attention", "--heads", "two"], "'--heads'"),
    ("type", ["data", "shard", "pydoc", "--shard-tokens", "1e9x", "--out", "{W}/s3"], "'--shard-tokens'"),
    # --- out-of-range numbers
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "train.steps=0"], "train.steps must be >= 1"),
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "train.ema=1.5"], "train.ema must be in [0, 1)"),
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "train.optimizer=adamm"], "did you mean 'adamw'"),
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "train.log_with=tensorbord"], "did you mean 'tensorboard'"),
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "model.family=vitt"], "unknown model family 'vitt'"),
    ("range", ["pretrain", "recipes/pretrain/tiny.toml", "--set", "model.dropout=1.5"], "model.dropout"),
    ("range", ["generate", "{W}/run", "--top-p", "2"], "--top-p"),
    ("range", ["generate", "{W}/run", "--temperature", "-1"], "--temperature"),
    ("range", ["generate", "{W}/run", "--min-p", "1.5"], "--min-p must be in [0, 1]"),
    ("range", ["generate", "{W}/run", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    ("range", ["generate", "{W}/run", "--prompt", ""], "--prompt is empty"),
    ("range", ["generate", "{W}/run", "--prompt", "x" * 40], "more than the model's context of 32"),
    ("range", ["generate", "{W}/run", "--batch", "0"], "--batch must be >= 1"),
    ("range", ["generate", "{W}/run", "--stop", ""], "--stop strings must not be empty"),
    ("range", ["eval", "{W}/run", "--split", "test"], "--split must be one of val, train"),
    ("range", ["eval", "{W}/run", "--max-tokens", "1"], "--max-tokens must be >= 2"),
    ("range", ["eval", "{W}/run", "--precision", "fp8"], "--precision must be fp32 or bf16"),
    ("range", ["eval", "{W}/run", "--quant", "int2"], "--quant must be one of"),
    ("range", ["eval", "{W}/hf"], "a transformers folder, not an adl run"),
    ("range", ["bench-inference", "{W}/run", "--batch", "0"], "--batch takes batch sizes >= 1"),
    ("range", ["bench-inference", "{W}/run", "--batch", "a,b"], "--batch takes whole numbers"),
    ("range", ["bench-inference", "{W}/run", "--prompt-len", "32"], "--prompt-len (32) must be shorter than the run's context (32)"),
    ("range", ["bench-inference", "{W}/run", "--only", "fast"], "unknown contender 'fast'"),
    ("range", ["bench-inference", "{W}/run", "--device", "tpu"], "--device must be cpu or cuda"),
    ("missing", ["bench-inference", "{W}/nope"], "run folder not found"),
    ("range", ["tokenizer", "train", "--vocab-size", "10", "--out", "{W}/y.tiktoken"], "--vocab-size"),
    ("range", ["data", "shard", "pydoc", "--shard-tokens", "0", "--out", "{W}/s4"], "--shard-tokens"),
    ("range", ["bench-attention", "--lengths", "-5"], "length"),
    ("range", ["bench-context", "{W}/run", "--lengths", "0"], ""),
    # --- usage errors
    ("usage", ["pretrain"], "Missing argument"),
    ("usage", ["generate", "{W}/run", "--promt", "hi"], "No such option"),
    ("usage", ["tokenizer", "train"], "Missing option"),
    ("usage", ["frobnicate"], "No such command"),
    ("usage", ["export", "hf"], "Missing argument"),
    ("usage", ["recipes", "cp", "tiny"], "Missing argument"),
    # --- unwritable outputs: the parent is a regular file
    ("unwritable", ["pretrain", "recipes/pretrain/tiny.toml", "--out", "{W}/blocker/run", "--set", "data.corpus={W}/text.txt", *TINY], "blocker"),
    ("unwritable", ["tokenizer", "train", "--corpus", "{W}/text.txt", "--vocab-size", "300", "--out", "{W}/blocker/t.tiktoken"], "blocker"),
    ("unwritable", ["data", "shard", "{W}/text.txt", "--tokenizer", "bytes", "--out", "{W}/blocker/s"], "blocker"),
    ("unwritable", ["export", "hf", "{W}/run", "--out", "{W}/blocker/hf"], "blocker"),
    ("unwritable", ["import", "hf-gpt2", "{W}/hf", "--out", "{W}/blocker/imp"], "blocker"),
    ("unwritable", ["recipes", "cp", "tiny", "{W}/blocker/x.toml"], "blocker"),
]


@pytest.mark.parametrize("category, args, piece", CASES, ids=[f"{c}-{a[0]}-{i}" for i, (c, a, _) in enumerate(CASES)])
def test_bad_invocation(world, category, args, piece, capsys, monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
    before = snapshot(world)
    code, out, err = run_main([a.replace(W, str(world)) for a in args], capsys)
    assert code != 0, (args, out, err)
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:"), err
    assert piece in err, (piece, err)
    assert snapshot(world) == before  # every earlier file intact, nothing added


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def adl_subprocess(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "adl_cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, COLUMNS="80"), **kw)


@pytest.mark.parametrize("what", ["pretrain", "tokenizer", "export"])
def test_a_full_disk_is_one_line_and_keeps_earlier_files(world, tmp_path, what):
    """RLIMIT_FSIZE stands for a full disk: writes past the limit fail, even for root."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    before = snapshot(run)
    args = {
        "pretrain": ["pretrain", run / "recipe.toml", "--resume", "--set", "train.steps=4", "--no-progress"],
        "tokenizer": ["tokenizer", "train", "--corpus", world / "text.txt", "--vocab-size", "300", "--out", tmp_path / "t.tiktoken"],
        "export": ["export", "hf", run, "--out", tmp_path / "hf"],
    }[what]
    limit = {"pretrain": 40_000, "tokenizer": 1_000, "export": 40_000}[what]  # each below the size of what it writes
    p = adl_subprocess(args, preexec_fn=_limit_file_size(limit))
    out, err = p.communicate(timeout=300)
    assert p.returncode not in (0, None) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "cannot write" in err and "File too large" in err, err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before or what == "pretrain" and _latest_intact(run, before)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".tmp-*"))  # no torn temporary files left


def _latest_intact(run: Path, before: dict) -> bool:
    """A resumed run that could not write: its earlier checkpoints are byte-identical."""
    return all(before[k] == v for k, v in snapshot(run).items() if k in before and k.startswith("checkpoints/step-"))


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_mid_run_checkpoints_and_exits(world, tmp_path, sig, code, name):
    args = ["pretrain", "recipes/pretrain/tiny.toml", "--out", tmp_path / "run", "--set", f"data.corpus={world / 'text.txt'}",
            *TINY[:-1], "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0"]
    p = adl_subprocess(args)
    for line in p.stdout:  # piped: one plain line per logging step
        if line.startswith("step 3/"):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"stopped by {name} after step" in err and "--resume" in err
    from adl_cli.engine.checkpoint import latest_checkpoint

    ck = latest_checkpoint(tmp_path / "run")
    assert ck is not None and int(ck.name.split("-")[1]) >= 3
