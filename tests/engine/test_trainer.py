"""The one training loop: exact resume, atomic checkpoints, NaN and Ctrl-C handling."""

import json
import os
import shutil
import signal

import pytest
import torch

from adl_cli.engine import checkpoint as ckpt
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError, Interrupted
from adl_cli.models.gpt import GPT, GPTConfig

VOCAB, BLOCK = 61, 16


def batch_fn(step, micro, rank, world):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_fn(model, batch):
    return model(*batch)[1]


def make(run_dir, steps=8, batch=batch_fn, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    kw = {"checkpoint_every": 4, "log_every": 1, **kw}
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=0, seed=3, **kw)
    return Trainer(model, cfg, run_dir=run_dir, batch_fn=batch, loss_fn=loss_fn, units_per_batch=4 * BLOCK, progress=False)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    full = tmp_path / "full"
    make(full).fit()
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)  # a run that died right after its step-4 checkpoint
    shutil.copytree(full / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
    (part / "checkpoints" / "latest").write_text("step-4\n")
    (part / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text())  # rows past 4 get dropped
    resumed = make(part, steps=8).fit(resume=True)
    assert resumed.steps == 8
    assert losses(part) == losses(full)  # bit-exact, dropout included (RNG restored)
    a = ckpt.read_safetensors(full / "checkpoints" / "step-8" / "model.safetensors")
    b = ckpt.read_safetensors(part / "checkpoints" / "step-8" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_matches_a_bigger_batch(tmp_path):
    def big(step, micro, rank, world):
        xs = [batch_fn(step, m, 0, 1) for m in range(2)]
        return torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs])

    def without_dropout(tr):
        for m in tr.raw_model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return tr

    one = without_dropout(make(tmp_path / "b", steps=3, batch=big, precision="fp32"))  # fp32: exact math
    one.units_per_batch *= 2
    one.fit()
    without_dropout(make(tmp_path / "c", steps=3, grad_accum=2, precision="fp32")).fit()
    for x, y in zip(losses(tmp_path / "b"), losses(tmp_path / "c"), strict=True):
        assert abs(x - y) < 1e-5


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(AdlError, match="no checkpoint"):
        make(tmp_path / "none").fit(resume=True)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = make(run, steps=4)
    tr.fit()
    good = ckpt.latest_checkpoint(run)
    assert good.name == "step-4"
    real = ckpt.save_file

    def crash(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # leave a truncated file behind, then die
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 5, tr.raw_model, tr.optimizer, {})
    assert ckpt.latest_checkpoint(run) == good
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    monkeypatch.setattr(ckpt, "save_file", real)
    state, _ = ckpt.load_checkpoint(good, make(tmp_path / "x").raw_model, None)
    assert state["step"] == 4


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    tr_step = [0]

    def poisoned(step, micro, rank, world):
        tr_step[0] = step
        return batch_fn(step, micro, rank, world)

    tr = make(tmp_path / "nan", steps=8, batch=poisoned)
    real_loss = tr.loss_fn
    tr.loss_fn = lambda m, b: real_loss(m, b) * (float("nan") if tr_step[0] >= 5 else 1.0)
    with pytest.raises(AdlError, match=r"loss became nan at step 6.*step-4"):
        tr.fit()
    assert ckpt.latest_checkpoint(tmp_path / "nan").name == "step-4"


def test_ctrl_c_writes_a_checkpoint_and_stops(tmp_path):
    def interrupting(step, micro, rank, world):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return batch_fn(step, micro, rank, world)

    with pytest.raises(Interrupted, match="after step 3"):
        make(tmp_path / "int", steps=8, batch=interrupting).fit()
    assert ckpt.latest_checkpoint(tmp_path / "int").name == "step-3"
    done = make(tmp_path / "int", steps=8).fit(resume=True)
    assert done.steps == 8


@pytest.mark.parametrize("log_every, checkpoint_every", [(1, 2), (4, 3), (5, 2)])
def test_a_non_finite_loss_is_never_checkpointed(tmp_path, log_every, checkpoint_every):
    """The loss turns NaN after step 5 (weights poisoned too); checkpoints that are not
    logging steps must not save it, and `keep` must not delete the last good one."""
    def poisoning(step, micro, rank, world):
        if step == 5 and micro == 0:
            with torch.no_grad():
                tr.raw_model.lm_head.weight.fill_(float("nan"))
        return batch_fn(step, micro, rank, world)

    tr = make(tmp_path / "nan", steps=12, batch=poisoning, log_every=log_every, checkpoint_every=checkpoint_every, keep_checkpoints=1)
    with pytest.raises(AdlError, match="non-finite|loss became nan"):
        tr.fit()
    good = 5 // checkpoint_every * checkpoint_every
    latest = ckpt.latest_checkpoint(tmp_path / "nan")
    assert latest.name == f"step-{good}"
    tensors = ckpt.read_safetensors(latest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_the_lr_peaks_for_one_step_and_ends_at_min_lr():
    from adl_cli.engine.optim import lr_at

    for warmup, steps in ((3, 10), (0, 7), (1, 2)):
        lrs = [lr_at(t, lr=1.0, min_lr=0.1, warmup=warmup, steps=steps) for t in range(steps)]
        assert lrs.count(1.0) == 1 and lrs[max(warmup - 1, 0)] == 1.0
        assert lrs[-1] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(lrs[max(warmup - 1, 0):], lrs[max(warmup - 1, 0) + 1:]))  # then strictly down


def test_sigterm_checkpoints_and_exits_like_ctrl_c(tmp_path):
    def terminating(step, micro, rank, world):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_fn(step, micro, rank, world)

    with pytest.raises(Interrupted, match="SIGTERM after step 3") as e:
        make(tmp_path / "term", steps=8, batch=terminating).fit()
    assert e.value.exit_code == 143
    assert ckpt.latest_checkpoint(tmp_path / "term").name == "step-3"


def test_resume_under_another_world_size_keeps_the_global_batch():
    from adl_cli.errors import AdlError as E
    from adl_cli.methods.pretrain import PretrainRecipe, resume_grad_accum

    rec = PretrainRecipe()
    rec.train.batch_size, rec.model.block_size = 4, 16
    state = {"step": 10, "units": 10 * 4 * 16 * 2 * 1, "world_size": 1, "grad_accum": 2}  # 1 process x 2 accumulation
    notes = []
    assert resume_grad_accum(state, rec, world=2, accum=2, force=False, log=notes.append) == 1 and "keeps the global batch" in notes[0]
    with pytest.raises(E, match="global batch"):
        resume_grad_accum(state, rec, world=4, accum=1, force=False, log=notes.append)  # 128 tokens cannot split over 4 x 64
