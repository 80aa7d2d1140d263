"""The memorisation audit (issue #8) on the tiny phantom: near-copies of training cases are flagged,
other patients are not, a real case passed off as synthetic finds itself, the synthesis folder gets
`audit.json`/`audit.csv` (recomputed only when its inputs change), flagged volumes leave classifier
training, and only counts and ratio statistics may leave the site.

No generative model is trained here (except in the one slow test): a "deliberately overfit model"
is EMULATED by volumes that are its training cases plus small noise or moved by one voxel (what a
model that memorised its training set would return), and "fresh samples of a model trained on many
cases" by real phantom cases that are NOT in the reference set (other patients drawn from the same
simulated population). Both stand-ins are said so in each test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.evaluation.report import write_report
from aldm_fed.evaluation.site import METRIC_KEY_PATTERN, evaluate_site
from aldm_fed.federation.sharing import ALLOW_LIST
from aldm_fed.synthesis import case_files, write_labels_csv, write_synthetic_case
from aldm_fed.synthesis import write_manifest as write_syn_manifest
from aldm_fed.synthesis.audit import (
    AUDIT_CSV,
    AUDIT_JSON,
    AUDIT_KEY_PATTERN,
    AuditSettings,
    AuditVolume,
    audit_site,
    audit_volumes,
    image_distances,
    mirror_volume,
    read_audit,
)

CLASSIFIER = [
    "classifier.train.steps=2", "classifier.train.batch_size=8", "classifier.train.progress=false",
    "classifier.seeds=[0]", "classifier.eval.n_boot=10", "classifier.regimes=[syn_only]",
    "classifier.network.alexlite.channels=[4,8,8,8]", "classifier.network.alexlite.hidden=8",
    "classifier.network.alexlite.dropout=0.0", "classifier.network.alexlite.stem_kernel=3",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny phantom (A: 2 source, 2 target, 2 test; B: same; C: 2 target, 2 test), cached."""
    root = tmp_path_factory.mktemp("audit")
    cfg = compose(["experiment=tiny"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    cfg = site_cfg(root)
    for site in "ABC":
        for split in ("source", "target", "test"):
            _, manifest = site_manifests(str(cfg.paths.cohort), [site])[site]
            if manifest.cases(split):
                load_split(cfg, split, sites=[site], progress=False)
    return root


def site_cfg(root: Path, *extra: str) -> Any:
    return compose(["experiment=tiny", "device=cpu", f"paths.cohort={root / 'cohort'}",
                    f"paths.cache={root / 'cache'}", f"paths.runs={root / 'runs'}", *CLASSIFIER, *extra])


def cases(root: Path, site: str, *splits: str) -> list[str]:
    _, manifest = site_manifests(str(root / "cohort"), [site])[site]
    return [c for s in splits for c in manifest.cases(s)]


def volumes(root: Path, ids: list[str]) -> list[AuditVolume]:
    cache = CaseCache(str(root / "cache"))
    return [AuditVolume(c, np.asarray(cache.load(c).image), np.asarray(cache.load(c).brain)) for c in ids]


def noisy_copy(v: AuditVolume, sid: str, sigma: float, seed: int) -> AuditVolume:
    """`v` plus Gaussian noise, clipped to [0, 1] and zero outside its brain, as a memorising model would return it."""
    rng = np.random.default_rng(seed)
    image = np.clip(v.image + rng.normal(0.0, sigma, v.image.shape), 0.0, 1.0) * (np.asarray(v.brain) > 0)
    return AuditVolume(sid, image.astype(np.float32))


# ----------------------------------------------------------------------------------- the three cases


def test_copies_of_training_cases_are_flagged(root):
    """Stand-in for a deliberately overfit model: its 'samples' are its training cases with small
    noise (sigma 0.02 and 0.1 of the [0, 1] range) or moved by one voxel. Every one is flagged, with
    the copied case as its nearest real case."""
    reference = volumes(root, cases(root, "A", "target", "source"))
    synthetic, copied = [], []
    for i, v in enumerate(reference):
        synthetic += [noisy_copy(v, f"SYN-N2-{i}", 0.02, i), noisy_copy(v, f"SYN-N10-{i}", 0.1, i),
                      AuditVolume(f"SYN-S-{i}", np.roll(v.image, 1, axis=1))]
        copied += [v.case_id] * 3
    result = audit_volumes(synthetic, reference)
    assert [s.nearest_case for s in result.samples] == copied
    assert result.flagged_ids == [v.case_id for v in synthetic]
    assert max(s.ratio for s in result.samples) < 0.5 <= min(result.real_ratios)
    # The same rule on the same grid only (max_shift 0) misses the shifted copies: why max_shift is 1.
    same_grid = audit_volumes(synthetic, reference, {**_defaults(), "max_shift": 0, "features": False})
    assert {s.synth_id for s in same_grid.samples if not s.flagged} == {v.case_id for v in synthetic[2::3]}


def test_other_patients_are_mostly_not_flagged(root):
    """Stand-in for fresh samples of a model trained on many cases: real phantom cases NOT in site A's
    reference set (A's held-out test cases and every case of sites B and C), i.e. new patients of the
    same simulated population. At most one in five may be flagged; on this cohort none is."""
    reference = volumes(root, cases(root, "A", "target", "source"))
    others = volumes(root, cases(root, "A", "test") + cases(root, "B", "source", "target", "test")
                     + cases(root, "C", "target", "test"))
    others = [AuditVolume(v.case_id, v.image) for v in others]  # brain from the image, like a synthetic case
    result = audit_volumes(others, reference)
    assert result.settings.mirror  # the default: each reference case also counts mirrored
    assert len(result.samples) == 12
    assert len(result.flagged_ids) <= len(result.samples) // 5
    assert result.summary()["audit.ratio_median"] > 0.5


def test_a_real_case_submitted_as_synthetic_is_flagged_with_itself_as_nearest(root):
    reference = volumes(root, cases(root, "A", "target", "source"))
    victim = reference[1]
    result = audit_volumes([AuditVolume("SYN-A-00000", victim.image)], reference)
    (sample,) = result.samples
    assert sample.flagged and sample.nearest_case == victim.case_id and sample.feature_nearest_case == victim.case_id
    assert sample.distance == pytest.approx(0.0, abs=1e-9) and sample.ratio == pytest.approx(0.0, abs=1e-8)


def test_mirrored_copies_are_flagged_only_with_the_mirror(root):
    """Stand-in for a memorising model given a mirrored mask (the mask augmentation mirrors tumours):
    its 'samples' are its training cases mirrored left-right (a flip of voxel axis 0 of the RAS
    cache, image and brain) plus small noise (sigma 0.02). With `audit.mirror` (the default) each is
    flagged with the copied case as nearest, in both spaces, through its mirrored form; without it
    none is (the same grid sees another patient)."""
    reference = volumes(root, cases(root, "A", "target", "source"))
    mirrored = [noisy_copy(AuditVolume(v.case_id, np.flip(v.image, axis=1), np.flip(v.brain, axis=0)),
                           f"SYN-M-{i}", 0.02, i) for i, v in enumerate(reference)]
    copied = [v.case_id for v in reference]
    on = audit_volumes(mirrored, reference)
    assert on.flagged_ids == [v.case_id for v in mirrored]
    assert [s.nearest_case for s in on.samples] == copied and all(s.nearest_mirrored for s in on.samples)
    assert [s.feature_nearest_case for s in on.samples] == copied
    assert all(s.feature_nearest_mirrored for s in on.samples)
    off = audit_volumes(mirrored, reference, {**_defaults(), "mirror": False})
    assert off.flagged_ids == [] and not any(s.nearest_mirrored or s.feature_nearest_mirrored for s in off.samples)
    assert min(s.ratio for s in off.samples) > 0.5 > max(s.ratio for s in on.samples)


def test_mirror_is_across_the_brain_mid_plane_and_its_own_mirror_never_sets_the_typical_distance():
    """The mirror keeps an off-centre brain in place (x -> lo + hi - x), undoes itself, and a case's
    own mirror is left out of its leave-one-out distance: with perfectly symmetric cases it would be
    0 (typical distance 0, every ratio infinite)."""
    rng = np.random.default_rng(0)
    brain = np.zeros((10, 6, 6), np.uint8)
    brain[1:6, 1:5, 1:5] = 1  # lo 1, hi 5 along the left-right axis: mirror x -> 6 - x
    image = rng.random((2, 10, 6, 6)) * brain
    m = mirror_volume(AuditVolume("a", image, brain))
    assert np.array_equal(m.brain, brain) and np.array_equal(m.image[:, 1:6], image[:, 5:0:-1])
    assert np.array_equal(mirror_volume(m).image, image) and m.case_id == "a~mirrored"

    sym = [AuditVolume(f"s{i}", (x + x[:, ::-1]) * (brain + brain[::-1] > 0), brain + brain[::-1])
           for i, x in enumerate(rng.random((3, 2, 10, 6, 6)))]  # symmetric about the grid's middle
    assert image_distances([sym[0]], [mirror_volume(sym[0])])[0, 0] == pytest.approx(0.0, abs=1e-12)
    result = audit_volumes([], sym, {**_defaults(), "features": False})
    # The own forms are not computed at all, so they take none of the shift search's places either.
    own = np.tile(np.eye(3, dtype=bool), (1, 2))
    d = image_distances(sym, [*sym, *(mirror_volume(v) for v in sym)], max_shift=1, exclude=own)
    assert np.isinf(d[own]).all()
    expected = [min(d[i, j] for j in range(6) if j % 3 != i) for i in range(3)]
    assert result.real_nn_distance == pytest.approx(expected, abs=1e-12) and min(expected) > 0.1


# ----------------------------------------------------------------------------------- the measure


def test_image_distance_is_1_minus_ncc_inside_the_shared_brain():
    rng = np.random.default_rng(0)
    brain = np.zeros((8, 8, 8), bool)
    brain[2:6, 2:6, 2:6] = True
    a = rng.random((2, 8, 8, 8)) * brain
    scaled = AuditVolume("scaled", (3.0 * a + 0.5) * brain, brain)  # a copy up to scale and offset
    other = AuditVolume("other", rng.random((2, 8, 8, 8)) * brain, brain)
    d = image_distances([scaled, other], [AuditVolume("a", a, brain)])
    assert d[0, 0] == pytest.approx(0.0, abs=1e-12)
    expected = 1.0 - np.mean([np.corrcoef(other.image[c][brain], a[c][brain])[0, 1] for c in range(2)])
    assert d[1, 0] == pytest.approx(expected, abs=1e-9)
    # Outside the shared brain nothing counts: garbage there leaves the distance at 0.
    junk = np.where(brain, scaled.image, rng.random((2, 8, 8, 8)))
    assert image_distances([AuditVolume("junk", junk, brain)], [AuditVolume("a", a, brain)])[0, 0] < 1e-12


def _defaults() -> dict[str, Any]:
    return {"enabled": True, "threshold": 0.5, "reference": ["target", "source"], "max_shift": 1,
            "mirror": True, "features": True, "flag_on": "image", "exclude_flagged": True}


def test_settings_validation_names_the_key():
    assert AuditSettings.from_mapping(compose(["experiment=tiny"]).audit) == AuditSettings()
    for bad, key in (({"threshold": 0}, "audit.threshold"), ({"reference": ["test"]}, "audit.reference"),
                     ({"flag_on": "features", "features": False}, "audit.flag_on"),
                     ({"max_shift": -1}, "audit.max_shift"), ({"mirror": "yes"}, "audit.mirror"),
                     ({"colour": 1}, "audit.colour")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            AuditSettings.from_mapping({**_defaults(), **bad})
    with pytest.raises(ValueError, match=">= 2 real reference cases"):
        audit_volumes([], [AuditVolume("x", np.zeros((1, 4, 4, 4)))])


# ------------------------------------------------------------------ a synthesis folder, evaluation


def fake_synthesis(cfg: Any, root: Path) -> tuple[Path, list[str]]:
    """Site A's synthesis folder, in the layout `aldm-fed synthesize` writes: two near-copies of its
    target cases (noise sigma 0.02: what a memorising model returns) and two other patients' scans
    (site B's target cases: stand-ins for fresh samples). Returns the folder and the copies' ids."""
    out = Path(str(cfg.paths.runs)) / "sites" / "A" / "synthesis"
    cache = CaseCache(str(root / "cache"))
    target, fresh = cases(root, "A", "target"), cases(root, "B", "target")
    modalities = list(cache.modalities)
    records, copies = [], []
    for i, case in enumerate([*target, *fresh]):
        sid = f"SYN-A-{i:05d}"
        c = cache.load(case)
        image = noisy_copy(AuditVolume(case, np.asarray(c.image), np.asarray(c.brain)), sid, 0.02, i).image
        if case in target:
            copies.append(sid)
        record = {"synth_id": sid, "index": i, "site": "A", "source_case": target[i % 2], "host_case": target[i % 2],
                  "label": None, "files": case_files(sid, modalities)}
        write_synthetic_case(out, sid, image, np.asarray(c.seg), c.affine, modalities, record)
        records.append(record)
    write_syn_manifest(out, {"complete": True, "site": "A", "model": {"modalities": modalities},
                             "settings": {"label_column": "grade"}}, records)
    write_labels_csv(out, records)
    return out, copies


def test_audit_files_resume_and_evaluation_leaves_flagged_volumes_out(root):
    cfg = site_cfg(root, "site=A")
    out, copies = fake_synthesis(cfg, root)
    result = audit_site(cfg, progress=False)
    assert result is not None and not result.reused and result.flagged_ids == copies
    assert result.reference_cases == cases(root, "A", "target", "source")
    doc = json.loads((out / AUDIT_JSON).read_text())
    assert doc["flagged"] == copies and len(doc["samples"]) == 4
    assert [s["nearest_case"] for s in doc["samples"][:2]] == cases(root, "A", "target")
    assert [s["nearest_mirrored"] for s in doc["samples"][:2]] == [False, False]  # unmirrored copies
    rows = (out / AUDIT_CSV).read_text().splitlines()
    assert rows[0].startswith("synth_id,nearest_case,distance,ratio,nearest_mirrored") and len(rows) == 5
    assert [r.rsplit(",", 1)[1] for r in rows[1:]] == ["1", "1", "0", "0"]

    # Unchanged inputs: read back, not recomputed; other settings: recomputed.
    again = audit_site(cfg, progress=False)
    assert again.reused and again.summary() == result.summary() and again.flagged_ids == copies
    stricter = audit_site(site_cfg(root, "site=A", "audit.threshold=0.001"), progress=False)
    assert not stricter.reused and stricter.flagged_ids == []
    assert read_audit(out).settings.threshold == 0.001
    no_mirror = audit_site(site_cfg(root, "site=A", "audit.mirror=false"), progress=False)
    assert not no_mirror.reused and not read_audit(out).settings.mirror and no_mirror.flagged_ids == copies

    # Evaluation audits the folder (back at the default settings) and trains without the copies.
    evaluation = evaluate_site(cfg, progress=False)
    (row,) = evaluation.rows
    assert row["regime"] == "syn_only" and row["n_train_cases_syn"] == 2
    assert evaluation.n_synthetic_excluded == 2 and evaluation.n_synthetic_cases == 2
    assert any("near-copies" in n and copies[0] in n for n in evaluation.notes)
    metrics = evaluation.metrics()
    assert metrics["n_synthetic_excluded"] == 2 and metrics["audit.n_flagged"] == 2 and metrics["audit.n_audited"] == 4
    # What may leave the site: fixed names only, allowed in the local phase; no id anywhere.
    assert all(METRIC_KEY_PATTERN.fullmatch(k) and ALLOW_LIST["local"].metric_allowed(k) for k in metrics)
    assert {k for k in metrics if k.startswith("audit.")} == set(result.summary())
    assert all(AUDIT_KEY_PATTERN.fullmatch(k) for k in result.summary())
    assert not ALLOW_LIST["local"].metric_allowed(f"audit.{copies[0]}")

    # exclude_flagged=false keeps them (they are still counted as flagged).
    kept = evaluate_site(site_cfg(root, "site=A", "audit.exclude_flagged=false"), progress=False, overwrite=True)
    assert kept.n_synthetic_excluded == 0 and kept.rows[0]["n_train_cases_syn"] == 4
    assert kept.metrics()["audit.n_flagged"] == 2

    # The report shows the audit in its own section, not in the site work table.
    paths = write_report(out.parent / "report", {"A": metrics}, title="t", context={})
    md = paths["md"].read_text()
    section = md.split("## Memorisation audit", 1)[1]
    assert "| A | 4 | 2 | 2 | 0.50 |" in section and "closest real pair" in section
    assert copies[0] not in md
    assert json.loads(paths["json"].read_text())["sites"]["A"]["audit"]["n_flagged"] == 2


def test_audit_off_skips_it(root):
    cfg = site_cfg(root, "site=A", "audit.enabled=false")
    assert audit_site(cfg, progress=False) is None


@pytest.mark.slow
def test_synthesize_site_audits_its_volumes(root):
    """The real synthesis path: tiny models trained for a few steps, `synthesize_site` for site C,
    then `audit.json` is in the synthesis folder and the summary carries the audit."""
    from aldm_fed.synthesis import synthesize_site
    from aldm_fed.training.stages import run_stage

    cfg = site_cfg(root, "site=C", f"paths.runs={root / 'runs-gen'}", "train.vae.max_steps=2",
                   "train.backbone.max_steps=2", "train.controlnet.max_steps=2", "synthesis.num_samples=2",
                   "synthesis.num_steps=2")
    for stage in ("vae", "scale", "backbone", "controlnet"):
        run_stage(cfg, stage, progress=False)
    summary = synthesize_site(cfg, progress=False)
    assert summary.audit is not None and summary.audit.path == summary.out_dir / AUDIT_JSON
    assert summary.audit.path.is_file() and (summary.out_dir / AUDIT_CSV).is_file()
    assert [s.synth_id for s in summary.audit.samples] == summary.ids
    assert summary.audit.reference_cases == cases(root, "C", "target")  # C has no source cases
    assert summary.to_dict()["audit"]["n_audited"] == 2 and "flagged" in summary.to_dict()["audit"]
    assert synthesize_site(cfg, progress=False).audit.reused  # nothing changed: read back

    # benchmarks/plausibility.py reads the same folder: one row per volume, with its host's brain.
    from benchmarks import plausibility

    out = root / "plausibility.json"
    result = plausibility.main([
        "experiment=tiny", "device=cpu", f"paths.cohort={root / 'cohort'}", f"paths.cache={root / 'cache'}",
        f"paths.runs={root / 'runs-gen'}", "--site", "C", "--out", str(out)])
    assert [r["volume"] for r in result["rows"]] == summary.ids and result["real"]["n"] == 16
    assert all(np.isfinite(r["excess"]) and len(r["mean"]) == 4 for r in result["rows"])
    assert json.loads(out.read_text())["n_plausible"] == result["n_plausible"]
    site = plausibility.main([
        "experiment=tiny", "device=cpu", f"paths.cohort={root / 'cohort'}", f"paths.cache={root / 'cache'}",
        f"paths.runs={root / 'runs-gen'}", "--site", "C", "--range", "site", "--reconstructions"])
    n_target = len(cases(root, "C", "target"))
    assert site["real"]["n"] == site["reconstructions"]["n"] == n_target and len(site["rows"]) == 2
