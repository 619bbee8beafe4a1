"""The trainer's contract for every method: metrics from the loss, masked-token normalisation,
parameter groups, optimizer and schedule registries, EMA, activation checkpointing, stateful
batch sources, two families through one loop."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from adl_cli.data.batches import EpochBatches
from adl_cli.engine import checkpoint as ckpt
from adl_cli.engine.optim import SCHEDULES, lr_at
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.models.gpt import GPT, GPTConfig

from test_trainer import BLOCK, VOCAB, batch_fn
from test_trainer import loss_fn as lm_loss


def gpt(dropout=0.1):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def cfg(steps=6, **kw):
    base = dict(steps=steps, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=0, checkpoint_every=0, log_every=1, seed=3, precision="fp32")
    return TrainConfig(**{**base, **kw})


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_from_the_loss_reach_metrics_jsonl_and_the_bar(tmp_path, capsys):
    def loss_with_metrics(model, batch):
        loss = model(*batch)[1]
        return loss, {"perplexity": loss.detach().exp(), "constant": 2.5}

    t = Trainer(gpt(), cfg(steps=3), run_dir=tmp_path, batch_fn=batch_fn, loss_fn=loss_with_metrics, units_per_batch=4 * BLOCK, progress=True)
    result = t.fit()
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert all(r["constant"] == pytest.approx(2.5) for r in logged)
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-5) for r in logged)  # one step per log: exp of the mean
    assert result.train_metrics["constant"] == pytest.approx(2.5)
    out = capsys.readouterr().out  # piped: one plain line per logging step carries the metrics
    assert "perplexity" in out and "constant 2.5" in out


def test_a_masked_loss_is_normalised_by_the_global_count_of_trained_tokens(tmp_path):
    """Two micro-batches with 3 and 40 trained tokens: the step's gradient is that of the sum of
    token losses over all 43 divided by 43 (not the mean of the two micro-batch means)."""
    def masked(step, micro, rank, world):
        x, y = batch_fn(0, micro, 0, 1)
        y = y.clone()
        keep = 3 if micro == 0 else 40
        y.view(-1)[keep:] = -100
        return x, y

    def units(batch):
        return int((batch[1] != -100).sum())

    t = Trainer(gpt(dropout=0.0), cfg(steps=1, grad_accum=2, grad_clip=0.0, lr=1.0, min_lr=1.0, warmup=0, optimizer="sgd", momentum=0.0, weight_decay=0.0),
                run_dir=tmp_path, batch_fn=masked, loss_fn=lm_loss, units_fn=units, units_per_batch=4 * BLOCK, progress=False)
    ref = gpt(dropout=0.0)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    total = torch.zeros(())
    for micro in range(2):
        x, y = masked(0, micro, 0, 1)
        logits = ref(x)[0]
        total = total + nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    (total / 43).backward()
    result = t.fit()
    assert result.units == 43
    for n, p in t.raw_model.named_parameters():  # SGD with lr 1: after - before = -grad
        assert torch.allclose(before[n] - p.detach(), dict(ref.named_parameters())[n].grad, atol=2e-6, rtol=1e-4), n


def test_parameter_groups_get_their_own_lr_and_decay(tmp_path):
    model = gpt()
    head = [model.transformer.h[0].attn.q_proj.weight]
    rest = [p for p in model.parameters() if all(p is not h for h in head)]

    def groups(m):
        return [{"params": head, "weight_decay": 0.0, "lr_scale": 10.0}, {"params": rest, "weight_decay": 0.1}]

    t = Trainer(model, cfg(steps=2, schedule="constant", warmup=0), run_dir=tmp_path, batch_fn=batch_fn, loss_fn=lm_loss,
                units_per_batch=4 * BLOCK, param_groups=groups, progress=False)
    t.fit()
    lrs = [g["lr"] for g in t.optimizer.param_groups]
    assert lrs == pytest.approx([3e-2, 3e-3]) and [g["weight_decay"] for g in t.optimizer.param_groups] == [0.0, 0.1]


def test_schedules_warm_up_then_follow_their_shape():
    steps, warmup, lr, floor = 20, 4, 1.0, 0.1
    for name in SCHEDULES.names():
        f = [lr_at(t, lr=lr, min_lr=floor, warmup=warmup, steps=steps, schedule=name, decay_fraction=0.25) for t in range(steps)]
        assert f[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0]), name
        assert all(a >= b - 1e-12 for a, b in zip(f[warmup - 1:], f[warmup:])), name  # never rises after the peak
        assert f[-1] == pytest.approx(1.0 if name == "constant" else floor), name
    wsd = [lr_at(t, lr=1.0, min_lr=0.0, warmup=4, steps=20, schedule="wsd", decay_fraction=0.25) for t in range(20)]
    assert wsd[4:15] == [1.0] * 11 and wsd[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    lin = [lr_at(t, lr=1.0, min_lr=0.0, warmup=1, steps=5, schedule="linear") for t in range(5)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_newton_schulz_gives_the_orthogonal_factor_of_the_svd():
    from adl_cli.engine.muon import CUBIC, newton_schulz

    torch.manual_seed(0)
    for shape in ((16, 24), (24, 16)):
        g = torch.randn(*shape, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        # the cubic iteration converges to U V^T (singular values -> 1, vectors kept)
        x = newton_schulz(g, steps=60, coefficients=CUBIC)
        assert torch.allclose(x, u @ vh, atol=1e-8), shape
        # Muon's quintic, 5 steps: singular values near 1 in Muon's band, same singular vectors
        q = newton_schulz(g.float(), steps=5).double()
        sv = torch.linalg.svdvals(q)
        assert sv.min() > 0.55 and sv.max() < 1.25
        assert torch.allclose(u.T @ q @ vh.T, torch.diag(torch.diagonal(u.T @ q @ vh.T)), atol=2e-3)


def test_muon_updates_hidden_matrices_and_adamw_the_rest(tmp_path):
    model = gpt(dropout=0.0)
    t = Trainer(model, cfg(steps=1, optimizer="muon", warmup=0, schedule="constant", grad_clip=0.0), run_dir=tmp_path,
                batch_fn=batch_fn, loss_fn=lm_loss, units_per_batch=4 * BLOCK, progress=False)
    kinds = {id(p): g["use_muon"] for g in t.optimizer.param_groups for p in g["params"]}
    assert kinds[id(model.transformer.h[0].attn.q_proj.weight)] and kinds[id(model.transformer.h[1].mlp.c_fc.weight)]
    assert not kinds[id(model.transformer.wte.weight)] and not kinds[id(model.transformer.h[0].ln_1.weight)]
    w = model.transformer.h[0].mlp.c_fc.weight
    before = w.detach().clone()
    t.fit()
    step = (before - w.detach()) / (0.02 * math.sqrt(4))  # c_fc is 128 x 32: scaled by sqrt(rows / cols)
    sv = torch.linalg.svdvals(step.double() - 0.02 * 0.1 * before.double() / (0.02 * 2))  # remove the decoupled decay
    assert 0.5 < sv.median() and sv.max() < 1.3  # an (almost) orthogonal update: the gradient's directions, each near unit size


def test_ema_is_evaluated_saved_and_resumed_exactly(tmp_path):
    def eval_fn(m):
        x, y = batch_fn(999, 0, 0, 1)
        return {"val_loss": float(m(x, y)[1])}

    def make(run, steps):
        return Trainer(gpt(), cfg(steps=steps, ema=0.9, checkpoint_every=3, eval_every=3), run_dir=run, batch_fn=batch_fn, loss_fn=lm_loss,
                       eval_fn=eval_fn, units_per_batch=4 * BLOCK, progress=False)

    full = make(tmp_path / "full", 6)
    full.fit()
    logged = [r for r in rows(tmp_path / "full") if "ema_val_loss" in r]
    assert len(logged) == 2 and all(r["ema_val_loss"] != r["val_loss"] for r in logged)
    # the average follows its formula: replay the raw weights after every step
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    resumed = make(part, 6)
    resumed.fit(resume=True)
    a = full.ema_model_state()
    b = resumed.ema_model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(part) if "loss" in r] == [r["loss"] for r in rows(tmp_path / "full") if "loss" in r][3:]


def test_ema_follows_its_formula():
    from adl_cli.engine.ema import EMA

    p = nn.Parameter(torch.zeros(3))
    m = nn.Module()
    m.p = p
    ema = EMA(m, 0.99)
    ref = torch.zeros(3)
    for t in range(5):
        with torch.no_grad():
            p += 1.0
        d = min(0.99, (1 + t) / (10 + t))
        ref = d * ref + (1 - d) * p.detach()
        ema.update()
    assert torch.allclose(ema.shadow[0], ref)


def test_activation_checkpointing_gives_the_same_gradients():
    x, y = batch_fn(0, 0, 0, 1)
    grads = []
    for on in (False, True):
        model = gpt(dropout=0.1)
        model.activation_checkpointing = on
        torch.manual_seed(5)
        model(x, y)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])  # dropout masks replayed exactly


class Examples:
    """A stateful source over 40 fixed sequences, reshuffled every epoch (EpochBatches)."""

    def __new__(cls):
        g = torch.Generator().manual_seed(11)
        data = torch.randint(0, VOCAB, (40, BLOCK + 1), generator=g)
        return EpochBatches(40, 4, 2, seed=5, collate=lambda idx: (data[idx, :-1], data[idx, 1:]))


def test_resume_is_exact_with_a_stateful_batch_source(tmp_path):
    def make(run, steps):
        return Trainer(gpt(), cfg(steps=steps, grad_accum=2, checkpoint_every=4, keep_checkpoints=3), run_dir=run, batch_fn=Examples(), loss_fn=lm_loss,
                       units_per_batch=4 * BLOCK, progress=False)

    make(tmp_path / "full", 12).fit()  # 8 examples a step: 5 steps an epoch, so the run crosses two reshuffles
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
    make(part, 12).fit(resume=True)
    full = [r["loss"] for r in rows(tmp_path / "full") if "loss" in r]
    assert [r["loss"] for r in rows(part) if "loss" in r] == full[4:]
    state = ckpt.unflatten_state("batches", ckpt.read_safetensors(tmp_path / "full" / "checkpoints" / "step-12" / "optimizer.safetensors"))
    assert state["epoch"] == 2 and state["position"] == 8


def test_two_families_train_through_the_same_trainer_and_load_back(tmp_path):
    from adl_cli.runs import load_run, save_run
    from tiny_family import TinyMLPConfig, register_tiny_family

    register_tiny_family()
    from adl_cli.models import build_model

    torch.manual_seed(0)
    mlp = build_model(TinyMLPConfig(width=16))
    xs = torch.randn(64, 4)
    ys = (xs[:, 0] > 0).long() + (xs[:, 1] > 0).long()

    def images(step, micro, rank, world):
        idx = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))
        return xs[idx], ys[idx]

    def ce(model, batch):
        logits = model(batch[0])
        return nn.functional.cross_entropy(logits, batch[1]), {"accuracy": (logits.argmax(-1) == batch[1]).float().mean()}

    t = Trainer(mlp, cfg(steps=60, lr=3e-2, min_lr=3e-3, log_every=20), run_dir=tmp_path / "mlp", batch_fn=images, loss_fn=ce,
                units_per_batch=16, unit="examples", progress=False)
    result = t.fit()
    assert result.unit == "examples" and result.train_metrics["accuracy"] > 0.8
    save_run(tmp_path / "mlp", t.raw_model)
    g = Trainer(gpt(), cfg(steps=2), run_dir=tmp_path / "gpt", batch_fn=batch_fn, loss_fn=lm_loss, units_per_batch=4 * BLOCK, progress=False)
    g.fit()
    save_run(tmp_path / "gpt", g.raw_model)
    back = load_run(tmp_path / "mlp").model
    assert torch.equal(back(xs), t.raw_model.eval()(xs))
    assert isinstance(load_run(tmp_path / "gpt").model, GPT)


def test_tensorboard_tracking_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    t = Trainer(gpt(), cfg(steps=2, log_with=["tensorboard"]), run_dir=tmp_path, batch_fn=batch_fn, loss_fn=lm_loss, units_per_batch=4 * BLOCK,
                progress=False, run_name="tb")
    t.fit()
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (tmp_path / "metrics.jsonl").exists()  # beside metrics.jsonl, not instead of it


def test_muon_s_adamw_part_is_torch_adamw():
    """The tensors Muon leaves to AdamW take exactly torch.optim.AdamW's steps."""
    from adl_cli.engine.muon import Muon

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    b.data.copy_(a.data)
    mine = Muon([{"params": [a], "use_muon": False, "lr": 0.1, "weight_decay": 0.1}], betas=(0.9, 0.95))
    ref = torch.optim.AdamW([b], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
    torch.testing.assert_close(a.data, b.data, atol=1e-7, rtol=1e-6)
