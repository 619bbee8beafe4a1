"""``adl vision RECIPE``: an image model family trained on an image set through the one trainer.

The recipe (recipes/vision/<family>.toml) names the family in ``[model]`` (its shape; the image
size, channels and classes come from the data), the set in ``[data]`` (a built-in set or a folder,
the fixed split), the training-time ``[augment]``ations and ``[train]``. Batches are a function of
the seed and the step (epochs of seeded permutations, each rank its slice), so resuming is exact.
At the end: top-1 accuracy on the validation and test splits, the test confusion matrix,
report.md and summary.json, and the figures (confusion matrix; a ViT's attention maps).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adl_cli.data.images import Augment, ImageSet, Splits, load_images, split
from adl_cli.engine.checkpoint import atomic_write_text
from adl_cli.engine.trainer import TrainConfig, Trainer
from adl_cli.errors import AdlError
from adl_cli.methods.exact_match import wilson
from adl_cli.methods.objects import kmeans_baselines, object_scores, objects_markdown
from adl_cli.methods.pretrain import start_run
from adl_cli.models import ModelConfig, build_model
from adl_cli.models.vit import ViTConfig
from adl_cli.recipe import dump_recipe, load_recipe
from adl_cli.runs import save_run


@dataclass
class ImageData:
    """The recipe's ``[data]``: which images and the fixed split."""

    set: str = "digits"  # digits | shapes | sprites | folder:PATH
    size: int = 0  # resize to size x size (0: the set's own: digits 8, shapes and sprites 32, folders 32)
    n: int = 0  # images generated / read (0: the set's default; digits has 1,797)
    seed: int = 0  # the generated sets' seed and the split's: fixed, whatever train.seed is
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    label: str = "class"  # what to predict: class, or an extra label of the set (shapes: count, quadrant)

    def validate(self) -> None:
        if self.size < 0 or self.n < 0:
            raise ValueError(f"data.size and data.n must be >= 0, got {self.size} and {self.n}")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("data.val_fraction and data.test_fraction must be in (0, 1) with a sum below 1")


@dataclass
class VisionRecipe:
    name: str = "vision"
    description: str = ""
    label_smoothing: float = 0.0
    model: ModelConfig = field(default_factory=ViTConfig)
    data: ImageData = field(default_factory=ImageData)
    augment: Augment = field(default_factory=Augment)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not hasattr(self.model, "with_data"):
            raise ValueError(f"model.family '{self.model.family}' is not an image family "
                             "(vit, axial, swin, perceiver, mixer, poolformer, fnet, cnn, slots)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def load_vision_recipe(path: str | Path, overrides: list[str] | None = None) -> VisionRecipe:
    return load_recipe(path, VisionRecipe, overrides)


def load_splits(data: ImageData) -> Splits:
    images = load_images(data.set, size=data.size or None, n=data.n or None, seed=data.seed)
    if data.label != "class":
        if data.label not in images.extra:
            raise AdlError(f"data.label: the {data.set} set has no '{data.label}' label (it has: class{''.join(', ' + k for k in images.extra)})")
        values = images.extra[data.label]
        images = ImageSet(images.images, values, [str(v) for v in range(int(values.max()) + 1)], images.name, images.masks, images.extra)
    return split(images, (data.val_fraction, data.test_fraction), seed=data.seed)


class ImageBatches:
    """Step -> batch: the global stream of training indices is a concatenation of seeded
    permutations (one per epoch); micro-batch m of rank r at step t reads its slice of it, then the
    augmentations run with a generator seeded by (seed, t, m, r)."""

    def __init__(self, data: ImageSet, batch_size: int, grad_accum: int, seed: int, augment: Augment):
        self.data, self.batch_size, self.grad_accum, self.seed, self.augment = data, batch_size, grad_accum, seed, augment
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
        n, b = len(self.data), self.batch_size
        start = ((step * self.grad_accum + micro) * world + rank) * b
        pos = torch.arange(start, start + b)
        epochs, within = pos // n, pos % n
        out = torch.empty(b, dtype=torch.long)
        for e in epochs.unique().tolist():  # one epoch, or two where the batch straddles a boundary
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out

    def __call__(self, step: int, micro: int, rank: int, world: int):
        idx = self.indices(step, micro, rank, world)
        x = self.data.images[idx]
        if self.augment.active:
            x = self.augment(x, torch.Generator().manual_seed(hash((self.seed, step, micro, rank)) & 0x7FFF_FFFF))
        return x, self.data.labels[idx]


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for every image (eval mode kept as found)."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])


def scores(model, data: ImageSet) -> dict[str, Any]:
    """Loss, top-1 accuracy with its Wilson interval, and the confusion matrix (rows: true class)."""
    was = model.training
    model.eval()
    try:
        logits = predict(model, data.images)
    finally:
        model.train(was)
    pred = logits.argmax(-1)
    k = len(data.classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((data.labels, pred), torch.ones_like(pred), accumulate=True)
    correct = int((pred == data.labels).sum())
    return {"n": len(data), "loss": float(F.cross_entropy(logits, data.labels)), "accuracy": correct / max(1, len(data)),
            "ci95": list(wilson(correct, len(data))), "confusion": confusion.tolist()}


def flops_per_image(model, shape: tuple[int, int, int]) -> float:
    """Forward FLOPs of one image, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:  # with autograd on: its module tracker trips on no_grad outputs of parameters
            model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    finally:
        model.train(was)
    return float(counter.get_total_flops())


@dataclass
class VisionOutcome:
    run_dir: Path
    summary: dict[str, Any]
    main: bool = True


def run_vision(recipe: VisionRecipe, out: Path, *, resume: bool = False, force: bool = False, progress: bool | None = True,
               accelerator=None, log=print) -> VisionOutcome:
    out = Path(out)
    t0 = time.perf_counter()
    splits = load_splits(recipe.data)
    c, h, _ = splits.train.shape
    cfg = recipe.model.with_data(h, c, len(splits.train.classes))
    try:
        cfg.validate()
    except ValueError as e:
        raise AdlError(str(e)) from None
    reconstruct = cfg.objective == "reconstruct"
    if reconstruct and splits.train.masks is None:
        raise AdlError(f"model.family '{cfg.family}' discovers objects and is scored against object masks: "
                       f"the {recipe.data.set} set has none (use data.set = \"sprites\")")
    start = start_run(recipe, out, resume=resume, force=force, accelerator=accelerator, log=log, load=load_vision_recipe)
    acc, main, world, log = start.acc, start.main, start.world, start.log
    log(f"data: {recipe.data.set} {c}x{h}x{h}, {len(splits.train.classes)} classes; {len(splits.train):,} train / {len(splits.val):,} val / "
        f"{len(splits.test):,} test images (split seed {recipe.data.seed})")
    torch.manual_seed(recipe.train.seed)
    model = build_model(cfg)
    fpi = flops_per_image(model, (c, h, h))
    log(f"model: {cfg.family}, {model.n_params():,} parameters, {fpi / 1e6:.2f} MFLOPs per image (forward)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"resolved recipe of the vision run in {out.name}; `adl vision {out / 'recipe.toml'} --out NEW_DIR` reproduces it"
        atomic_write_text(out / "recipe.toml", dump_recipe(recipe, header=header))
    tc = recipe.train
    batches = ImageBatches(splits.train, tc.batch_size, tc.grad_accum, tc.seed, recipe.augment)
    smoothing = recipe.label_smoothing

    def loss_fn(m, batch):
        x, y = batch
        if reconstruct:
            return F.mse_loss(m(x).float(), x.float())
        logits = m(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        return loss, {"acc": (logits.argmax(-1) == y).float().mean()}

    def eval_fn(m):
        if reconstruct:
            s = object_scores(m, splits.val)
            return {"val_loss": s["mse"], "val_fg_ari": s["fg_ari"]["mean"]}
        s = scores(m, splits.val)
        return {"val_loss": s["loss"], "val_acc": s["accuracy"]}

    trainer = Trainer(model, tc, run_dir=out, batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, units_per_batch=tc.batch_size,
                      unit="images", flops_per_unit=3 * fpi, accelerator=acc, progress=None if progress is None else progress and main,
                      run_name=recipe.name)
    result = trainer.fit(resume=resume, checkpoint=start.checkpoint)
    if not main:
        return VisionOutcome(out, {}, main=False)
    final = trainer.raw_model.cpu().eval()
    save_run(out, final)
    summary = {"name": recipe.name, "family": cfg.family, "set": recipe.data.set, "label": recipe.data.label, "classes": splits.train.classes,
               "image_shape": [c, h, h], "parameters": model.n_params(), "flops_per_image": fpi, "steps": result.steps,
               "images_seen": result.units, "train_wall_s": result.wall_s, "wall_s": time.perf_counter() - t0}
    from adl_cli.engine.vision_plots import confusion_figure, model_figures

    if reconstruct:
        summary.update(objective="reconstruct", val=object_scores(final, splits.val), test=object_scores(final, splits.test),
                       baselines=kmeans_baselines(splits.test, cfg.slots))
        atomic_write_text(out / "report.md", objects_markdown(summary))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))  # the scores kept whatever the figures do
        summary["figures"] = model_figures(final, splits.test, out)
    else:
        summary.update(val=scores(final, splits.val), test=scores(final, splits.test))
        atomic_write_text(out / "report.md", report_markdown(summary))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        confusion_figure(summary["test"]["confusion"], splits.train.classes, out / "confusion.png",
                         title=f"{recipe.name}: test accuracy {summary['test']['accuracy']:.1%}")
        summary["figures"] = ["confusion.png", *model_figures(final, splits.test, out)]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return VisionOutcome(out, summary)


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# {s['name']}: {s['family']} on {s['set']}", "",
             f"{s['parameters']:,} parameters, {s['flops_per_image'] / 1e6:.2f} MFLOPs per image; {s['steps']} steps, "
             f"{s['images_seen']:,} images in {s['train_wall_s']:.0f} s.", "",
             "| split | images | loss | top-1 | 95% CI |", "|---|---|---|---|---|"]
    for name in ("val", "test"):
        r = s[name]
        lines.append(f"| {name} | {r['n']} | {r['loss']:.4f} | {r['accuracy']:.2%} | {r['ci95'][0]:.2%}-{r['ci95'][1]:.2%} |")
    classes = s["classes"]
    lines += ["", "Test confusion matrix (rows: true class, columns: predicted):", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, s["test"]["confusion"]):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
