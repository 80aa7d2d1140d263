"""The brain-plausibility check: real cases pass, grey blobs and blotches do not, the tumour is ignored."""

from __future__ import annotations

import numpy as np
import pytest

from aldm_fed.evaluation.plausibility import STAT_MARGIN, RealRange, brain_statistics, outside_tumour

S = 16


def case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (2, S, S, S) in [0, 1], brain mask, seg): a textured ball with a small tumour."""
    rng = np.random.default_rng(seed)
    grid = np.indices((S, S, S)) - S / 2 + 0.5
    brain = (grid**2).sum(0) < (S / 2 - 1) ** 2
    image = np.zeros((2, S, S, S), np.float32)
    image[0][brain] = 0.45 + 0.1 * rng.standard_normal(brain.sum())
    image[1][brain] = 0.30 + 0.08 * rng.standard_normal(brain.sum())
    seg = np.zeros((S, S, S), np.uint8)
    seg[6:9, 6:9, 6:9] = 2
    return np.clip(image, 0, 1), brain, seg


@pytest.fixture
def real() -> RealRange:
    return RealRange.from_cases([case(i) for i in range(4)], dilate=1)


def test_real_cases_lie_inside_their_own_range(real: RealRange):
    assert real.n_cases == 4 and real.lo.shape == real.hi.shape == (2, 2)
    for i in range(4):
        stats = brain_statistics(*case(i), dilate=1)
        assert real.excess(stats) <= 0 and real.outside(stats) == []


def test_a_grey_blob_and_a_blotchy_brain_are_named(real: RealRange):
    image, brain, seg = case(10)
    grey = np.where(brain, 0.05, 0.0)[None].repeat(2, 0)
    bad = real.outside(brain_statistics(grey, brain, seg, dilate=1))
    assert (0, 0) in bad and (1, 0) in bad  # both modalities' means far too low
    blotchy = np.where(np.random.default_rng(0).random((2, S, S, S)) > 0.5, 1.0, 0.0) * brain
    stats = brain_statistics(blotchy, brain, seg, dilate=1)
    assert (0, 1) in real.outside(stats) and real.excess(stats) > STAT_MARGIN  # std ~0.5


def test_the_tumour_and_its_rim_do_not_count(real: RealRange):
    image, brain, seg = case(11)
    near = outside_tumour(brain, seg, dilate=1)
    assert not near[6:9, 6:9, 6:9].any() and not near[5, 7, 7] and near[4, 7, 7]  # tumour + 1-voxel rim
    lit = image.copy()
    lit[:, brain & ~near] = 1.0  # a saturated tumour and rim change nothing
    np.testing.assert_array_equal(brain_statistics(lit, brain, seg, dilate=1),
                                  brain_statistics(image, brain, seg, dilate=1))


def test_no_brain_left_is_an_error():
    image, brain, _ = case(0)
    with pytest.raises(ValueError, match="no brain voxel"):
        brain_statistics(image, brain, brain.astype(np.uint8), dilate=0)
    with pytest.raises(ValueError, match="no real case"):
        RealRange.from_cases([], dilate=1)
    # a real case that is all tumour is left out of the range, not an error
    real = RealRange.from_cases([case(0), (image, brain, brain.astype(np.uint8))], dilate=0)
    assert real.n_cases == 1
