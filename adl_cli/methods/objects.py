"""Object discovery scores: how well a model's masks segment the objects of a set with masks.

    fg_ari        the adjusted Rand index between the true object ids and the predicted segment
                  (each pixel's most likely mask) over the foreground pixels only (the usual
                  "FG-ARI" of slot attention: the background, most of the image, is left out)
    kmeans_masks  the baseline: k-means on each image's pixels alone (colour, optionally with the
                  pixel's coordinates), as many clusters as the model has slots
    object_scores reconstruction error and FG-ARI (mean, 95% interval) of a model on a set
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def fg_ari(true: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per image (B,): ARI of ``pred`` (B, H, W) segment ids against ``true`` (B, H, W) object ids
    (0: background, left out). Where both partitions are trivial (one cluster each, or singletons
    each) it is 1, as scikit-learn has it."""
    b = true.shape[0]
    t, p = true.reshape(b, -1).long(), pred.reshape(b, -1).long()
    fg = (t > 0).double()
    ct = F.one_hot(t, int(t.max()) + 1).double() * fg[..., None]
    cp = F.one_hot(p, int(p.max()) + 1).double()
    n = ct.transpose(1, 2) @ cp  # (B, true ids, segments): the contingency table
    pairs = lambda m: (m * (m - 1) / 2).flatten(1).sum(1)  # noqa: E731
    index, rows, cols = pairs(n), pairs(n.sum(2)), pairs(n.sum(1))
    total = fg.sum(1)
    expected = rows * cols / (total * (total - 1) / 2).clamp_min(1)
    top = (rows + cols) / 2
    denom = top - expected
    return torch.where(denom.abs() > 1e-12, (index - expected) / torch.where(denom.abs() > 1e-12, denom, 1.0), 1.0).float()


def kmeans_masks(images: torch.Tensor, k: int, *, position: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(B, H, W) cluster ids of k-means on each image's pixels: their colour, plus ``position`` x
    their (y, x) coordinates in [0, 1] when it is above 0."""
    from sklearn.cluster import KMeans

    b, c, h, w = images.shape
    ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()], 1) * position
    out = np.zeros((b, h * w), np.int64)
    for i in range(b):
        feats = images[i].reshape(c, -1).T.numpy().astype(np.float64)
        if position > 0:
            feats = np.concatenate([feats, coords], 1)
        n_distinct = len(np.unique(feats, axis=0))
        out[i] = KMeans(n_clusters=min(k, n_distinct), n_init=3, random_state=seed).fit_predict(feats)
    return torch.from_numpy(out).view(b, h, w)


def mean_ci(values: torch.Tensor) -> dict[str, Any]:
    v = values.double()
    m = float(v.mean())
    half = 1.96 * float(v.std()) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": m, "ci95": [m - half, m + half]}


@torch.no_grad()
def decompose_all(model, images: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """The model's reconstruction and masks of every image (eval mode, kept as found)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        parts = [model.decompose(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was)
    return {key: torch.cat([p[key].float().cpu() for p in parts]) for key in ("recon", "masks")}


def object_scores(model, data) -> dict[str, Any]:
    """Reconstruction error and FG-ARI of the model's masks on an ImageSet with masks."""
    d = decompose_all(model, data.images)
    ari = fg_ari(data.masks, d["masks"].argmax(1))
    return {"n": len(data), "mse": float(F.mse_loss(d["recon"], data.images)), "fg_ari": mean_ci(ari)}


def kmeans_baselines(data, k: int) -> list[dict[str, Any]]:
    """FG-ARI of k-means on the pixels' colour, and on colour and position, with k clusters."""
    rows = []
    for name, position in (("k-means on pixel colour", 0.0), ("k-means on pixel colour + position", 1.0)):
        ari = fg_ari(data.masks, kmeans_masks(data.images, k, position=position))
        rows.append({"name": name, "k": k, "fg_ari": mean_ci(ari)})
    return rows


def objects_markdown(s: dict[str, Any]) -> str:
    lines = [f"# {s['name']}: {s['family']} on {s['set']}", "",
             f"{s['parameters']:,} parameters, {s['flops_per_image'] / 1e6:.2f} MFLOPs per image; {s['steps']} steps, "
             f"{s['images_seen']:,} images in {s['train_wall_s']:.0f} s.", "",
             "Foreground ARI: the adjusted Rand index of the masks' segmentation against the true objects, over the "
             "objects' pixels (1: every object its own segment; 0: chance).", "",
             "| split / method | images | reconstruction MSE | FG-ARI | 95% CI |", "|---|---|---|---|---|"]
    for name in ("val", "test"):
        r = s[name]
        a = r["fg_ari"]
        lines.append(f"| {name} | {r['n']} | {r['mse']:.5f} | {a['mean']:.3f} | {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f} |")
    for b in s["baselines"]:
        a = b["fg_ari"]
        lines.append(f"| test: {b['name']} (k = {b['k']}) | {s['test']['n']} | | {a['mean']:.3f} | {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f} |")
    return "\n".join(lines) + "\n"
