"""adl distill: the objective against cross-entropy and the KD formula, the teacher cache, on-policy
batches, text and task recipes through the real entry point, and its refusals."""

import json

import pytest
import torch

from adl_cli.errors import AdlError
from adl_cli.methods.distill import DistillSection, Distiller
from adl_cli.nn.distill import distill_loss
from adl_cli.runs import load_run

STUDENT = """
name = "student"

[teacher]
run = "{teacher}"

[distill]
{distill}

[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 64
vocab_multiple = 8

[data]
corpus = "{corpus}"
tokenizer = "{tokenizer}"
vocab_size = 320
val_fraction = 0.1

[train]
steps = 4
batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup = 1
eval_every = 0
eval_batches = 1
checkpoint_every = 2
log_every = 2
seed = 5
"""


def _recipe(tmp_path, teacher, corpus, distill="", tokenizer="bpe", name="student"):
    path = tmp_path / f"{name}.toml"
    path.write_text(STUDENT.format(teacher=teacher.as_posix(), corpus=corpus.as_posix(), distill=distill, tokenizer=tokenizer), encoding="utf-8")
    return path


@pytest.fixture
def quiet_peak(monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)


def test_the_objective_is_cross_entropy_at_alpha_0_and_the_kd_formula_at_alpha_1(bpe_run):
    teacher = load_run(bpe_run)
    student = load_run(bpe_run).model.train()
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    y[0, :5] = -100
    for alpha in (0.0, 1.0):
        d = Distiller(bpe_run, DistillSection(alpha=alpha, temperature=2.0), tokenizer=teacher.tokenizer, student_cfg=teacher.config, device="cpu")
        loss, metrics = d.loss(student, x, y)
        if alpha == 0.0:  # the model's own (fused) cross-entropy over the labelled tokens
            assert loss.item() == pytest.approx(student(x, y)[1].item(), rel=1e-5)
        else:
            with torch.no_grad():
                t = teacher.model(x)[0][..., : teacher.tokenizer.vocab_size]
            s = student(x)[0][..., : teacher.tokenizer.vocab_size]
            assert loss.item() == pytest.approx(distill_loss(s, t, temperature=2.0, mask=y != -100).item(), rel=1e-5)
            assert loss.item() == pytest.approx(0.0, abs=1e-5)  # the student is the teacher here


def test_text_distillation_end_to_end_with_scratch_and_the_teacher(bpe_run, small_corpus, tmp_path, run, capsys, quiet_peak):
    recipe = _recipe(tmp_path, bpe_run, small_corpus, "loss = \"reverse_kl\"\ntemperature = 2.0\nhidden = 0.5")
    code, out, err = run(["distill", recipe, "--out", tmp_path / "s", "--scratch", tmp_path / "scratch", "--json", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads(out)  # --json: stdout is the one JSON object
    rows = report["rows"]
    assert list(rows) == ["teacher", "distilled", "scratch"]
    assert rows["distilled"]["tokens"] == rows["scratch"]["tokens"] == 4 * 4 * 64  # the same token budget
    assert rows["distilled"]["val_tokens"] == rows["teacher"]["val_tokens"]  # every model scores the same split
    assert report["stats"]["teacher_batches"] == 4
    student = load_run(tmp_path / "s")  # the hidden-state projection trained with it is not saved with it
    assert not any("distill_projection" in k for k in student.model.state_dict())
    assert (tmp_path / "s" / "report.md").read_text().count("|") > 10
    # eval reads a distilled run's own split, as adl pretrain's
    code, out, err = run(["eval", tmp_path / "s", "--json"], capsys)
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(rows["distilled"]["val_loss"], rel=1e-5)
    # the scratch run is reused when it is there (nothing retrained, nothing replaced)
    before = (tmp_path / "scratch" / "model.safetensors").read_bytes()
    code, out, err = run(["distill", recipe, "--out", tmp_path / "s2", "--scratch", tmp_path / "scratch", "--json", "--no-progress"], capsys)
    assert code == 0, err
    assert "scratch" not in json.loads(out.strip().splitlines()[-1])["seconds"]
    assert (tmp_path / "scratch" / "model.safetensors").read_bytes() == before
    # ... but only when it trained what the student trains
    code, out, err = run(["distill", recipe, "--out", tmp_path / "s3", "--scratch", tmp_path / "scratch", "--set", "train.steps=3",
                          "--no-progress"], capsys)
    assert code == 2 and "was trained with another recipe (train.steps 4 (the student: 3))" in err, err
    assert not (tmp_path / "s3").exists()


def test_cached_top_k_teacher_is_read_back_and_on_policy_batches_are_sampled(bpe_run, small_corpus, tmp_path, run, capsys, quiet_peak):
    recipe = _recipe(tmp_path, bpe_run, small_corpus, "top_k = 8\ncache = true")
    first = run(["distill", recipe, "--out", tmp_path / "a", "--json", "--no-progress"], capsys)
    assert first[0] == 0, first[2]
    second = run(["distill", recipe, "--out", tmp_path / "b", "--json", "--no-progress"], capsys)
    assert second[0] == 0, second[2]
    s1, s2 = (json.loads(r[1].strip().splitlines()[-1])["stats"] for r in (first, second))
    assert s1["teacher_batches"] == 4 and s2 == {"cache_hits": 4, "teacher_batches": 0, "on_policy_batches": 0}  # same batches
    a, b = load_run(tmp_path / "a").model, load_run(tmp_path / "b").model
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))  # cached = computed
    onp = _recipe(tmp_path, bpe_run, small_corpus, "on_policy = 1.0\nloss = \"jsd\"", name="onp")
    code, out, err = run(["distill", onp, "--out", tmp_path / "c", "--json", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stats"]["on_policy_batches"] == 4


def test_task_distillation_compares_exact_match(bpe_run, chat_run, tmp_path, run, capsys, quiet_peak):
    recipe = tmp_path / "tasks.toml"
    recipe.write_text(f"""
name = "task-student"
[teacher]
run = "{chat_run.as_posix()}"
[distill]
loss = "reverse_kl"
on_policy = 0.5
[init]
from = "{bpe_run.as_posix()}"
[data]
tasks = ["addition"]
train_examples = 64
val_examples = 4
eval_examples = 20
eval_examples_during = 0
operand_digits = 2
pack = false
[train]
steps = 3
batch_size = 4
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 0
checkpoint_every = 0
log_every = 1
seed = 2
""", encoding="utf-8")
    code, out, err = run(["distill", recipe, "--out", tmp_path / "t", "--scratch", tmp_path / "ts", "--json", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["kind"] == "tasks"
    for name in ("teacher", "distilled", "scratch"):
        assert report["rows"][name]["tasks"]["addition"]["n"] == 20


def test_bad_distillations_are_one_line_errors(bpe_run, small_corpus, tmp_path, run, capsys, quiet_peak):
    cases = [
        (_recipe(tmp_path, bpe_run, small_corpus, tokenizer="bytes", name="a"), "is not the teacher's"),
        (_recipe(tmp_path, bpe_run, small_corpus, "loss = \"kl\"", name="b"), "distill.loss must be one of forward_kl, reverse_kl, jsd"),
        (_recipe(tmp_path, bpe_run, small_corpus, "cache = true", name="c"), "set distill.top_k"),
        (_recipe(tmp_path, tmp_path / "nowhere", small_corpus, name="d"), "run folder not found"),
    ]
    for recipe, message in cases:
        code, out, err = run(["distill", recipe, "--out", tmp_path / "x", "--no-progress"], capsys)
        assert code == 2 and message in err, err
        assert "Traceback" not in err
    recipe = _recipe(tmp_path, bpe_run, small_corpus)
    code, _, err = run(["distill", recipe, "--out", tmp_path / "y", "--scratch", tmp_path / "y", "--no-progress"], capsys)
    assert code == 2 and "--scratch must be another folder" in err


def test_the_scaled_kl_gradient_reaches_the_student_only(bpe_run):
    teacher = load_run(bpe_run)
    student = load_run(bpe_run).model.train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = Distiller(bpe_run, DistillSection(alpha=1.0), tokenizer=teacher.tokenizer, student_cfg=teacher.config, device="cpu")
    x = torch.randint(0, 300, (2, 16))
    loss, _ = d.loss(student, x, x)
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with pytest.raises(AdlError, match="teacher.run must name"):
        Distiller("", DistillSection(), tokenizer=teacher.tokenizer, student_cfg=teacher.config, device="cpu")
