"""``adl bench-vision``: every image family on the same data at an equal wall-clock budget.

    for each family: a short probe run measures its training seconds per step (ablate's probe);
                     steps = budget / that
    for seed in seeds: the families run in alternating order (forward, then backward), each an
                     ordinary `adl vision` run of its shipped recipe (recipes/vision/<family>.toml)
                     with the data, seed and steps set (and the family's own settings, e.g. a
                     larger patch on larger images), in OUT/<family>/seed-<k>
    baselines:       logistic regression on the pixels (scikit-learn, the same split)

Reported per family: parameters, forward FLOPs per image, steps in the budget, training images
per second and seconds (medians), test top-1 (median, min and max over seeds) and validation
top-1 (median).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError, opt, pick

FAMILIES = ("vit", "axial", "swin", "perceiver", "mixer", "poolformer", "fnet", "cnn")


@dataclass
class FamilyResult:
    family: str
    steps: int
    seconds_per_step: float
    parameters: int = 0
    flops_per_image: float = 0.0
    seeds: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    train_wall_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        med = statistics.median
        return {"family": self.family, "parameters": self.parameters, "flops_per_image": self.flops_per_image, "steps": self.steps, "seconds_per_step": self.seconds_per_step,
                "images_per_s": med(self.images_per_s), "train_wall_s": med(self.train_wall_s), "test_accuracy": med(self.test_accuracy),
                "test_min": min(self.test_accuracy), "test_max": max(self.test_accuracy), "val_accuracy": med(self.val_accuracy),
                "seeds": self.seeds, "test_by_seed": self.test_accuracy}


def parse_models(models: str | None) -> list[str]:
    if models and "slots" in [m.strip() for m in models.split(",")]:
        raise AdlError(f"{opt('models')}: slots discovers objects and has no top-1 to compare here: train it with `adl vision slots`")
    return pick("models", models, FAMILIES, "family")


def split_settings(items: list[str], models: list[str], shared_sections: tuple[str, ...] = ("data",),
                   example: str = "vit:model.patch=4") -> tuple[list[str], dict[str, list[str]]]:
    """``SECTION.KEY=VALUE`` items for a shared section (every family: the data, the task) and
    ``FAMILY:KEY=VALUE`` items (that family's recipe)."""
    shared: list[str] = []
    own: dict[str, list[str]] = {m: [] for m in models}
    for item in items:
        head, eq, _ = item.partition("=")
        fam, colon, key = head.partition(":")
        if colon and eq and key:
            if fam not in own:
                raise AdlError(f"{opt('set')} {item}: '{fam}' is not among the families benchmarked ({', '.join(models)})")
            own[fam].append(item[len(fam) + 1:])
        elif eq and head.split(".")[0] in shared_sections and "." in head:
            shared.append(item)
        else:
            keys = " or ".join(f"{s}.KEY=VALUE" for s in shared_sections)
            raise AdlError(f"{opt('set')} takes {keys} (every family) or FAMILY:KEY=VALUE (one family's recipe, e.g. {example}), got '{item}'")
    return shared, own


def logistic_regression(data) -> dict[str, Any]:
    """Multinomial logistic regression on the raw pixels of ``data``'s split (an ImageData;
    scikit-learn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression

    from adl_cli.methods.vision import load_splits

    splits = load_splits(data)
    x = splits.train.images.flatten(1).numpy()
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=5000).fit(x, splits.train.labels.numpy())
    fit_s = time.perf_counter() - t0
    test = float((clf.predict(splits.test.images.flatten(1).numpy()) == splits.test.labels.numpy()).mean())
    val = float((clf.predict(splits.val.images.flatten(1).numpy()) == splits.val.labels.numpy()).mean())
    return {"family": "logistic regression (pixels)", "parameters": int(clf.coef_.size + clf.intercept_.size), "test_accuracy": test,
            "val_accuracy": val, "fit_s": fit_s, "test_images": len(splits.test), "train_images": len(splits.train)}


def run_bench_vision(models: list[str], out: Path, *, budget_seconds: float = 60.0, seeds: int = 3, data_sets: list[str] | None = None,
                     force: bool = False, probe_steps: int = 30, log=print) -> dict[str, Any]:
    """``data_sets``: ``data.KEY=VALUE`` settings every family's recipe takes (the set, its size), and
    ``FAMILY:KEY=VALUE`` settings for one family's recipe (``vit:model.patch=4`` on larger images)."""
    import shutil

    from adl_cli.cli.recipes import find_recipe
    from adl_cli.methods.ablate import seconds_per_step
    from adl_cli.methods.vision import load_vision_recipe, run_vision

    if seeds < 1:
        raise AdlError(f"{opt('seeds')} must be >= 1, got {seeds}")
    if not budget_seconds > 0:
        raise AdlError(f"{opt('budget_seconds')} must be a positive number of seconds, got {budget_seconds}")
    shared, own = split_settings(list(data_sets or []), models)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise AdlError(f"{out} is not empty (an earlier benchmark?); choose another {opt('out')} or pass {opt('force')} to replace it")
    recipes = {m: find_recipe(f"vision/{m}") for m in models}
    sets = {m: shared + own[m] for m in models}
    data = {m: load_vision_recipe(path, sets[m]).data for m, path in recipes.items()}  # every recipe and setting checked first
    if force and out.exists():
        shutil.rmtree(out)
    results: dict[str, FamilyResult] = {}
    for m in models:
        per_step = seconds_per_step(recipes[m], sets[m], out / "probe", probe_steps, load=load_vision_recipe, run=run_vision, extra_sets=())
        steps = max(1, int(budget_seconds / per_step))
        results[m] = FamilyResult(m, steps, per_step)
        log(f"{m}: {per_step * 1000:.1f} ms per step in a {probe_steps}-step probe -> {steps} steps in {budget_seconds:g} s")
    for i in range(seeds):
        order = models if i % 2 == 0 else list(reversed(models))
        for m in order:
            r = results[m]
            run_sets = sets[m] + [f"train.seed={i}", f"train.steps={r.steps}", "train.checkpoint_every=0", "train.eval_every=0"]
            folder = out / m / f"seed-{i}"
            log(f"{m}, seed {i}: {r.steps} steps -> {folder}")
            s = run_vision(load_vision_recipe(recipes[m], run_sets), folder, progress=None, log=lambda *a, **k: None).summary
            r.parameters, r.flops_per_image = s["parameters"], s["flops_per_image"]
            r.seeds.append(i)
            r.test_accuracy.append(s["test"]["accuracy"])
            r.val_accuracy.append(s["val"]["accuracy"])
            r.train_wall_s.append(s["train_wall_s"])
            r.images_per_s.append(s["images_seen"] / max(1e-9, s["train_wall_s"]))
    baseline = logistic_regression(data[models[0]])
    return {"budget_seconds": budget_seconds, "seeds": seeds, "data": asdict(data[models[0]]), "probe_steps": probe_steps,
            "settings": {m: own[m] for m in models if own[m]},
            "rows": [results[m].row() for m in models], "baselines": [baseline]}
