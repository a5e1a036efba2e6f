"""Geometric and photometric transforms against exact references, and worst-case robustness of
classifiers whose robustness is known."""
import json

import pytest
import torch
from torch import nn

from cure_fast.certification.geometric import (DEFAULT_GRID, TRANSFORMS, brightness, contrast,
                                               geometric_robustness, rotate, scale, translate)

EXACT = dict(rtol=0, atol=1e-6)
IDENTITY = {"rotation": [0.0], "translation": [(0, 0)], "scale": [1.0], "brightness": [0.0], "contrast": [1.0]}


@pytest.fixture
def images():
    return torch.rand(3, 2, 7, 7, generator=torch.Generator().manual_seed(0))


def _shift(images, dx, dy):
    """Roll by (dx, dy) = (right, down) pixels with zeros shifted in."""
    out = torch.roll(images, (dy, dx), (-2, -1))
    h, w = images.shape[-2:]
    rows = torch.arange(h) - dy
    cols = torch.arange(w) - dx
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    return out * inside


@pytest.mark.parametrize("family", list(IDENTITY))
def test_identity_transforms_leave_images_unchanged(images, family):
    out = TRANSFORMS[family](images, torch.tensor(IDENTITY[family], dtype=torch.float32))
    assert out.shape == (1, *images.shape)
    torch.testing.assert_close(out[0], images, **EXACT)


def test_quarter_turns_match_rot90(images):
    out = rotate(images, torch.tensor([90.0, -90.0, 180.0]))
    for turned, k in zip(out, (1, -1, 2)):
        torch.testing.assert_close(turned, torch.rot90(images, k, (-2, -1)), **EXACT)


def test_half_turn_of_a_non_square_image_matches_rot90():
    image = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate(image, torch.tensor([180.0]))[0], torch.rot90(image, 2, (-2, -1)), **EXACT)


def test_integer_translations_match_a_roll_with_zero_fill(images):
    shifts = [(1, 0), (0, 2), (-3, 1), (2, -2), (7, 0)]
    out = translate(images, torch.tensor(shifts, dtype=torch.float32))
    for moved, (dx, dy) in zip(out, shifts):
        torch.testing.assert_close(moved, _shift(images, dx, dy), **EXACT)


def test_scaling_keeps_the_centre_and_shrinking_fills_zeros(images):
    small, large = scale(images, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(small[..., 3, 3], images[..., 3, 3], **EXACT)
    torch.testing.assert_close(large[..., 3, 3], images[..., 3, 3], **EXACT)
    assert (small[..., 0, :] == 0).all() and (small[..., :, -1] == 0).all()


def test_brightness_and_contrast_formulas(images):
    shifted = brightness(images, torch.tensor([0.3, -0.3]))
    torch.testing.assert_close(shifted[0], (images + 0.3).clamp(0, 1), **EXACT)
    torch.testing.assert_close(shifted[1], (images - 0.3).clamp(0, 1), **EXACT)
    mean = images.mean((1, 2, 3), keepdim=True)
    stretched = contrast(images, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(stretched[0], (mean + 1.5 * (images - mean)).clamp(0, 1), **EXACT)
    torch.testing.assert_close(stretched[1], mean.expand_as(images), **EXACT)


class Constant(nn.Module):
    def __init__(self, label, classes=3):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), classes).float())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


class CentrePixel(nn.Module):
    """Class 1 when the centre pixel of the first channel is above 1/2, else class 0."""

    def __init__(self):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        h, w = x.shape[-2:]
        score = x[:, 0, h // 2, w // 2] - self.threshold
        return torch.stack([-score, score], 1)


def test_a_constant_classifier_is_fully_robust(images):
    result = geometric_robustness(Constant(2), images, torch.full((3,), 2), batch_size=64)
    assert result["clean"] == result["worst_case"] == 1.0
    assert result["families"] == {family: 1.0 for family in DEFAULT_GRID}
    json.dumps(result)


def test_a_one_pixel_classifier_is_not_robust_to_translations():
    images = torch.zeros(4, 1, 9, 9, dtype=torch.uint8)
    images[:, 0, 4, 4] = 255
    model = CentrePixel().train()
    result = geometric_robustness(model, images, torch.ones(4, dtype=torch.int64), batch_size=100)
    assert model.training
    assert result["clean"] == 1.0
    assert result["families"] == {"rotation": 1.0, "translation": 0.0, "scale": 1.0, "brightness": 1.0,
                                  "contrast": 1.0}
    assert result["worst_case"] == 0.0
    assert all(not s["robust"]["translation"] and s["robust"]["rotation"] for s in result["samples"])


def test_a_float64_model_is_evaluated_in_float64():
    images = torch.zeros(4, 1, 9, 9, dtype=torch.uint8)
    images[:, 0, 4, 4] = 255
    labels = torch.ones(4, dtype=torch.int64)
    model = CentrePixel().double()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    result = geometric_robustness(model, images, labels, batch_size=100)
    assert set(seen) == {torch.float64}
    assert result == geometric_robustness(CentrePixel(), images, labels, batch_size=100)


def test_custom_grid_and_errors(images):
    model = CentrePixel()
    labels = (images[:, 0, 3, 3] > 0.5).long()
    result = geometric_robustness(model, images, labels, grid={"brightness": [0.0]}, batch_size=2)
    assert result["clean"] == result["families"]["brightness"] == result["worst_case"] == 1.0
    assert result["grid"] == {"brightness": [0.0]}
    with pytest.raises(ValueError, match="unknown transform"):
        geometric_robustness(model, images, labels, grid={"shear": [0.1]})
    with pytest.raises(ValueError, match="at least one value"):
        geometric_robustness(model, images, labels, grid={"rotation": []})
