"""adl eval and adl chat through the real entry point, on a tiny trained run."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time

import pytest
import torch

from adl_cli.cli import main
from adl_cli.inference.chat import ChatSession
from adl_cli.inference.engine import generate_batch
from adl_cli.inference.sampling import SamplingParams
from adl_cli.runs import load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, write_tiny_recipe):
    root = tmp_path_factory.mktemp("inference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
        try:
            main(["pretrain", str(write_tiny_recipe(root)), "--out", str(root / "run"), "--no-progress", "--set", "train.eval_batches=1000"])
        except SystemExit as e:
            assert not e.code
    return root / "run"


def test_eval_reproduces_the_runs_own_held_out_figure_and_scores_any_text(trained, run, capsys, small_corpus):
    summary = json.loads((trained / "summary.json").read_text())
    precision = "bf16" if summary["precision"] == "bf16" else "fp32"
    code, out, err = run(["eval", trained, "--json", "--precision", precision], capsys)
    got = json.loads(out)
    assert code == 0, err
    assert got["tokens"] == summary["val_tokens"] - 1 and got["loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert got["bits_per_byte"] == pytest.approx(summary["val_bits_per_byte"], rel=1e-3)
    code, out, err = run(["eval", trained, "--data", small_corpus, "--max-tokens", "500", "--batch-size", "3"], capsys)
    assert code == 0 and "bits per byte" in out and "499" in out, err


def test_chat_keeps_the_conversation_and_answers_from_it(trained):
    r = load_run(trained)
    session = ChatSession(r.model, r.tokenizer, SamplingParams(temperature=0), max_new_tokens=4)
    first = session.ask("The ")
    second = session.ask("A b")
    u1, u2 = list(r.tokenizer.encode("The ")), list(r.tokenizer.encode("\nA b"))
    expected = generate_batch(r.model, [u1 + first.tokens + u2], 4, eos_id=r.tokenizer.eot_id)[0]
    assert second.tokens == [t for t in expected.tokens if t != r.tokenizer.eot_id]
    session.reset()
    assert session.ask("A b").tokens == generate_batch(r.model, [list(r.tokenizer.encode("A b"))], 4, eos_id=r.tokenizer.eot_id)[0].tokens[:4]


def test_ctrl_c_stops_an_answer_and_keeps_what_was_said(trained):
    r = load_run(trained)
    session = ChatSession(r.model, r.tokenizer, SamplingParams(temperature=0), max_new_tokens=30)
    shown = []

    def show(piece):
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt  # as Ctrl-C arrives while the answer is written

    answer = session.ask("The ", show)
    assert answer.interrupted and answer.text == "".join(shown) and 3 <= len(answer.tokens) < 30
    assert session.turns[-1][1] == answer.tokens and session.ask("x").tokens  # the conversation goes on


def test_chat_from_a_script_and_from_a_terminal(trained, run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("The \n/reset\n/nope\n\nA b\n/exit\nnot read\n"))
    code, out, err = run(["chat", trained, "-n", "3", "-t", "0"], capsys)
    assert code == 0, err
    assert out.count("adl> ") == 2 and "you> The " in out and "you> A b" in out and "not read" not in out
    assert "no chat template" in err and "forgotten" in err and "unknown command /nope" in err

    pid, fd = pty.fork()  # a terminal: Ctrl-C at the prompt does not end the program, /exit does
    if pid == 0:
        # a test run started in the background (`make test &`) ignores SIGINT, and an ignored signal
        # stays ignored across exec: give the child a terminal's default, as a person's shell does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "adl_cli", "chat", str(trained), "-n", "3"])
    seen = b""

    def until(piece: bytes, count: int) -> None:
        nonlocal seen
        deadline = time.time() + 120
        while seen.count(piece) < count and time.time() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert seen.count(piece) >= count, seen

    until(b"you>", 1)
    # Ctrl-C at the prompt; pressed again if it landed before the line editor waits for keys
    # (then it is only seen at the next key).
    for _ in range(20):
        os.kill(pid, signal.SIGINT)
        deadline = time.time() + 3
        while seen.count(b"you>") < 2 and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096)
        if seen.count(b"you>") >= 2:
            break
    until(b"you>", 2)
    # A Ctrl-C of the loop above that was still pending (sent before the editor waited for keys)
    # is seen at the next key and clears that line: the prompt comes back without an answer. Ask
    # again then; a chat that never answers still fails after three questions.
    for _ in range(3):
        prompts = seen.count(b"you>")
        os.write(fd, b"The \r")
        until(b"you>", prompts + 1)
        if b"adl>" in seen:
            break
    assert b"adl>" in seen, seen
    os.write(fd, b"/exit\r")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen


def test_bench_inference_compares_adl_with_transformers_on_the_same_weights(trained, run, capsys, tmp_path):
    pytest.importorskip("transformers")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = run(["bench-inference", trained, "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "6", "--rounds", "1",
                          "--only", "no-cache,cache,int8,lookup,transformers", "--json", out_json, "--plot", out_png], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    rows = {(r["contender"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("no-cache", 1), ("cache", 1), ("int8", 1), ("lookup", 1), ("transformers", 1), ("cache", 2), ("int8", 2),
                         ("transformers", 2)}
    # the tiny run is GPT-2-shaped: the peer decodes the run's own weights, greedy token for token as adl does
    assert report["peer_weights"].startswith("the run's own weights")
    for key in (("transformers", 1), ("transformers", 2), ("no-cache", 1), ("lookup", 1)):
        assert rows[key]["same_tokens"] == 1.0, key
    assert rows[("transformers", 1)]["vs_peer"] == 1.0 and all(r["decode_tok_s"] > 0 for r in rows.values())
    assert 0 < rows[("cache", 1)]["bound_share"] and rows[("int8", 1)]["memory_mb"] < rows[("cache", 1)]["memory_mb"]
    assert "×peer" in out and out_png.stat().st_size > 0
    code, _, err = run(["bench-inference", trained, "--json", out_json], capsys)
    assert code == 2 and "exists" in err  # nothing already written is replaced without --force
    code, _, err = run(["bench-inference", trained, "--only", "cahce"], capsys)
    assert code == 2 and "did you mean 'cache'" in err
