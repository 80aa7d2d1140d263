"""Mask augmentation for synthesis: labels kept, tumour inside the host brain, flips mirror,
draws deterministic per (seed, index), case-level labels carried, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from aldm_fed.data.cache import CachedCase
from aldm_fed.synthesis import (
    MaskAugConfig,
    MaskAugmentationError,
    assign_cases,
    augment_mask,
    make_masks,
    mask_aug_config,
    synthesis_config,
)

S = 32
NO_AUG = dict(flip_prob=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate_mm=0.0, elastic_mm=0.0)


def _affine(spacing: float, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = origin
    return a


def _case(centre=(10, 16, 15), radius=5.0, semi=(13.0, 12.0, 11.0), spacing=1.0, origin=(-20.0, -30.0, 5.0),
          labels=(1, 2, 3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seg, brain, affine): an ellipsoidal brain centred in the cube holding a layered tumour."""
    g = np.indices((S, S, S)).astype(np.float64)
    mid = (S - 1) / 2.0
    brain = (((g - mid) / np.array(semi)[:, None, None, None]) ** 2).sum(0) <= 1.0
    d = np.sqrt(((g - np.array(centre, float)[:, None, None, None]) ** 2).sum(0))
    seg = np.zeros((S, S, S), np.uint8)
    for value, frac in zip((2, 3, 1), (1.0, 0.65, 0.3)):
        if value in labels:
            seg[d <= radius * frac] = value
    seg[~brain] = 0
    return seg, brain.astype(np.uint8), _affine(spacing, origin)


class _FakeCache:
    """What make_masks reads from a CaseCache: `load(case_id)`."""

    def __init__(self, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        self.cases = cases
        self.loads = 0

    def load(self, case_id: str) -> CachedCase:
        self.loads += 1
        seg, brain, affine = self.cases[case_id]
        return CachedCase(case_id, np.zeros((1, S, S, S), np.float32), seg, brain, {}, affine)


@pytest.fixture
def cache() -> _FakeCache:
    return _FakeCache({
        "A-0": _case(),
        "A-1": _case(centre=(20, 14, 16), radius=4.0, labels=(2, 3), origin=(5.0, 0.0, 0.0)),
        "A-2": _case(semi=(10.0, 11.0, 9.0), spacing=1.2, origin=(-1.0, 2.0, 3.0)),
    })


def test_identity_transform_reproduces_the_mask():
    seg, brain, aff = _case()
    placed = augment_mask(seg, aff, brain, brain, aff, MaskAugConfig(placement="keep", **NO_AUG), seed=0, index=0)
    assert np.array_equal(placed.seg, seg)
    assert placed.attempts == 1 and placed.transform.flip is False


def test_flip_mirrors_the_tumour_to_the_other_hemisphere():
    seg, brain, aff = _case(centre=(9, 16, 15))
    cfg = MaskAugConfig(placement="keep", **{**NO_AUG, "flip_prob": 1.0})
    placed = augment_mask(seg, aff, brain, brain, aff, cfg, seed=0, index=0)
    assert placed.transform.flip is True
    before = np.argwhere(seg > 0).mean(axis=0)
    after = np.argwhere(placed.seg > 0).mean(axis=0)
    # the brain is centred, so its mid-sagittal plane is the middle of axis 0 (RAS x)
    assert after[0] == pytest.approx(S - 1 - before[0])
    assert after[1:] == pytest.approx(before[1:])
    assert np.array_equal(placed.seg, seg[::-1])  # an exact mirror, labels and all


@pytest.mark.parametrize("placement", ["random", "keep"])
def test_augmented_masks_keep_labels_and_stay_inside_the_host_brain(placement):
    seg, brain, aff = _case()
    h_seg, h_brain, h_aff = _case(semi=(11.0, 12.0, 10.0), spacing=1.1, origin=(3.0, -4.0, 8.0))
    cfg = MaskAugConfig(placement=placement, rotate_deg=20.0, scale=(0.8, 1.2), translate_mm=3.0, elastic_mm=2.0)
    flips = set()
    for index in range(8):
        placed = augment_mask(seg, aff, brain, h_brain, h_aff, cfg, seed=3, index=index, source_name="X", host_name="Y")
        out = placed.seg
        assert out.dtype == np.uint8 and out.shape == h_brain.shape
        assert set(np.unique(out)) == {0, 1, 2, 3}  # no new value, no lost sub-region
        assert np.all(h_brain[out > 0] == 1)
        assert np.count_nonzero(out) >= cfg.min_voxels
        flips.add(placed.transform.flip)
        if placement == "random":
            assert placed.transform.translation_mm is None
    assert flips == {True, False}


def test_size_change_and_physical_size_across_voxel_sizes():
    seg, brain, aff = _case(centre=(16, 16, 16), radius=6.0)
    n0 = np.count_nonzero(seg)
    keep = dict(placement="keep", **NO_AUG)
    big = augment_mask(seg, aff, brain, brain, aff, MaskAugConfig(**{**keep, "scale": (1.3, 1.3)}), seed=0, index=0)
    assert np.count_nonzero(big.seg) / n0 == pytest.approx(1.3**3, rel=0.15)
    # same tumour into a host with 2 mm voxels: same size in mm -> 1/8 of the voxels
    coarse = _affine(2.0, (0.0, 0.0, 0.0))
    placed = augment_mask(seg, aff, brain, brain, coarse, MaskAugConfig(**keep), seed=0, index=0)
    assert np.count_nonzero(placed.seg) / n0 == pytest.approx(1 / 8, rel=0.25)


def test_deterministic_per_seed_and_index(cache):
    cases = ["A-0", "A-1", "A-2"]
    many = make_masks(cache, cases, cases, None, None, seed=7, indices=range(6))
    alone = make_masks(cache, cases, cases, None, None, seed=7, indices=[4])[0]
    assert alone.index == 4
    assert np.array_equal(alone.seg, many[4].seg)
    assert alone.to_record() == many[4].to_record()
    again = make_masks(cache, cases, cases, None, None, seed=7, indices=range(6))
    assert all(np.array_equal(a.seg, b.seg) for a, b in zip(many, again))
    other_seed = make_masks(cache, cases, cases, None, None, seed=8, indices=range(6))
    assert any(not np.array_equal(a.seg, b.seg) for a, b in zip(many, other_seed))
    assert cache.loads == 3 + 2 + 3 + 3  # each case read once per call (source and host share it)


def test_sources_round_robin_hosts_differ_and_labels_are_carried(cache):
    labels = {"A-0": "HGG", "A-1": "LGG"}  # A-2 has no label
    masks = make_masks(cache, ["A-0", "A-1", "A-2"], ["A-0", "A-1", "A-2"], labels, None, seed=0, indices=range(6))
    assert [m.source_case for m in masks] == ["A-0", "A-1", "A-2"] * 2
    assert all(m.host_case != m.source_case for m in masks)
    assert [m.label for m in masks] == ["HGG", "LGG", None] * 2
    for m in masks:
        src_labels = set(np.unique(cache.cases[m.source_case][0])) - {0}
        assert set(m.labels_present) == src_labels  # A-1 has no NCR: none appears
        rec = m.to_record()
        assert rec["source_case"] == m.source_case and rec["host_case"] == m.host_case and rec["label"] == m.label
        assert set(rec["transforms"]) == {"flip_lr", "rotation_deg", "scale", "translation_mm", "elastic"}
    same = make_masks(cache, ["A-0"], ["A-1"], None, None, seed=0, indices=[0], host="same")[0]
    assert same.host_case == "A-0"
    # `other` with the source as the only host falls back to its own brain
    assert assign_cases(["A-0"], ["A-0"], 0, seed=0, host="other") == ("A-0", "A-0")


def test_impossible_augmentation_is_a_clear_error():
    seg, brain, aff = _case(radius=6.0)
    tiny_brain = np.zeros_like(brain)
    tiny_brain[14:18, 14:18, 14:18] = 1
    with pytest.raises(MaskAugmentationError, match=r"'X'.*'Y'.*3 tries.*fits nowhere"):
        augment_mask(seg, aff, brain, tiny_brain, aff, MaskAugConfig(max_tries=3), seed=0, index=0,
                     source_name="X", host_name="Y")
    with pytest.raises(MaskAugmentationError, match="left the brain"):
        augment_mask(seg, aff, brain, tiny_brain, aff, MaskAugConfig(placement="keep", max_tries=2),
                     seed=0, index=0)
    with pytest.raises(MaskAugmentationError, match="vanished"):
        augment_mask(seg, aff, brain, brain, aff, MaskAugConfig(min_voxels=10**6, max_tries=2), seed=0, index=0)
    with pytest.raises(MaskAugmentationError, match="'E'.*no tumour"):
        augment_mask(np.zeros_like(seg), aff, brain, brain, aff, None, seed=0, index=0, source_name="E")
    with pytest.raises(MaskAugmentationError, match="mask_cases: empty"):
        assign_cases([], ["A"], 0, seed=0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="synthesis.masks.sclae: unknown key"):
        mask_aug_config({"sclae": [1, 2]})
    with pytest.raises(ValueError, match="synthesis.masks.scale"):
        mask_aug_config({"scale": [1.2, 0.8]})
    with pytest.raises(ValueError, match="synthesis.masks.placement"):
        synthesis_config({"masks": {"placement": "anywhere"}})
    with pytest.raises(ValueError, match="synthesis.sampler"):
        synthesis_config({"sampler": "euler"})
    assert synthesis_config({"per_mask": 3}).total(4) == 12
    assert synthesis_config(None).masks == MaskAugConfig()
