"""Image data, offline: built-in sets, a user's folder, one fixed split, composable augmentations.

Built-in sets (IMAGE_SETS; every one seeded, nothing downloaded):

    digits   scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, 10 classes
             (``size`` upscales bilinearly)
    shapes   generated colour shapes on a dark background, 32x32 by default: 1 to 3 copies of
             one of 5 shapes (the class), with the count and the first shape's quadrant as
             extra labels
    sprites  generated multi-object scenes for object discovery: 2 to 4 shapes in colours drawn
             from one small palette (two objects often share a colour, so colour alone does not
             segment them), with a per-pixel object mask (0: background, 1..k: objects in
             drawing order, later ones occluding earlier ones)

A user's folder (``folder:PATH`` or a path) holds one sub-folder per class of images Pillow reads,
resized to ``size``. ``split`` gives the fixed train/val/test split (stratified by class, its own
seed: the split never moves with the training seed). ``Augment`` is the augmentation layer the
image labs share: flips, pad-and-crop, shifts, noise, blur, intensity jitter, applied per batch
from a generator (the batch is a function of the seed and the step, so resuming is exact), and
``multi_crop`` for self-supervised views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adl_cli.errors import AdlError
from adl_cli.registry import Registry

IMAGE_SETS = Registry("image set")
SHAPES = ("circle", "square", "triangle", "cross", "ring")
PALETTE = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.3), (0.25, 0.4, 0.95), (0.95, 0.85, 0.2))  # sprites' colours
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Images (N, C, H, W) float32 in [0, 1], class labels (N,), class names; ``masks`` (N, H, W)
    object ids where the set has them; ``extra``: other per-image labels by name."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    masks: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w

    def subset(self, index) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index], self.classes, self.name,
                        None if self.masks is None else self.masks[index], {k: v[index] for k, v in self.extra.items()})


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if not size or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@IMAGE_SETS.register("digits")
def digits(size: int | None = None, n: int | None = None, seed: int = 0) -> ImageSet:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - a dependency
        raise AdlError("the digits set comes with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(d.target, dtype=torch.long)
    if n is not None:
        images, labels = images[:n], labels[:n]
    return ImageSet(_resize(images, size), labels, [str(c) for c in range(10)], "digits")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size) + 0.5
    return np.meshgrid(c, c, indexing="xy")  # xs, ys: pixel centres


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape of radius ``r`` centred at (cx, cy)."""
    xs, ys = _grid(size)
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "triangle":  # apex up: the half-width grows from 0 at the top to r at the bottom
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if kind == "cross":
        arm = max(r / 3, 0.75)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape '{kind}'")


def _place(rng: np.random.Generator, size: int, r: float, taken: list[tuple[float, float, float]], gap: float) -> tuple[float, float]:
    """A centre for a shape of radius r inside the image, at least ``gap`` x the radii from the taken ones
    (the last try is kept if none fits)."""
    for _ in range(50):
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if all(math.hypot(cx - x, cy - y) >= gap * (r + q) for x, y, q in taken):
            break
    return float(cx), float(cy)


@IMAGE_SETS.register("shapes")
def shapes(size: int | None = None, n: int | None = None, seed: int = 0) -> ImageSet:
    size, n = size or 32, n or 3000
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, size, size), np.float32)
    labels, counts, quadrant = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i in range(n):
        kind = int(rng.integers(len(SHAPES)))
        k = int(rng.integers(1, 4))
        img = np.broadcast_to(rng.uniform(0.0, 0.2, size=(3, 1, 1)), (3, size, size)).copy()
        taken: list[tuple[float, float, float]] = []
        for j in range(k):
            r = float(rng.uniform(0.14, 0.22) * size)
            cx, cy = _place(rng, size, r, taken, 1.05)
            taken.append((cx, cy, r))
            colour = rng.uniform(0.35, 1.0, size=3)
            img[:, shape_mask(SHAPES[kind], cx, cy, r, size)] = colour[:, None]
            if j == 0:
                quadrant[i] = int(cy >= size / 2) * 2 + int(cx >= size / 2)
        images[i], labels[i], counts[i] = img, kind, k
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), list(SHAPES), "shapes",
                    extra={"count": torch.from_numpy(counts), "quadrant": torch.from_numpy(quadrant)})


@IMAGE_SETS.register("sprites")
def sprites(size: int | None = None, n: int | None = None, seed: int = 0) -> ImageSet:
    size, n = size or 32, n or 3000
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        k = int(rng.integers(2, 5))
        img = np.zeros((3, size, size), np.float32)
        taken: list[tuple[float, float, float]] = []
        for j in range(k):
            r = float(rng.uniform(0.12, 0.2) * size)
            cx, cy = _place(rng, size, r, taken, 0.8)  # overlaps allowed: later objects occlude
            taken.append((cx, cy, r))
            m = shape_mask(SHAPES[int(rng.integers(3))], cx, cy, r, size)
            img[:, m] = np.array(PALETTE[int(rng.integers(len(PALETTE)))], np.float32)[:, None]
            masks[i][m] = j + 1
        images[i], labels[i] = img, k - 2
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), ["2 objects", "3 objects", "4 objects"], "sprites",
                    masks=torch.from_numpy(masks))


def folder(path: str | Path, size: int | None = None, n: int | None = None, seed: int = 0, channels: int = 3) -> ImageSet:
    """A folder of class sub-folders of images, read with Pillow, resized to ``size`` (default 32),
    grey when ``channels`` is 1."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise AdlError(f"image folder {root} does not exist (or is not a folder)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise AdlError(f"image folder {root} needs one sub-folder per class (at least 2), found {len(classes)}")
    size = size or 32
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise AdlError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise AdlError(f"cannot read image {f}: {e}") from None
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(c)
    order = np.random.default_rng(seed).permutation(len(labels))[: n or None]
    return ImageSet(torch.from_numpy(np.stack(images)[order]), torch.tensor(labels)[order], classes, root.name)


def load_images(source: str, *, size: int | None = None, n: int | None = None, seed: int = 0) -> ImageSet:
    """A built-in set by name, or ``folder:PATH`` / an existing folder."""
    if source.startswith("folder:"):
        return folder(source[len("folder:"):], size, n, seed)
    if source not in IMAGE_SETS and ("/" in source or Path(source).is_dir()):
        return folder(source, size, n, seed)
    if size is not None and not 4 <= size <= 512:
        raise AdlError(f"image size must be in 4..512, got {size}")
    return IMAGE_SETS.get(source)(size=size, n=n, seed=seed)


def split(data: ImageSet, fractions: tuple[float, float] = (0.1, 0.2), seed: int = 0) -> Splits:
    """(train, val, test): each class's images shuffled with ``seed`` and cut so that val and test
    take ``fractions`` of it (at least one image each where the class has three)."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in torch.unique(data.labels).tolist():
        idx = torch.nonzero(data.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = max(int(round(fractions[0] * len(idx))), 1 if len(idx) >= 3 else 0)
        n_test = max(int(round(fractions[1] * len(idx))), 1 if len(idx) >= 3 else 0)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    train, val, test = (data.subset(torch.cat(p).sort().values) for p in parts)
    return Splits(train, val, test)


@dataclass
class Augment:
    """Training-time augmentations, each off at its default; applied in this order to a batch."""

    flip: bool = False  # horizontal flip with probability 1/2 (not for digits: a mirrored 3 is no 3)
    crop_pad: int = 0  # pad by this many pixels (edge values) and crop back at a random offset
    shift: int = 0  # roll by up to this many pixels each way (wrapping round)
    noise: float = 0.0  # Gaussian noise of this standard deviation
    blur: float = 0.0  # probability of a 3x3 Gaussian blur (sigma 1)
    jitter: float = 0.0  # brightness and contrast each scaled by a factor in [1 - j, 1 + j]

    def validate(self) -> None:
        if self.crop_pad < 0 or self.shift < 0:
            raise ValueError(f"augment.crop_pad and augment.shift must be >= 0, got {self.crop_pad} and {self.shift}")
        if self.noise < 0 or not 0 <= self.blur <= 1 or not 0 <= self.jitter < 1:
            raise ValueError("augment.noise must be >= 0, augment.blur in [0, 1] and augment.jitter in [0, 1)")

    @property
    def active(self) -> bool:
        return bool(self.flip or self.crop_pad or self.shift or self.noise or self.blur or self.jitter)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        if self.flip:
            flip = torch.rand(b, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        if self.shift:
            x = random_shift(x, self.shift, gen)
        if self.blur:
            pick = torch.rand(b, generator=gen) < self.blur
            x = torch.where(pick[:, None, None, None], gaussian_blur(x), x)
        if self.jitter:
            bright = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * self.jitter
            contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * self.jitter
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean) * bright
        if self.noise:
            x = x + torch.randn(x.shape, generator=gen) * self.noise
        return x.clamp(0, 1)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Each image padded by ``pad`` (edge values) and cropped back to its size at a random offset."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, x.shape[1], h, w)
    return cropped.gather(3, cols)


def random_shift(x: torch.Tensor, most: int, gen: torch.Generator) -> torch.Tensor:
    """Each image rolled by its own offset in [-most, most] on each axis."""
    b, _, h, w = x.shape
    dy = torch.randint(-most, most + 1, (b,), generator=gen)
    dx = torch.randint(-most, most + 1, (b,), generator=gen)
    rows = ((torch.arange(h)[None] - dy[:, None]) % h)[:, None, :, None].expand(x.shape)
    cols = ((torch.arange(w)[None] - dx[:, None]) % w)[:, None, None, :].expand(x.shape)
    return x.gather(2, rows).gather(3, cols)


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A 3x3 Gaussian blur per channel (edges replicated)."""
    t = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k1[:, None] * k1[None]) / (k1.sum() ** 2)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).to(x.dtype), groups=c)


def multi_crop(x: torch.Tensor, gen: torch.Generator, *, crops: tuple[tuple[int, float, float], ...] = ((2, 0.5, 1.0), (4, 0.2, 0.5)),
               out_sizes: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """Views for self-supervised learning: for each (count, min_area, max_area) that many random
    crops covering that share of the image, resized back to the image size (or ``out_sizes``, one a
    group)."""
    b, _, h, w = x.shape
    views = []
    for g, (count, lo, hi) in enumerate(crops):
        size = out_sizes[g] if out_sizes else h
        for _ in range(count):
            area = lo + (hi - lo) * torch.rand(b, generator=gen)
            side = (area.sqrt() * h).clamp(2, h).round().long()
            out = []
            for i in range(b):
                s = int(side[i])
                y0 = int(torch.randint(0, h - s + 1, (1,), generator=gen))
                x0 = int(torch.randint(0, w - s + 1, (1,), generator=gen))
                out.append(F.interpolate(x[i:i + 1, :, y0:y0 + s, x0:x0 + s], size=(size, size), mode="bilinear", align_corners=False))
            views.append(torch.cat(out))
    return views
