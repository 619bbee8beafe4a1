"""The image data layer: the built-in sets are what they say (labels, masks, palette), the split is
fixed, stratified and disjoint, augmentations keep what they should, a user's folder reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adl_cli.data.images import (PALETTE, Augment, gaussian_blur, load_images, multi_crop, random_crop, random_shift, shape_mask,
                                 split)
from adl_cli.errors import AdlError


def test_digits_are_sklearns_and_the_split_is_fixed_stratified_and_disjoint():
    d = load_images("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.min() == 0 and d.images.max() == 1
    a, b = split(d, seed=0), split(load_images("digits"), seed=0)
    assert torch.equal(a.test.images, b.test.images)  # the same split every time
    sizes = len(a.train) + len(a.val) + len(a.test)
    assert sizes == 1797
    flat = [p.images.reshape(len(p), -1) for p in (a.train, a.val, a.test)]
    keys = [{tuple(r.tolist()) for r in f} for f in flat]
    assert sum(len(k) for k in keys) >= 1797 - 10  # a few digits repeat pixel for pixel in the data itself
    for c in range(10):  # every class in every part, in proportion
        n = int((d.labels == c).sum())
        assert abs(int((a.test.labels == c).sum()) - 0.2 * n) <= 1 and abs(int((a.val.labels == c).sum()) - 0.1 * n) <= 1
    up = load_images("digits", size=16)
    assert up.images.shape == (1797, 1, 16, 16)


def test_shapes_labels_match_what_is_drawn():
    s = load_images("shapes", n=60, seed=3)
    assert s.images.shape == (60, 3, 32, 32) and set(s.extra) == {"count", "quadrant"}
    assert torch.equal(load_images("shapes", n=60, seed=3).images, s.images)  # seeded
    for i in range(60):  # the foreground (brighter than the background's 0.2 ceiling in some channel) is there
        assert (s.images[i].amax(0) > 0.3).sum() > 10
    assert set(s.labels.tolist()) <= set(range(5)) and set(s.extra["count"].tolist()) <= {1, 2, 3}


def test_sprites_masks_cover_exactly_the_objects_and_colours_come_from_one_palette():
    s = load_images("sprites", n=50, seed=1)
    assert s.masks.shape == (50, 32, 32)
    fg = s.masks > 0
    assert torch.equal(fg, s.images.amax(1) > 0)  # background black, objects coloured
    colours = {tuple(round(float(v), 3) for v in s.images[i, :, y, x]) for i, y, x in torch.nonzero(fg)[::7].tolist()}
    assert colours <= {tuple(round(c, 3) for c in p) for p in PALETTE}
    for i in range(50):  # each object id's pixels share one colour
        for j in s.masks[i].unique().tolist():
            if j:
                pix = s.images[i][:, s.masks[i] == j]
                assert torch.allclose(pix, pix[:, :1].expand_as(pix))
    same = sum(len({tuple(s.images[i][:, s.masks[i] == j][:, 0].tolist()) for j in s.masks[i].unique().tolist() if j})
               < len(s.masks[i].unique()) - 1 for i in range(50))
    assert same > 5  # colour alone often does not separate the objects


def test_shape_masks():
    circle = shape_mask("circle", 16, 16, 8, 32)
    assert abs(int(circle.sum()) - np.pi * 64) < 12
    ring = shape_mask("ring", 16, 16, 8, 32)
    assert not ring[16, 16] and ring.sum() < circle.sum()
    with pytest.raises(ValueError):
        shape_mask("hexagon", 16, 16, 8, 32)


def test_augmentations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 10, 10)
    assert torch.equal(random_crop(x, 0, g), x)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(1))
    assert torch.allclose(shifted.sum((2, 3)), x.sum((2, 3)))  # a roll moves pixels, keeps them
    flat = torch.full((2, 1, 5, 5), 0.3)
    assert torch.allclose(gaussian_blur(flat), flat)  # a blur keeps a constant image
    crop = random_crop(x, 2, torch.Generator().manual_seed(2))
    assert crop.shape == x.shape
    aug = Augment(flip=True, crop_pad=1, shift=1, noise=0.05, blur=0.5, jitter=0.2)
    y = aug(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, aug(x, torch.Generator().manual_seed(3)))  # a function of the generator
    assert not Augment().active and aug.active
    views = multi_crop(x, torch.Generator().manual_seed(4), crops=((2, 0.5, 1.0), (3, 0.2, 0.4)), out_sizes=(10, 6))
    assert [v.shape[-1] for v in views] == [10, 10, 6, 6, 6]


def test_a_folder_of_class_subfolders_reads_with_pillow(tmp_path):
    from PIL import Image

    for name, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), value + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    d = load_images(f"folder:{tmp_path}", size=8)
    assert d.classes == ["cats", "dogs"] and d.images.shape == (6, 3, 8, 8)
    means = {int(lbl): float(img.mean()) for img, lbl in zip(d.images, d.labels)}
    assert means[0] < 0.2 < 0.7 < means[1]
    (tmp_path / "birds").mkdir()
    with pytest.raises(AdlError, match="holds no images"):
        load_images(str(tmp_path))
    with pytest.raises(AdlError, match="does not exist"):
        load_images(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(AdlError, match="unknown image set"):
        load_images("imagenet")
