"""Preprocessing invariants and geometry, and the cache (prepare_dataset + CaseCache) on tiny cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nifti_factory import RAS, SHAPE, las, make_case, volumes, write_nifti

from aldm_fed.data.brats import DataError, find_cases, load_case
from aldm_fed.data.cache import CacheError, CaseCache
from aldm_fed.data.preprocess import prep_hash, prepare_dataset, preprocess_case

CID = "BraTS-GLI-00001-000"
BASE = {"spacing": None, "size": 32}


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*np.asarray(ijk, dtype=float), 1.0]))[:3]


@pytest.fixture
def loaded(tmp_path):
    make_case(tmp_path / "src", CID)
    return load_case(find_cases(tmp_path / "src")[0])


def _bbox_centre(mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return (idx.min(0) + idx.max(0)) / 2.0


@pytest.mark.parametrize(
    ("crop", "fit"),
    [("brain", "resize"), ("brain", "pad"), ("tumour", "resize"), ("tumour", "pad"), ("none", "resize")],
)
def test_invariants(loaded, crop, fit):
    S = 32
    out = preprocess_case(loaded, {**BASE, "crop": crop, "fit": fit})
    assert out.image.shape == (4, S, S, S) and out.image.dtype == np.float32
    assert out.seg.shape == out.brain.shape == (S, S, S)
    assert out.seg.dtype == out.brain.dtype == np.uint8
    assert out.image.min() >= 0.0 and out.image.max() <= 1.0 and out.image.max() > 0.9
    assert np.all(out.image[:, out.brain == 0] == 0)
    assert set(np.unique(out.seg)) <= {0, 1, 2, 3} and set(np.unique(out.brain)) <= {0, 1}
    n_src = int(np.count_nonzero(loaded.seg))
    n_out = int(np.count_nonzero(out.seg))
    expected = n_src / np.prod(out.meta["voxel_map"]["scale"])  # voxel volume ratio
    assert expected / 2 < n_out < expected * 2
    if fit == "pad":
        assert n_out == n_src  # native resolution: every tumour voxel kept

    # The cube's affine maps its centre voxel to the crop-box centre in the source's world.
    box = out.meta["crop_box"]
    box_centre = (np.array(box["lo"]) + np.array(box["hi"])) / 2
    tol = 1e-6 if fit == "resize" else 1.0
    np.testing.assert_allclose(_world(out.affine, [(S - 1) / 2] * 3), _world(loaded.affine, box_centre), atol=tol)
    # ... and the tumour sits at the same world position as in the source.
    src_c = _world(loaded.affine, np.argwhere(loaded.seg > 0).mean(0))
    out_c = _world(out.affine, np.argwhere(out.seg > 0).mean(0))
    np.testing.assert_allclose(out_c, src_c, atol=1.0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(6, 40),
    crop=st.sampled_from(["brain", "tumour", "none"]),
    fit=st.sampled_from(["resize", "pad"]),
    spacing=st.sampled_from([None, [1.5, 1.5, 1.5], [0.8, 1.0, 2.0]]),
    margin=st.integers(0, 12),
)
def test_invariants_hold_for_any_settings(loaded, size, crop, fit, spacing, margin):
    cfg = {"size": size, "crop": crop, "fit": fit, "spacing": spacing, "margin": margin}
    out = preprocess_case(loaded, cfg)
    assert out.image.shape == (4, size, size, size) and out.seg.shape == (size,) * 3
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert np.all(out.image[:, out.brain == 0] == 0)
    assert set(np.unique(out.seg)) <= {0, 1, 2, 3}
    if spacing is not None:  # cube voxels keep the requested mm aspect; pad keeps the spacing itself
        ratio = np.array(out.meta["spacing"]) / np.array(spacing)
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
        if fit == "pad":
            np.testing.assert_allclose(ratio, 1.0, rtol=1e-6)
    if crop == "tumour" and fit == "resize":  # the whole tumour is in view and centred
        assert np.count_nonzero(out.seg) > 0
        centre = _world(out.affine, [(size - 1) / 2] * 3)
        src = np.argwhere(loaded.seg > 0)
        np.testing.assert_allclose(centre, _world(loaded.affine, (src.min(0) + src.max(0)) / 2), atol=1e-6)


def test_tumour_crop_centres_the_tumour(tmp_path):
    make_case(tmp_path, CID, centre=(6, 15, 13), radius=3.5)  # off-centre tumour
    lc = load_case(find_cases(tmp_path)[0])
    for fit in ("resize", "pad"):
        out = preprocess_case(lc, {**BASE, "crop": "tumour", "fit": fit, "margin": 2})
        np.testing.assert_allclose(_bbox_centre(out.seg > 0), [15.5] * 3, atol=1.0)
    brain = preprocess_case(lc, {**BASE, "crop": "brain"})
    assert np.abs(_bbox_centre(brain.seg > 0) - 15.5).max() > 3  # the brain crop does not centre it


def test_resize_fills_cube_along_longest_axis(loaded):
    out = preprocess_case(loaded, {**BASE, "crop": "brain", "fit": "resize", "size": 24})
    idx = np.argwhere(out.brain)
    extent = idx.max(0) - idx.min(0) + 1
    assert extent.max() >= 23  # longest brain axis spans the cube
    ratio = extent / extent.max()
    src = np.argwhere(np.any(loaded.image > 0, axis=0))
    src_extent = src.max(0) - src.min(0) + 1
    np.testing.assert_allclose(ratio, src_extent / src_extent.max(), atol=0.1)  # aspect kept


def test_pad_is_an_exact_copy_and_centre_crops_when_larger(loaded):
    out = preprocess_case(loaded, {**BASE, "crop": "brain", "fit": "pad", "size": 16})  # brain ~21 > 16
    scale, offset = (np.array(out.meta["voxel_map"][k]) for k in ("scale", "offset"))
    np.testing.assert_array_equal(scale, 1.0)
    assert np.all(offset == np.round(offset))
    lo = np.argwhere(np.any(loaded.image > 0, axis=0)).min(0)
    hi = np.argwhere(np.any(loaded.image > 0, axis=0)).max(0)
    np.testing.assert_array_equal(offset, lo + np.floor((hi - lo + 1 - 16) / 2))
    o = offset.astype(int)
    np.testing.assert_array_equal(out.seg, loaded.seg[o[0]:o[0] + 16, o[1]:o[1] + 16, o[2]:o[2] + 16])


def test_resample_to_spacing(loaded):
    out = preprocess_case(loaded, {"spacing": [2.0, 2.0, 2.0], "size": 16, "crop": "brain", "fit": "pad"})
    np.testing.assert_allclose(out.meta["spacing"], [2.0, 2.0, 2.0])
    idx = np.argwhere(out.brain)
    src = np.argwhere(np.any(loaded.image > 0, axis=0))
    np.testing.assert_allclose(idx.max(0) - idx.min(0) + 1, (src.max(0) - src.min(0) + 1) / 2, atol=1.5)


def test_intensity_clip_and_scale(loaded):
    out = preprocess_case(loaded, {**BASE, "crop": "none", "fit": "pad", "size": 24, "clip": [0.5, 99.5]})
    inside = out.brain > 0
    for c in range(4):
        vals = out.image[c][inside]
        assert vals.max() == 1.0 and 0 < np.mean(vals == 1.0) < 0.05
        assert np.mean(vals == 0.0) < 0.05
    lo, hi = out.meta["intensity_clip"]["t1"]
    assert lo < hi


def test_las_case_preprocesses_like_ras(tmp_path):
    make_case(tmp_path / "r", CID)
    make_case(tmp_path / "l", CID, affine=las())
    a = preprocess_case(load_case(find_cases(tmp_path / "r")[0]), BASE)
    b = preprocess_case(load_case(find_cases(tmp_path / "l")[0]), BASE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(a.affine, b.affine)


def test_brain_mask_file_is_used(tmp_path):
    folder = make_case(tmp_path, "UCSF-PDGM-0004", "ucsf-pdgm", brain_mask=True)
    imgs, _ = volumes()
    small = np.zeros(SHAPE, np.uint8)
    small[4:20, 4:18, 4:16] = 1
    small &= imgs["t1"] > 0
    write_nifti(folder / "UCSF-PDGM-0004_brain_segmentation.nii.gz", small)
    lc = load_case(find_cases(tmp_path)[0])
    out = preprocess_case(lc, {**BASE, "crop": "none", "fit": "pad", "size": 24})
    assert out.brain.sum() == small.sum()
    assert np.all(out.image[:, out.brain == 0] == 0)
    wide = preprocess_case(lc, {**BASE, "crop": "none", "fit": "pad", "size": 24, "brain_mask": False})
    assert wide.brain.sum() == (imgs["t1"] > 0).sum()


def test_tumour_crop_without_tumour_is_a_data_error(loaded):
    loaded.seg[:] = 0
    with pytest.raises(DataError, match="needs a non-empty tumour mask"):
        preprocess_case(loaded, {**BASE, "crop": "tumour"})


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "COHORT"
    make_case(root / "A", CID)
    make_case(root / "B", "BraTS2021_00002", "brats2021", affine=las())
    bad = make_case(root / "B", "BraTS-GLI-00003-000")
    (bad / "BraTS-GLI-00003-000-t2f.nii.gz").write_bytes(b"garbage")
    return root


def test_prepare_round_trip_resume_and_config_change(tmp_path, cohort):
    cache = tmp_path / "CACHE"
    s = prepare_dataset(cohort, cache, BASE, progress=False)
    assert s.prepared == [CID, "BraTS2021_00002"] and s.skipped == []
    assert list(s.failed) == ["BraTS-GLI-00003-000"] and s.failed["BraTS-GLI-00003-000"][0].code == "unreadable"
    assert json.loads(json.dumps(s.to_dict()))["failed"]["BraTS-GLI-00003-000"][0]["code"] == "unreadable"

    cc = CaseCache(cache)
    assert cc.ids == sorted([CID, "BraTS2021_00002"]) and cc.size == 32 and cc.prep_hash == s.prep_hash
    case = cc.load(CID)
    assert isinstance(case.image, np.memmap) and case.image.shape == (4, 32, 32, 32)
    direct = preprocess_case(load_case(find_cases(cohort / "A")[0]), BASE)
    np.testing.assert_array_equal(case.image, direct.image)
    np.testing.assert_array_equal(case.seg, direct.seg)
    np.testing.assert_allclose(case.affine, direct.affine)
    assert case.meta["prep_hash"] == s.prep_hash and case.meta["scheme"] == "brats2023"
    assert not isinstance(cc.load(CID, mmap=False).image, np.memmap)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left

    mtime = (cache / CID / "image.npy").stat().st_mtime_ns
    again = prepare_dataset(cohort, cache, BASE, progress=False)
    assert again.prepared == [] and sorted(again.skipped) == sorted([CID, "BraTS2021_00002"])
    assert (cache / CID / "image.npy").stat().st_mtime_ns == mtime

    changed = prepare_dataset(cohort, cache, {**BASE, "size": 24, "modalities": ["t1", "t2", "flair"]}, progress=False)
    assert changed.prep_hash != s.prep_hash and changed.skipped == [] and len(changed.prepared) == 2
    cc = CaseCache(cache)
    assert cc.size == 24 and cc.modalities == ("t1", "t2", "flair")
    assert cc.load("BraTS2021_00002").image.shape == (3, 24, 24, 24)


def test_changed_source_file_is_recomputed(tmp_path):
    root = tmp_path / "src"
    folder = make_case(root, CID)
    prepare_dataset(root, tmp_path / "C", BASE, progress=False)
    imgs, _ = volumes()
    write_nifti(folder / f"{CID}-t1n.nii.gz", (imgs["t1"] * 2).astype(np.int16))
    assert prepare_dataset(root, tmp_path / "C", BASE, progress=False).prepared == [CID]


def test_same_size_edit_and_same_id_from_another_cohort_are_recomputed(tmp_path):
    import os
    import shutil

    root = tmp_path / "src"
    folder = make_case(root, CID)
    prepare_dataset(root, tmp_path / "C", BASE, progress=False)
    seg = folder / f"{CID}-seg.nii.gz"
    size, stat = seg.stat().st_size, seg.stat()
    os.utime(seg, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited in place, same size
    assert seg.stat().st_size == size
    assert prepare_dataset(root, tmp_path / "C", BASE, progress=False).prepared == [CID]

    other = tmp_path / "other"  # a second cohort with a case of the same id
    shutil.copytree(root, other)
    assert prepare_dataset(other, tmp_path / "C", BASE, progress=False).prepared == [CID]
    assert str(other) in str(CaseCache(tmp_path / "C").load(CID).meta["source_fingerprint"])


def test_case_ids_subset_and_unknown_id(tmp_path, cohort):
    s = prepare_dataset(cohort, tmp_path / "C", BASE, case_ids=[CID, "nope"], progress=False)
    assert s.prepared == [CID] and s.failed["nope"][0].code == "not-found"
    assert CaseCache(tmp_path / "C").ids == [CID]


def test_corrupt_or_inconsistent_cache_gives_clear_errors(tmp_path, cohort):
    cache = tmp_path / "CACHE"
    with pytest.raises(CacheError, match="cache folder not found"):
        CaseCache(cache)
    prepare_dataset(cohort, cache, BASE, case_ids=[CID, "BraTS2021_00002"], progress=False)

    img = cache / CID / "image.npy"
    img.write_bytes(img.read_bytes()[:1000])  # truncated
    with pytest.raises(CacheError, match=r"image.npy: corrupt array file") as exc:
        CaseCache(cache).load(CID)
    assert str(img) in str(exc.value)
    (cache / "BraTS2021_00002" / "seg.npy").unlink()
    with pytest.raises(CacheError, match=r"BraTS2021_00002: seg.npy missing"):
        CaseCache(cache).load("BraTS2021_00002", mmap=False)

    meta_path = cache / "BraTS2021_00002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["prep_hash"] = "0000"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="does not match index.json"):
        CaseCache(cache).load("BraTS2021_00002")
    with pytest.raises(CacheError, match="not in the index"):
        CaseCache(cache).load("BraTS-GLI-00003-000")

    (cache / "index.json").write_text("{not json")
    with pytest.raises(CacheError, match="index.json: cache index .* not readable JSON"):
        CaseCache(cache)

    # prepare rebuilds cases whose cached arrays are truncated or missing, even with a valid meta.json.
    s = prepare_dataset(cohort, cache, BASE, case_ids=[CID, "BraTS2021_00002"], progress=False)
    assert sorted(s.prepared) == sorted([CID, "BraTS2021_00002"])
    assert CaseCache(cache).load(CID).seg.shape == (32, 32, 32)


def test_prep_hash_tracks_settings():
    assert prep_hash(BASE) == prep_hash({**BASE, "scheme": "brats2023", "affine_tol": 1})  # not cache content
    assert prep_hash(BASE) != prep_hash({**BASE, "clip": [1, 99]})
    assert prep_hash(BASE) != prep_hash({**BASE, "modalities": ["flair", "t1"]})
    assert prep_hash(None) == prep_hash({})


def test_prepare_missing_root_raises(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        prepare_dataset(tmp_path / "nope", tmp_path / "C", BASE, progress=False)


@pytest.mark.parametrize(
    ("shape", "centre", "cfg"),
    [
        (SHAPE, (9, 12, 10), {"spacing": [1.5, 1.5, 1.5], "size": 24, "crop": "brain", "fit": "resize"}),
        ((60, 56, 50), (25, 30, 25), {"spacing": None, "size": 16, "crop": "brain", "fit": "resize"}),  # 3-4x box
        ((60, 56, 50), (25, 30, 25), {"spacing": [1.0, 2.0, 3.0], "size": 32, "crop": "none", "fit": "pad"}),
    ],
)
def test_cube_lines_up_with_source_in_world(tmp_path, shape, centre, cfg):
    """Each cube voxel, taken to world by the cube affine and back into the source, lands on the same tissue."""
    make_case(tmp_path, CID, shape=shape, centre=centre, radius=min(shape) / 5)
    lc = load_case(find_cases(tmp_path)[0])
    out = preprocess_case(lc, cfg)
    S = cfg["size"]
    ijk = np.argwhere(np.ones((S,) * 3, bool))
    world = out.affine @ np.c_[ijk, np.ones(len(ijk))].T
    src = np.rint(np.linalg.inv(RAS) @ world).astype(int)[:3]
    ok = np.all((src >= 0) & (src < np.array(shape)[:, None]), axis=0)
    src_brain = np.zeros(len(ijk), bool)
    src_brain[ok] = (lc.image.max(axis=0) > 0)[tuple(src[:, ok])]
    assert np.mean(src_brain == out.brain.reshape(-1).astype(bool)) > 0.95
    src_c = _world(lc.affine, np.argwhere(lc.seg > 0).mean(0))
    out_c = _world(out.affine, np.argwhere(out.seg > 0).mean(0))
    np.testing.assert_allclose(out_c, src_c, atol=1.0)
