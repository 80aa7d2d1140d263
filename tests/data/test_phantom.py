"""The embedded phantom cohort: files, geometry, labels, site effects, determinism, resume."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aldm_fed.config import compose
from aldm_fed.data.manifest import read_manifest
from aldm_fed.data.phantom import (
    MODALITIES,
    CohortSummary,
    PhantomConfig,
    case_grade,
    make_cohort,
    simulate_case,
)

SUFFIXES = (*MODALITIES, "seg")
# Site C's profile before 2026-12-08 (when it gained the stronger domain gap of issue #17).
OLD_C = {"t2f": {"tr_ms": 11000.0, "te_ms": 90.0, "ti_ms": 2800.0}, "bias": 0.20, "noise": 0.035, "slice_mm": 3.0,
         "strip_margin_mm": 0.0}


@pytest.fixture(scope="session")
def tiny_cfg() -> PhantomConfig:
    return PhantomConfig.from_mapping(compose(["phantom=tiny"]).phantom)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory, tiny_cfg: PhantomConfig) -> tuple[Path, CohortSummary]:
    """One tiny cohort (3 sites, 16 cases at 4 mm), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    return out, make_cohort(out, tiny_cfg, seed=0, progress=False)


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(root: Path, site: str, cid: str, suffix: str) -> nib.Nifti1Image:
    return nib.load(str(root / site / cid / f"{cid}-{suffix}.nii.gz"))


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(root.glob("*/PH-*/*.nii.gz"))}


def test_configs_compose_and_match_code_defaults():
    default = PhantomConfig.from_mapping(compose([]).phantom)
    assert default.to_dict() == PhantomConfig().to_dict()  # the YAML documents the real defaults
    full = PhantomConfig.from_mapping(compose(["phantom=full"]).phantom)
    assert full.resolution_mm == 1.0 and full.k == 16
    assert all(s.n_target == 16 for s in full.sites)
    tiny = PhantomConfig.from_mapping(compose(["phantom=tiny", "phantom.sites.C.n_test=3"]).phantom)
    assert tiny.site("C").n_test == 3 and {s.name for s in tiny.sites} == {"A", "B", "C"}
    assert PhantomConfig.from_mapping(tiny.to_dict()) == tiny  # to_dict round-trips


def test_files_names_and_geometry(cohort, tiny_cfg):
    root, summary = cohort
    assert summary.sites == ["A", "B", "C"] and summary.skipped == []
    assert summary.n_cases == {s.name: s.n_cases for s in tiny_cfg.sites}
    rows = _labels(root)
    assert len(rows) == sum(summary.n_cases.values())
    assert len({r["case_id"] for r in rows}) == len(rows)  # unique across sites
    for r in rows:
        cid, site = r["case_id"], r["site"]
        assert cid.startswith(f"PH-{site}-") and len(cid.split("-")[-1]) == 4
        assert sorted(p.name for p in (root / site / cid).iterdir()) == sorted(f"{cid}-{s}.nii.gz" for s in SUFFIXES)
        for suffix in SUFFIXES:
            img = _load(root, site, cid, suffix)
            assert img.shape == (60, 60, 39)  # the 240 x 240 x 155 mm BraTS box at 4 mm
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert np.allclose(nib.affines.voxel_sizes(img.affine), 4.0)
            assert img.get_data_dtype() == (np.uint8 if suffix == "seg" else np.int16)
        seg = np.asarray(_load(root, site, cid, "seg").dataobj)
        t1 = np.asarray(_load(root, site, cid, "t1n").dataobj)
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        assert (seg > 0).any() and t1.max() > 100 and t1.min() == 0  # a tumour; skull-stripped
        assert not ((seg > 0) & (t1 == 0)).any()  # tumour only inside the brain


def test_labels_follow_grade(cohort):
    root, _ = cohort
    lgg_without_et = 0
    rows = _labels(root)
    for r in rows:
        seg = np.asarray(_load(root, r["site"], r["case_id"], "seg").dataobj)
        counts = np.bincount(seg.ravel(), minlength=4)
        if r["grade"] == "HGG":
            assert all(counts[1:] > 0), (r["case_id"], counts)  # necrosis, oedema, enhancing rim
        else:
            assert counts[1] > 0 and counts[2] > 0
            assert counts[3] <= 0.05 * counts[1:].sum(), (r["case_id"], counts)  # at most a small focus
            lgg_without_et += counts[3] == 0
    assert lgg_without_et > 0.5 * sum(r["grade"] == "LGG" for r in rows)


def test_grades_balanced_per_site(cohort):
    root, _ = cohort
    per_site: dict[str, Counter[str]] = {}
    for r in _labels(root):
        per_site.setdefault(r["site"], Counter())[r["grade"]] += 1
    assert set(per_site) == {"A", "B", "C"}
    for counts in per_site.values():
        assert abs(counts["HGG"] - counts["LGG"]) <= 1
    # Grades never depend on the site's size: every prefix is balanced.
    grades = [case_grade(i, 0.5) for i in range(10)]
    assert grades[:4] == ["HGG", "LGG", "HGG", "LGG"]
    assert sum(case_grade(i, 0.3) == "HGG" for i in range(10)) == 3


def test_sites_differ_on_the_same_anatomy(tiny_cfg):
    a = simulate_case(tiny_cfg, "A", 0, seed=0)
    b = simulate_case(tiny_cfg, "A", 0, seed=0, profile=tiny_cfg.profiles["B"])
    assert np.array_equal(a.seg, b.seg) and np.array_equal(a.white_matter, b.white_matter)
    wm = a.white_matter
    assert wm.sum() > 200
    for modality in MODALITIES:
        xa, xb = a.images[modality][wm].astype(float), b.images[modality][wm].astype(float)
        # Different integer scale / field strength / sequence: mean white matter far apart...
        assert abs(xa.mean() - xb.mean()) > 0.25 * max(xa.mean(), xb.mean()), modality
        # ...and B (1.5 T, noisy, strong bias, thick slices) is far less uniform than A.
        assert xb.std() / xb.mean() > 1.5 * xa.std() / xa.mean(), modality


def test_a_sites_skull_stripping_can_leave_non_brain_tissue(tiny_cfg):
    # The same case through the same scanner, stripped cleanly and by a pipeline that leaves up to
    # 8 mm of fat and dura: the residue lies outside the brain, within 8 mm of it, and shows on T1
    # and FLAIR; the brain and the tumour mask are untouched.
    import dataclasses

    from scipy import ndimage as ndi

    clean = tiny_cfg.profiles["C"]
    left = dataclasses.replace(clean, strip_margin_mm=8.0)
    a = simulate_case(tiny_cfg, "C", 0, seed=0, profile=clean)
    b = simulate_case(tiny_cfg, "C", 0, seed=0, profile=left)
    assert np.array_equal(a.seg, b.seg)
    brain_a, kept_b = a.images["t1n"] > 0, b.images["t1n"] > 0
    residue = kept_b & ~brain_a
    assert not (brain_a & ~kept_b).any() and residue.sum() > 0.02 * brain_a.sum()
    spacing = tiny_cfg.resolution_mm
    assert (ndi.distance_transform_edt(~brain_a)[residue] * spacing).max() <= 8.0 + spacing
    # Fat (mixed with dark bone): brighter than the brain on T1, and not nulled by FLAIR.
    assert b.images["t1n"][residue].mean() > b.images["t1n"][brain_a].mean()
    assert b.images["t2f"][residue].mean() > 0.5 * b.images["t2f"][brain_a].mean()


def test_a_new_profile_key_at_its_default_keeps_every_case_hash():
    # Cases made before `strip_margin_mm` existed (A, B and the old C profile) keep their hash, so a
    # rerun into an existing cohort folder reuses them instead of refusing them as other settings.
    from aldm_fed.data.phantom.cohort import _case_hash
    from aldm_fed.data.phantom.scanner import DEFAULT_PROFILES

    cfg = PhantomConfig.from_mapping({"profiles": {"C": {"base": "C", **OLD_C}}})
    assert {s: _case_hash(cfg, s, 0, 0) for s in "ABC"} == {
        "A": "cec63e8462b1f6e9", "B": "0e2a57a198ef113c", "C": "a0d2e163eaaba0b1"}  # measured before the key
    assert DEFAULT_PROFILES["A"].strip_margin_mm == DEFAULT_PROFILES["B"].strip_margin_mm == 0.0


def test_contrasts_look_like_mri(tiny_cfg):
    case = simulate_case(tiny_cfg, "A", 0, seed=0)
    seg, wm = case.seg, case.white_matter
    im = {m: case.images[m].astype(float) for m in MODALITIES}
    et = seg == 3
    assert im["t1c"][et].mean() > 1.5 * im["t1c"][wm].mean()  # gadolinium: enhancing rim bright
    assert im["t1n"][et].mean() < im["t1n"][wm].mean()  # ...but not before contrast
    ed = seg == 2
    assert im["t2f"][ed].mean() > 1.2 * im["t2f"][wm].mean()  # FLAIR: oedema bright
    assert im["t2w"][ed].mean() > 1.2 * im["t2w"][wm].mean()


def test_deterministic_from_seed(cohort, tiny_cfg):
    root, _ = cohort
    again = simulate_case(tiny_cfg, "B", 1, seed=0)
    for suffix in SUFFIXES:  # the files hold exactly what a fresh simulation gives
        on_disk = np.asarray(_load(root, "B", "PH-B-0001", suffix).dataobj)
        fresh = again.seg if suffix == "seg" else again.images[suffix]
        assert on_disk.dtype == fresh.dtype and np.array_equal(on_disk, fresh)
    other = simulate_case(tiny_cfg, "B", 1, seed=1)
    assert not np.array_equal(other.images["t2f"], again.images["t2f"])
    # A case depends on (seed, site, index) only, not on how many cases a site has.
    bigger = PhantomConfig.from_mapping({**tiny_cfg.to_dict(), "sites": {"B": {"n_source": 5, "n_test": 5}}})
    assert np.array_equal(simulate_case(bigger, "B", 1, seed=0).images["t1c"], again.images["t1c"])


def test_same_seed_same_cohort(tmp_path, tiny_cfg):
    small = PhantomConfig.from_mapping(
        {**tiny_cfg.to_dict(), "sites": {"C": {"n_target": 1, "n_test": 1}}, "preview_cases": 0}
    )
    make_cohort(tmp_path / "a", small, seed=3, progress=False)
    make_cohort(tmp_path / "b", small, seed=3, progress=False)
    make_cohort(tmp_path / "c", small, seed=4, progress=False)
    for cid in ("PH-C-0000", "PH-C-0001"):
        for suffix in SUFFIXES:
            a, b, c = (np.asarray(_load(tmp_path / x, "C", cid, suffix).dataobj) for x in "abc")
            assert np.array_equal(a, b)
            if suffix != "seg":
                assert not np.array_equal(a, c)
    assert json.loads((tmp_path / "a" / "cohort.json").read_text())["seed"] == 3


def test_resume_skips_complete_cases_and_rebuilds_missing(cohort, tmp_path, tiny_cfg):
    src, _ = cohort
    root = tmp_path / "cohort"
    shutil.copytree(src, root)  # copy2 keeps mtimes
    before = _mtimes(root)
    summary = make_cohort(root, tiny_cfg, seed=0, progress=False)
    assert sorted(summary.skipped) == sorted(r["case_id"] for r in _labels(root))
    assert not [p for p in summary.files_written if p.name.endswith(".nii.gz")]
    assert _mtimes(root) == before

    gone = root / "B" / "PH-B-0002"
    old_seg = np.asarray(_load(root, "B", "PH-B-0002", "seg").dataobj)
    shutil.rmtree(gone)
    (root / "C" / "PH-C-0001" / "PH-C-0001-t2w.nii.gz").unlink()  # an incomplete case folder
    summary = make_cohort(root, tiny_cfg, seed=0, progress=False)
    rebuilt = {p.parent.name for p in summary.files_written if p.name.endswith(".nii.gz")}
    assert rebuilt == {"PH-B-0002", "PH-C-0001"}
    assert np.array_equal(np.asarray(_load(root, "B", "PH-B-0002", "seg").dataobj), old_seg)
    after = _mtimes(root)
    untouched = [p for p in before if p.parent.name not in rebuilt]
    assert all(after[p] == before[p] for p in untouched)


def test_resume_refuses_other_settings(cohort, tmp_path, tiny_cfg):
    src, _ = cohort
    root = tmp_path / "cohort"
    shutil.copytree(src, root)
    before = _mtimes(root)
    changed = PhantomConfig.from_mapping({**tiny_cfg.to_dict(), "profiles": {"A": {"noise": 0.2}}})
    with pytest.raises(ValueError, match="other settings"):
        make_cohort(root, changed, seed=0, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        make_cohort(root, tiny_cfg, seed=1, progress=False)
    assert _mtimes(root) == before  # nothing was overwritten


def test_manifests(cohort, tiny_cfg):
    root, _ = cohort
    rows = _labels(root)
    for site in tiny_cfg.sites:
        path = root / "manifests" / f"{site.name}.json"
        m = read_manifest(path)
        assert m.site == site.name and m.data_root == f"../{site.name}"
        assert m.resolve_root(path) == (root / site.name).resolve()
        sizes = {name: len(m.cases(name)) for name in ("source", "target", "test")}
        assert sizes == {"source": site.n_source, "target": site.n_target, "test": site.n_test}
        ids = [r["case_id"] for r in rows if r["site"] == site.name]
        assert sorted(m.all_cases) == sorted(ids) and len(set(m.all_cases)) == len(ids)  # disjoint
        assert {m.label(c, "grade") for c in m.cases("target")} == {"HGG", "LGG"}  # stratified, k=2
        assert m.k == site.n_target and m.label_column == "grade"


def test_cohort_json_and_previews(cohort, tiny_cfg):
    root, _ = cohort
    meta = json.loads((root / "cohort.json").read_text())
    assert meta["seed"] == 0 and meta["version"]
    assert meta["geometry"]["shape"] == [60, 60, 39] and meta["geometry"]["resolution_mm"] == 4.0
    assert meta["profiles"]["B"]["field_t"] == 1.5
    assert PhantomConfig.from_mapping(meta["config"]) == tiny_cfg
    import matplotlib.image

    for site in ("A", "B", "C"):
        png = root / "previews" / f"{site}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 500
        assert pixels[..., :3].std() > 0.05  # not blank


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"sites": {"A": {"profile": "Z", "n_test": 1}}}, "phantom.sites.A.profile"),
        ({"sites": {"A": {"n_source": -1, "n_test": 1}}}, "phantom.sites.A.n_source"),
        ({"sites": {"A": {"n_sorce": 1, "n_test": 1}}}, "phantom.sites.A.n_sorce"),
        ({"k": 16, "sites": {"A": {"n_cases": 10}}}, "phantom.k"),
        ({"sites": {"A": {"n_target": 12, "n_cases": 10}}}, "phantom.sites.A.n_target"),
        ({"sites": {"A": {"n_target": 2}}}, "phantom.sites.A.n_test"),
        ({"sites": {"A-1": {"n_test": 1}}}, "phantom.sites.A-1"),
        ({"sites": {}}, "phantom.sites"),
        ({"k": -2}, "phantom.k"),
        ({"resolution_mm": 0}, "phantom.resolution_mm"),
        ({"hgg_fraction": 1.5}, "phantom.hgg_fraction"),
        ({"tumour": {"HGG": {"radius_mm": [30, 10]}}}, "phantom.tumour.HGG.radius_mm"),
        ({"tumour": {"core_threshold": 0.1}}, "phantom.tumour.core_threshold"),
        ({"profiles": {"A": {"noise": -0.1}}}, "phantom.profiles.A.noise"),
        ({"profiles": {"A": {"t2f": {"ti_ms": 20000}}}}, "phantom.profiles.A.t2f.ti_ms"),
        ({"profiles": {"D": {"field_t": 7.0}}}, "phantom.profiles.D"),
        ({"profiles": {"D": {"base": "Q"}}}, "phantom.profiles.D.base"),
        ({"resolution": 2.0}, "phantom.resolution"),
    ],
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        PhantomConfig.from_mapping(raw)


def test_new_profile_from_base_and_bad_seed(tmp_path):
    cfg = PhantomConfig.from_mapping(
        {"profiles": {"D": {"base": "B", "field_t": 3.0}}, "sites": {"D": {"profile": "D", "n_test": 1}}}
    )
    assert cfg.profile_of("D").field_t == 3.0 and cfg.profile_of("D").slice_mm == 5.0
    with pytest.raises(ValueError, match="seed"):
        make_cohort(tmp_path, cfg, seed=-1, progress=False)


def test_fewer_cases_keeps_old_folders_and_warns(cohort, tmp_path, tiny_cfg):
    src, _ = cohort
    root = tmp_path / "cohort"
    shutil.copytree(src, root)
    smaller = PhantomConfig.from_mapping({**tiny_cfg.to_dict(), "sites": {"A": {"n_target": 1, "n_test": 1}}})
    with pytest.warns(UserWarning, match="not in this configuration"):
        summary = make_cohort(root, smaller, seed=0, progress=False)
    assert summary.skipped == ["PH-A-0000", "PH-A-0001"]
    assert (root / "A" / "PH-A-0005").is_dir()  # nothing written is deleted
    assert [r["case_id"] for r in _labels(root)] == ["PH-A-0000", "PH-A-0001"]
