"""Usage errors through the real `adl` entry point (a subprocess), whichever click typer carries:
one line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys

import pytest


def adl(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "adl_cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="60", **(env or {})), timeout=120, **kw)


@pytest.mark.parametrize(
    "args, piece",
    [
        (["pretrain"], "Missing argument"),  # a missing argument
        (["generate", "runs/tiny", "--promt", "hi"], "No such option: --promt"),  # an unknown option
        (["generate", "runs/tiny", "-n", "abc"], "'--max-new-tokens'"),  # a bad type
        (["tokenizer", "train", "--vocab-size", "abc", "--out", "x"], "'--vocab-size'"),
        (["fly"], "No such command 'fly'"),  # an unknown command
    ],
)
def test_usage_errors_are_one_line(args, piece):
    p = adl(*args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert piece in p.stderr and "--help" in p.stderr


def test_no_arguments_prints_the_help():
    p = adl()
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr
    assert "pretrain" in p.stdout + p.stderr


def test_a_recipe_error_prints_once_under_a_launcher(tmp_path):
    """Under torchrun every rank fails alike; only rank 0 (RANK=0) prints the line."""
    missing = tmp_path / "missing.toml"
    rank0 = adl("pretrain", missing, env={"RANK": "0", "WORLD_SIZE": "2"})
    rank1 = adl("pretrain", missing, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert rank0.returncode == rank1.returncode == 2
    assert "recipe not found" in rank0.stderr and rank1.stderr == ""
