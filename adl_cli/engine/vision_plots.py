"""The image labs' figures: a confusion matrix, and what a model family shows of itself (a ViT's
attention from the class token over the patches, a Perceiver's latents' cross-attention over the
pixels, a Swin's window attention, slot attention's masks). Written atomically as PNGs (engine/plots.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from adl_cli.engine.plots import _pyplot, _save


def confusion_figure(confusion: list[list[int]], classes: list[str], path: Path, title: str = "") -> Path:
    """Counts per (true, predicted) class, each row shaded by its share of the true class."""
    plt = _pyplot()
    m = torch.tensor(confusion, dtype=torch.float64)
    share = m / m.sum(1, keepdim=True).clamp_min(1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * k, 1.0 + 0.5 * k))
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45 if max(map(len, classes)) > 2 else 0, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _image_grid(rows: int, cols: int, cell: float = 1.6):
    """A figure of rows x cols image panels (axes[row][col])."""
    return _pyplot().subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)


def _finish(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=0.6, w_pad=0.3)
    return _save(fig, path)


def _show(ax, image: torch.Tensor) -> None:
    img = image.permute(1, 2, 0).numpy()
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.axis("off")


def attention_figure(images: torch.Tensor, maps: list[torch.Tensor], grid: int, path: Path, title: str = "") -> Path:
    """Row 1: the images; then per block, the class token's attention over the patches (mean over
    heads; bright: attended), at the image's scale."""
    n, rows = len(images), 1 + len(maps)
    fig, axes = _image_grid(rows, n)
    size = images.shape[-1]
    for i in range(n):
        _show(axes[0][i], images[i])
        for r, m in enumerate(maps, start=1):
            att = m[i].mean(0)[0, 1:].reshape(grid, grid)  # the class token's row, without itself
            up = torch.nn.functional.interpolate(att[None, None], size=(size, size), mode="nearest")[0, 0]
            ax = axes[r][i]
            ax.imshow(up.numpy(), cmap="inferno", vmin=0)
            ax.axis("off")
            if i == 0:
                ax.set_title(f"block {r}", fontsize=7, loc="left")
    return _finish(fig, title, path)


def cross_attention_figure(images: torch.Tensor, maps: torch.Tensor, path: Path, latents: int = 4, title: str = "") -> Path:
    """Row 1: the images; then, for the first ``latents`` latents, where each looks among the
    pixels in the first cross-attention (mean over heads; bright: attended)."""
    n, size = len(images), images.shape[-1]
    rows = 1 + min(latents, maps.shape[2])
    fig, axes = _image_grid(rows, n)
    for i in range(n):
        _show(axes[0][i], images[i])
        for r in range(1, rows):
            ax = axes[r][i]
            ax.imshow(maps[i].mean(0)[r - 1].reshape(size, size).numpy(), cmap="inferno", vmin=0)
            ax.axis("off")
            if i == 0:
                ax.set_title(f"latent {r - 1}", fontsize=7, loc="left")
    return _finish(fig, title, path)


def window_attention_figure(images: torch.Tensor, maps: list, path: Path, title: str = "") -> Path:
    """Row 1: the images; then per first-stage Swin block, the attention each token received
    within its window (bright: attended), with the block's window borders (shifted ones offset)."""
    n, size = len(images), images.shape[-1]
    rows = 1 + len(maps)
    fig, axes = _image_grid(rows, n)
    for i in range(n):
        _show(axes[0][i], images[i])
        for r, (block, grid) in enumerate(maps, start=1):
            ax = axes[r][i]
            res = grid.shape[-1]
            scale = size / res
            ax.imshow(grid[i].numpy(), cmap="inferno", vmin=0, extent=(0, size, size, 0), interpolation="nearest")
            for k in range(0, res + 1, block.ws):  # window borders, in image pixels
                edge = ((k + block.shift) % res) * scale
                ax.axhline(edge, color="cyan", linewidth=0.6)
                ax.axvline(edge, color="cyan", linewidth=0.6)
            ax.set_xlim(0, size)
            ax.set_ylim(size, 0)
            ax.axis("off")
            if i == 0:
                ax.set_title(f"block {r}{' (shifted)' if block.shift else ''}", fontsize=7, loc="left")
    return _finish(fig, title, path)


def _segments(ax, ids: torch.Tensor, k: int) -> None:
    ax.imshow(ids.numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.axis("off")


def slots_figure(images: torch.Tensor, parts: dict[str, torch.Tensor], true_masks: torch.Tensor, path: Path, title: str = "") -> Path:
    """Per image (a column): the image, the reconstruction, the true objects, the masks'
    segmentation (each pixel's most likely slot), then every slot's colours through its mask."""
    n, k = len(images), parts["masks"].shape[1]
    rows = 4 + k
    fig, axes = _image_grid(rows, n, cell=1.3)
    labels = ["image", "reconstruction", "true objects", "slot segmentation", *(f"slot {j}" for j in range(k))]
    for i in range(n):
        _show(axes[0][i], images[i])
        _show(axes[1][i], parts["recon"][i].clamp(0, 1))
        _segments(axes[2][i], true_masks[i], int(true_masks.max()) + 1)
        _segments(axes[3][i], parts["masks"][i].argmax(0), k)
        for j in range(k):
            _show(axes[4 + j][i], (parts["masks"][i, j, None] * parts["colours"][i, j]).clamp(0, 1))
    for r, label in enumerate(labels):
        axes[r][0].set_title(label, fontsize=7, loc="left")
    return _finish(fig, title, path)


def model_figures(model, data, out: Path, n: int = 6) -> list[str]:
    """The figures a family draws of itself on the first ``n`` test images; returns their names."""
    names = []
    images = data.images[:n]
    if hasattr(model, "attention_maps") and getattr(model, "cls", None) is not None:
        with torch.no_grad():
            maps = model.attention_maps(images)
        attention_figure(images, maps, model.embed.grid, out / "attention.png",
                         title="class-token attention over patches (mean over heads), per block")
        names.append("attention.png")
    if hasattr(model, "cross_attention_maps"):
        maps = model.cross_attention_maps(images)
        cross_attention_figure(images, maps, out / "cross_attention.png", title="Perceiver: first cross-attention of four latents over the pixels")
        names.append("cross_attention.png")
    if hasattr(model, "window_attention_maps"):
        window_attention_figure(images, model.window_attention_maps(images), out / "window_attention.png",
                                title="Swin, first stage: attention each token receives within its window (cyan: windows)")
        names.append("window_attention.png")
    if hasattr(model, "decompose") and data.masks is not None:
        model.eval()
        with torch.no_grad():
            parts = {key: v.float() for key, v in model.decompose(images).items()}
        slots_figure(images, parts, data.masks[:n], out / "slots.png",
                     title="slot attention: each slot's colours x its mask blend into the reconstruction;\n"
                           "segmentation: each pixel's most likely slot (FG-ARI scores it on the objects' pixels)")
        names.append("slots.png")
    return names


def bench_vision_figure(report: dict, path: Path) -> Path:
    """Test top-1 of each family (median, with the seeds' range) against its training images per
    second, the logistic-regression baseline as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in report["rows"]:
        acc = 100 * r["test_accuracy"]
        err = [[acc - 100 * r["test_min"]], [100 * r["test_max"] - acc]]
        ax.errorbar(r["images_per_s"], acc, yerr=err, fmt="o", capsize=3)
        ax.annotate(r["family"], (r["images_per_s"], acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for b in report["baselines"]:
        ax.axhline(100 * b["test_accuracy"], color="gray", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], 100 * b["test_accuracy"], f" {b['family']}", fontsize=7, color="gray", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("training images per second (log)")
    ax.set_ylabel("test top-1 (%)")
    d = report["data"]
    title = f"{d['set']}: {report['budget_seconds']:g} s of training each, median and range of {report['seeds']} seed(s)"
    own = report.get("settings") or {}
    if own:
        title += "\n" + "; ".join(f"{fam}: {', '.join(sets)}" for fam, sets in own.items())
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)
