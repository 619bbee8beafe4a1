"""adl distill: a student trained on a teacher run's next-token distributions.

A distillation recipe is a training recipe plus two tables. On text it is a pretraining recipe
(the student's [model], the [data] it reads, [train]); on the SFT tasks ([data] with ``tasks``) it
is an SFT recipe (its [init] is the student's starting run). Then

    [teacher]  run = "runs/small"        the teacher (its tokenizer must be the student's)
    [distill]  loss, temperature, alpha, top_k, cache, hidden, on_policy (see DistillSection)

and the one training loop runs with ``Distiller`` as its objective in place of cross-entropy:

    loss = alpha L_kd + (1 - alpha) CE(student, labels) + hidden L_hidden

L_kd is nn/distill.py's forward KL, reverse KL or generalised JSD between the temperature-softened
distributions (x T^2) over the tokens that carry labels (the answers, on tasks); L_hidden is the
squared distance between the student's final hidden states, through a learned projection (kept
out of the saved student), and the teacher's. With ``on_policy`` (GKD) that fraction of the batches
(chosen by the batch's content, so a resumed run chooses alike) is replaced by the student's own
samples: on text it continues each window's first half, on tasks it answers each prompt (unpacked
rows); those batches train on the divergence alone, over the sampled tokens. With ``top_k`` the
teacher is its k largest logits, and with ``cache`` those are kept on disk in adl's cache folder,
keyed by the teacher's weights and the batch's tokens, so a second student reading the same
batches (a resumed run, another loss) does not run the teacher again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.errors import AdlError
from adl_cli.methods.pretrain import PretrainRecipe
from adl_cli.methods.sft import SFTRecipe
from adl_cli.nn.distill import LOSSES, TopK, distill_loss, hidden_loss

IGNORE = -100


@dataclass
class TeacherSection:
    run: str = ""  # the teacher run folder


@dataclass
class DistillSection:
    loss: str = "forward_kl"  # forward_kl (mean seeking) | reverse_kl (mode seeking, MiniLLM) | jsd (GKD's generalised JSD)
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to hard-label cross-entropy
    beta: float = 0.5  # jsd's mixture weight
    top_k: int = 0  # > 0: the teacher as its k largest logits (renormalised), else its whole distribution
    cache: bool = False  # with top_k: keep the teacher's top k on disk (adl's cache folder), keyed by the batch
    hidden: float = 0.0  # > 0: weight of matching the final hidden states through a learned projection
    on_policy: float = 0.0  # GKD: the fraction of batches the student samples itself
    on_policy_temperature: float = 1.0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise AdlError(f"distill.loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if not self.temperature > 0:
            raise AdlError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise AdlError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.beta < 1.0:
            raise AdlError(f"distill.beta must be in (0, 1), got {self.beta}")
        if self.top_k < 0:
            raise AdlError(f"distill.top_k must be >= 0, got {self.top_k}")
        if self.cache and not self.top_k:
            raise AdlError("distill.cache keeps the teacher's top k logits: set distill.top_k (e.g. 64)")
        if self.cache and self.hidden:
            raise AdlError("distill.cache keeps logits, not hidden states: distill.hidden needs the teacher run on every batch")
        if self.hidden < 0:
            raise AdlError(f"distill.hidden must be >= 0, got {self.hidden}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise AdlError(f"distill.on_policy must be in [0, 1], got {self.on_policy}")
        if not self.on_policy_temperature > 0:
            raise AdlError(f"distill.on_policy_temperature must be > 0, got {self.on_policy_temperature}")


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
            h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()


class _Capture:
    """The output of a module (the final norm: the hidden states the head reads) on the next forward."""

    def __init__(self, module: nn.Module):
        self.value = None
        self._h = module.register_forward_hook(lambda m, a, out: setattr(self, "value", out))

    def remove(self) -> None:
        self._h.remove()


class Distiller:
    """The training objective of a distillation run (the trainer's ``loss_fn`` for text and tasks)."""

    def __init__(self, teacher_dir: str | Path, section: DistillSection, *, tokenizer, student_cfg, device, seed: int = 0,
                 log=lambda msg: None):
        from adl_cli.data.shards import tokenizer_fingerprint
        from adl_cli.runs import load_run

        section.validate()
        if not teacher_dir:
            raise AdlError("teacher.run must name the teacher's run folder (e.g. --set teacher.run=runs/small)")
        teacher = load_run(teacher_dir, device=device)
        if teacher.tokenizer is None:
            raise AdlError(f"teacher.run {teacher_dir} has no tokenizer.json: the student's tokens must be the teacher's")
        if tokenizer_fingerprint(teacher.tokenizer) != tokenizer_fingerprint(tokenizer):
            t, s = tokenizer_fingerprint(teacher.tokenizer), tokenizer_fingerprint(tokenizer)
            raise AdlError(f"the student's tokenizer ({s['tokenizer']}, {s['vocab_size']} ids) is not the teacher's ({t['tokenizer']}, "
                           f"{t['vocab_size']} ids): distillation compares distributions over the same token ids; train the student "
                           f"on the teacher's data recipe (same tokenizer settings) or start it from a run that shares them")
        if teacher.config.block_size < student_cfg.block_size:
            raise AdlError(f"the teacher's context ({teacher.config.block_size}) is shorter than the student's ({student_cfg.block_size})")
        self.teacher = teacher.model.eval().requires_grad_(False)
        self.teacher_run = teacher
        self.section = section
        self.vocab = tokenizer.vocab_size  # both heads may be padded beyond it: compare the real ids
        self.eot = tokenizer.eot_id
        self.seed = seed
        self.student_width = student_cfg.n_embd
        self.cache_dir = None
        if section.cache:
            from adl_cli.fileio import cache_dir
            from adl_cli.runs import file_digest

            self.cache_dir = cache_dir() / "distill" / f"{file_digest(teacher.weights)[:16]}-top{section.top_k}"
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stats = {"cache_hits": 0, "teacher_batches": 0, "on_policy_batches": 0}

    # ------------------------------------------------------------------ student side

    def prepare(self, model: nn.Module) -> None:
        """Attach the hidden-state projection (trained with the student, not saved with it)."""
        if self.section.hidden:
            width = self.teacher.config.n_embd
            model.add_module("distill_projection", nn.Linear(self.student_width, width, bias=False).to(next(model.parameters()).device))

    def finish(self, model: nn.Module) -> None:
        if hasattr(model, "distill_projection"):
            del model.distill_projection

    # ------------------------------------------------------------------ teacher side

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor, segment_ids: torch.Tensor | None) -> tuple[torch.Tensor | TopK, torch.Tensor | None]:
        """(the teacher's logits or top k, its final hidden states when matched)."""
        k = self.section.top_k
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{_digest(x, segment_ids)}.safetensors"
            if path.exists():
                from adl_cli.engine.checkpoint import read_safetensors

                t = read_safetensors(path)
                self.stats["cache_hits"] += 1
                return TopK(t["values"].to(x.device).float(), t["ids"].to(x.device).long()), None
        capture = _Capture(self.teacher.transformer.ln_f) if self.section.hidden else None
        try:
            logits = self.teacher(x, segment_ids=segment_ids)[0][..., : self.vocab].float()
        finally:
            if capture is not None:
                capture.remove()
        self.stats["teacher_batches"] += 1
        hidden = capture.value if capture is not None else None
        if not k:
            return logits, hidden
        top = TopK.of(logits, k)
        if path is not None:
            from adl_cli.engine.checkpoint import save_safetensors

            save_safetensors({"values": top.values.half().cpu().contiguous(), "ids": top.ids.int().cpu().contiguous()}, path)
            top = TopK(top.values.half().float(), top.ids)  # what a cache hit would give: the same loss either way
        return top, hidden

    # ------------------------------------------------------------------ on-policy batches (GKD)

    def _on_policy(self, x: torch.Tensor) -> bool:
        if not self.section.on_policy:
            return False
        draw = int(_digest(x)[:8], 16) / 0xFFFFFFFF
        return draw < self.section.on_policy

    @torch.no_grad()
    def sample_text(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each window's first half continued by the student: (sequences, a mask of the sampled
        positions' predictions)."""
        from adl_cli.inference.engine import generate_batch
        from adl_cli.inference.sampling import SamplingParams

        B, T = x.shape
        half = T // 2
        params = SamplingParams(temperature=self.section.on_policy_temperature)
        gen = torch.Generator(device="cpu").manual_seed(int(_digest(x)[:12], 16) ^ self.seed)
        was = model.training
        model.eval()
        try:
            done = generate_batch(model, x[:, :half].tolist(), T - half, params, generator=gen)
        finally:
            model.train(was)
        seq = x.clone()
        mask = torch.zeros_like(x, dtype=torch.bool)
        for row, c in enumerate(done):
            n = len(c.tokens)
            seq[row, half:half + n] = torch.tensor(c.tokens, dtype=x.dtype, device=x.device)
            if n < T - half:  # stopped early (an end token): fill with it; those positions do not count
                seq[row, half + n:] = self.eot
            mask[row, half - 1: half - 1 + n] = True  # position i predicts token i + 1
        return seq, mask

    @torch.no_grad()
    def sample_answers(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked task rows: each prompt (the tokens before its first label) answered by the student
        within the row's length; (rows, a mask of the answer positions' predictions)."""
        from adl_cli.inference.engine import generate_batch
        from adl_cli.inference.sampling import SamplingParams

        B, T = inputs.shape
        labelled = targets != IGNORE
        starts = [int(labelled[r].nonzero()[0]) + 1 if labelled[r].any() else T for r in range(B)]
        params = SamplingParams(temperature=self.section.on_policy_temperature)
        gen = torch.Generator(device="cpu").manual_seed(int(_digest(inputs)[:12], 16) ^ self.seed)
        was = model.training
        model.eval()
        try:
            done = generate_batch(model, [inputs[r, :s].tolist() for r, s in enumerate(starts)], max(1, T - min(starts)), params,
                                  generator=gen, eos_id=self.eot)
        finally:
            model.train(was)
        seq = torch.full_like(inputs, self.eot)
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        for r, (s, c) in enumerate(zip(starts, done)):
            toks = c.tokens[: T - s]
            seq[r, :s] = inputs[r, :s]
            seq[r, s: s + len(toks)] = torch.tensor(toks, dtype=inputs.dtype, device=inputs.device)
            mask[r, s - 1: s - 1 + len(toks)] = True
        return seq, mask

    # ------------------------------------------------------------------ the loss

    def loss(self, m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor | None = None):
        from adl_cli.engine.checkpoint import unwrap

        model = unwrap(m)
        sec = self.section
        on_policy = self._on_policy(inputs)
        if on_policy:
            if segment_ids is not None:
                raise AdlError("distill.on_policy on tasks needs unpacked rows: set data.pack = false")
            self.stats["on_policy_batches"] += 1
            if (targets == IGNORE).any():  # task rows: answer the prompts
                inputs, mask = self.sample_answers(model, inputs, targets)
            else:
                inputs, mask = self.sample_text(model, inputs)
        else:
            mask = targets != IGNORE
        capture = _Capture(model.transformer.ln_f) if sec.hidden else None
        try:
            logits = m(inputs, segment_ids=segment_ids)[0]  # through the wrapper: DDP syncs the gradients
        finally:
            if capture is not None:
                capture.remove()
        logits = logits[..., : self.vocab]
        teacher, teacher_h = self.teacher_targets(inputs, segment_ids)
        kd = distill_loss(logits, teacher, kind=sec.loss, temperature=sec.temperature, mask=mask, beta=sec.beta)
        metrics: dict[str, Any] = {"kd": kd.detach()}
        if on_policy:  # no labels for sampled tokens: the divergence alone
            total = kd
        else:
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
            metrics["ce"] = ce.detach()
            total = sec.alpha * kd + (1 - sec.alpha) * ce
        if sec.hidden:
            h = hidden_loss(capture.value, teacher_h, model.distill_projection, mask)
            metrics["hidden"] = h.detach()
            total = total + sec.hidden * h
        return total, metrics


# ----------------------------------------------------------------------------- recipes


@dataclass
class DistillTextRecipe(PretrainRecipe):
    """A pretraining recipe (the student, its text) plus [teacher] and [distill]."""

    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)


@dataclass
class DistillTaskRecipe(SFTRecipe):
    """An SFT recipe (the student's starting run in [init], the tasks) plus [teacher] and [distill]."""

    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)


def load_distill_recipe(path: str | Path, overrides: list[str] | None = None):
    """The text or the task recipe, by whether its [data] names ``tasks``."""
    import tomllib

    from adl_cli.recipe import load_recipe

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        raw = {}  # load_recipe reports it
    tasks = "tasks" in raw.get("data", {}) or any(o.strip().startswith("data.tasks=") for o in overrides or [])
    recipe = load_recipe(path, DistillTaskRecipe if tasks else DistillTextRecipe, overrides)
    if tasks and not recipe.init.from_:
        raise AdlError(f"{path}: a task distillation starts the student from a run: set init.from (e.g. runs/tiny)")
    recipe.distill.validate()
    if not recipe.teacher.run:
        raise AdlError(f"{path}: teacher.run must name the teacher's run folder (e.g. --set teacher.run=runs/small)")
    return recipe


def is_task_recipe(recipe) -> bool:
    return isinstance(recipe, DistillTaskRecipe)
