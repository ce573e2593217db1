"""Tests of the synthetic lesion phantoms: exact masks, determinism under a seed, the shortcut marker, 3-D, bad input."""
from __future__ import annotations

import pytest
import torch

from medlens.data.phantom import phantom_2d, phantom_3d, shortcut_set
from medlens.errors import InputError


@pytest.fixture(scope="module")
def set2d():
    return phantom_2d(16, size=64, seed=5)


def test_masks_are_exactly_where_the_lesion_changed_the_image(set2d):
    changed = set2d.images != set2d.backgrounds
    assert torch.equal(changed, set2d.lesion_masks)
    # every lesion case has a non-empty mask, every normal case an empty one
    has = set2d.lesion_masks.flatten(1).any(1)
    assert torch.equal(has, set2d.labels.bool())
    assert 0 < int(set2d.labels.sum()) < len(set2d)
    # the lesion is brighter than the tissue it replaced, everywhere in the mask
    pos = set2d.labels.bool()
    diff = (set2d.images - set2d.backgrounds)[pos]
    assert bool((diff[set2d.lesion_masks[pos]] > 0).all())


def test_lesion_lies_inside_the_head_and_images_are_in_range(set2d):
    assert set2d.images.min() >= 0 and set2d.images.max() <= 1
    assert set2d.images.dtype == torch.float32 and set2d.images.shape == (16, 1, 64, 64)
    # background (outside the head) is dark: the image border carries no lesion and low intensity
    border = torch.ones(64, 64, dtype=torch.bool)
    border[4:-4, 4:-4] = False
    assert not set2d.lesion_masks[:, 0][:, border].any()
    assert float(set2d.images[:, 0][:, border].mean()) < 0.1


def test_deterministic_under_seed_and_case_independent_of_n():
    a, b = phantom_2d(5, size=48, seed=11), phantom_2d(5, size=48, seed=11)
    for field in ("images", "labels", "lesion_masks", "backgrounds"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    c = phantom_2d(3, size=48, seed=11)
    assert torch.equal(a.images[:3], c.images)
    d = phantom_2d(5, size=48, seed=12)
    assert not torch.equal(a.images, d.images)
    # the global RNG is neither used nor disturbed
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    phantom_2d(2, size=32, seed=1)
    assert torch.equal(torch.rand(3), before)


def test_shortcut_marker_tracks_the_class_and_is_exact():
    s = shortcut_set(12, size=48, seed=3)
    assert torch.equal(s.has_marker, s.labels.bool())
    on = s.marker_masks
    assert bool((s.images[on] == 0.7).all())
    # the tag sits in the top-left corner, away from the lesion
    rows, cols = torch.nonzero(on[s.has_marker][0, 0], as_tuple=True)
    assert rows.max() < 48 // 6 and cols.max() < 48 // 6
    assert not (s.marker_masks & s.lesion_masks).any()
    # masks still exact with the marker painted in both image and background
    assert torch.equal(s.images != s.backgrounds, s.lesion_masks)
    # other modes
    r = phantom_2d(80, size=32, seed=4, marker="random")
    agree = float((r.has_marker == r.labels.bool()).float().mean())
    assert 0.3 < agree < 0.7
    assert not phantom_2d(4, size=32, seed=4, marker="never").has_marker.any()
    assert phantom_2d(4, size=32, seed=4, marker="always").has_marker.all()
    flipped = phantom_2d(60, size=32, seed=4, marker="correlated", marker_rate=0.8)
    assert 0.6 < float((flipped.has_marker == flipped.labels.bool()).float().mean()) < 0.95


def test_3d_phantom_masks_exact_and_deterministic():
    v = phantom_3d(4, size=(20, 24, 24), seed=2, positive_rate=0.75)
    assert v.images.shape == (4, 1, 20, 24, 24)
    assert torch.equal(v.images != v.backgrounds, v.lesion_masks)
    assert torch.equal(v.lesion_masks.flatten(1).any(1), v.labels.bool())
    assert torch.equal(phantom_3d(4, size=(20, 24, 24), seed=2, positive_rate=0.75).images, v.images)
    m = phantom_3d(2, size=24, seed=2, marker="always")
    assert m.marker_masks.any() and m.images.shape == (2, 1, 24, 24, 24)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="marker mode"):
        phantom_2d(2, marker="sometimes")
    with pytest.raises(InputError, match="too small"):
        phantom_2d(2, size=8)
    with pytest.raises(InputError, match="3 numbers"):
        phantom_3d(1, size=(16, 16))
    empty = phantom_2d(0, size=32)
    assert empty.images.shape == (0, 1, 32, 32) and len(empty) == 0
