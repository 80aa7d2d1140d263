"""`synthesize` end to end with tiny random-weight models on a hand-made 32^3 cache: BraTS folders
with the host's geometry, manifest and label table, montage, resume after a kill, clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.config import compose
from aldm_fed.data.brats import find_cases
from aldm_fed.data.cache import CaseCache, write_cached_case, write_index
from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.diffusion.pipeline import GenerativeModels
from aldm_fed.models import build_controlnet, build_unet, build_vae, vae_downsample_factor
from aldm_fed.synthesis import (
    SynthesisError,
    make_masks,
    sampling_settings,
    synthesis_config,
    synthesize,
)
from aldm_fed.synthesis import run as synthesize_module

S = 32
MODALITIES = ["t1", "t2", "flair"]
CASES = {  # case id -> (tumour centre, radius, labels, voxel size, origin)
    "A-0": ((11, 16, 15), 4.5, (1, 2, 3), 1.0, (-16.0, -20.0, 3.0)),
    "A-1": ((20, 14, 16), 4.0, (2, 3), 1.2, (4.0, -1.0, -7.0)),
    "A-2": ((15, 18, 14), 4.0, (1, 2, 3), 0.9, (-2.5, 6.0, 11.0)),
}
TINY = {"num_samples": 4, "num_steps": 2, "batch_size": 2, "montage_rows": 4,
        "masks": {"scale": [0.9, 1.1], "rotate_deg": 10.0, "elastic_mm": 1.0, "min_voxels": 5}}


def _affine(spacing: float, origin: tuple[float, float, float]) -> np.ndarray:
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[1, :3] = [0.0, spacing * np.cos(0.1), -spacing * np.sin(0.1)]  # a slightly oblique RAS grid
    a[2, :3] = [0.0, spacing * np.sin(0.1), spacing * np.cos(0.1)]
    a[:3, 3] = origin
    return a


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    g = np.indices((S, S, S)).astype(np.float64)
    rng = np.random.default_rng(0)
    for case_id, (centre, radius, labels, spacing, origin) in CASES.items():
        brain = (((g - 15.5) / np.array([13.0, 12.5, 11.5])[:, None, None, None]) ** 2).sum(0) <= 1.0
        d = np.sqrt(((g - np.array(centre, float)[:, None, None, None]) ** 2).sum(0))
        seg = np.zeros((S, S, S), np.uint8)
        for value, frac in zip((2, 3, 1), (1.0, 0.6, 0.3)):
            if value in labels:
                seg[d <= radius * frac] = value
        image = (rng.uniform(0.2, 0.8, (len(MODALITIES), S, S, S)) * brain).astype(np.float32)
        meta = {"modalities": MODALITIES, "affine": _affine(spacing, origin).tolist(), "prep_hash": "h0"}
        write_cached_case(root, case_id, image, seg, brain.astype(np.uint8), meta)
    write_index(root, {"prep_hash": "h0", "modalities": MODALITIES, "size": S, "cases": list(CASES)})
    return root


@pytest.fixture(scope="module")
def models() -> GenerativeModels:
    torch.manual_seed(0)
    cfg = compose(["model/vae=tiny", "model/unet=tiny", "model/controlnet=tiny", "scheduler=ddim"])
    cc = conditioning_config(cfg.model.conditioning)
    latent = int(cfg.model.vae.latent_channels)
    factor = vae_downsample_factor(cfg.model.vae)
    return GenerativeModels(
        vae=build_vae(cfg.model.vae, len(MODALITIES)),
        unet=build_unet(cfg.model.unet, latent, cc.unet_mask_channels),
        controlnet=build_controlnet(cfg.model.unet, cfg.model.controlnet, latent, factor,
                                    mask_channels=cc.mask_channels, unet_mask_channels=cc.unet_mask_channels),
        scale_factor=1.0,
        scheduler_cfg=OmegaConf.to_container(cfg.scheduler),
        conditioning=cc,
        modalities=list(MODALITIES),
        vae_downsample=factor,
        provenance={"vae": "random weights", "path": Path("/nowhere/ckpt")},
    ).eval()


def _run(models, cache_root, out, *, labels=None, progress=False, **over):
    cfg = {**TINY, **over}
    return synthesize(models, CaseCache(cache_root), list(CASES), list(CASES), labels, out, cfg,
                      site="A", seed=0, progress=progress)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def test_synthesize_writes_brats_folders_in_the_host_space(models, cache_root, tmp_path):
    out = tmp_path / "synth"
    labels = {"A-0": "HGG", "A-1": "LGG", "A-2": "HGG"}
    summary = _run(models, cache_root, out, labels=labels, progress=True)
    assert (summary.n_made, summary.n_skipped) == (4, 0)
    assert summary.ids == [f"SYN-A-{i:05d}" for i in range(4)]
    assert json.loads(json.dumps(summary.to_dict()))["n_made"] == 4
    cache = CaseCache(cache_root)
    expected = make_masks(cache, list(CASES), list(CASES), labels, synthesis_config(TINY).masks, seed=0,
                          indices=range(4))
    manifest = json.loads((out / "synthesis.json").read_text())
    assert manifest["complete"] is True and manifest["n_samples"] == 4 and manifest["site"] == "A"
    assert manifest["sampling"]["sampler"] == "ddim" and manifest["sampling"]["num_steps"] == 2
    assert manifest["sampling"]["guidance_scale"] == 3.0
    assert manifest["model"]["provenance"]["path"] == "/nowhere/ckpt"
    for sid, mask, rec in zip(summary.ids, expected, manifest["samples"]):
        folder = out / sid
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted([f"{sid}-t1n.nii.gz", f"{sid}-t2w.nii.gz", f"{sid}-t2f.nii.gz",
                                f"{sid}-seg.nii.gz", "record.json"])  # no t1c: the model has none
        host = cache.load(mask.host_case)
        seg, seg_aff, seg_dtype = _load(folder / f"{sid}-seg.nii.gz")
        assert seg_dtype == np.uint8 and seg.shape == (S, S, S)
        assert np.allclose(seg_aff, host.affine)
        assert np.array_equal(seg, mask.seg)  # the conditioning mask, as make_masks makes it again
        assert set(np.unique(seg)) - {0} == set(np.unique(cache.load(mask.source_case).seg)) - {0}
        for suffix in ("t1n", "t2w", "t2f"):
            img, aff, dtype = _load(folder / f"{sid}-{suffix}.nii.gz")
            assert dtype == np.float32 and img.shape == (S, S, S)
            assert np.allclose(aff, host.affine)
            assert img.min() >= 0.0 and img.max() <= 1.0
            assert np.all(img[np.asarray(host.brain) == 0] == 0)
        assert rec == json.loads((folder / "record.json").read_text())
        assert (rec["synth_id"], rec["source_case"], rec["host_case"]) == (sid, mask.source_case, mask.host_case)
        assert rec["label"] == labels[mask.source_case] and rec["seed"] == 0 and rec["sampler"] == "ddim"
        assert rec["mask"]["transforms"] == mask.to_record()["transforms"]
        assert rec["extra"] == {}
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == summary.ids
    assert all(r["site"] == "A" and r["synthetic"] == "1" for r in rows)
    assert [(r["grade"], r["mask_source"]) for r in rows] == [(labels[m.source_case], m.source_case) for m in expected]
    png = (out / "montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "montage.png") as im:
        assert im.size[0] > 200 and im.size[1] > 200
    found = find_cases(out)  # readable as a BraTS 2023 release
    assert [c.case_id for c in found] == summary.ids and {c.scheme.name for c in found} == {"brats2023"}


def test_resume_after_a_kill_and_a_deleted_case(models, cache_root, tmp_path, monkeypatch):
    out = tmp_path / "synth"
    real_write = synthesize_module.write_synthetic_case
    calls = {"n": 0}

    def killed_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill while writing the third case
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthesize_module, "write_synthetic_case", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(models, cache_root, out)
    monkeypatch.setattr(synthesize_module, "write_synthetic_case", real_write)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["SYN-A-00000", "SYN-A-00001"]
    partial = json.loads((out / "synthesis.json").read_text())
    assert partial["complete"] is False and partial["n_samples"] == 2

    first = _run(models, cache_root, out)
    assert (first.n_made, first.n_skipped) == (2, 2)
    files = sorted(p for p in out.rglob("*.nii.gz"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    image_2 = _load(out / "SYN-A-00002" / "SYN-A-00002-t2f.nii.gz")[0]

    shutil.rmtree(out / "SYN-A-00002")
    (out / ".SYN-A-00003.tmp").mkdir()  # debris of a kill inside atomic_dir
    (out / "synthesis.json").write_text("{")  # and a manifest cut short
    again = _run(models, cache_root, out)
    assert (again.n_made, again.n_skipped) == (1, 3)
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == [f"SYN-A-{i:05d}" for i in range(4)]  # exactly 4, no duplicates or temporaries
    for p, stamp in stamps.items():
        if "SYN-A-00002" not in p.name:
            assert p.stat().st_mtime_ns == stamp, f"{p} was rewritten"
    # same index, same noise: the remade case equals the one that was deleted. It is remade alone,
    # not in its first batch [2, 3], so batched CPU kernels may round differently (~2e-6).
    np.testing.assert_allclose(_load(out / "SYN-A-00002" / "SYN-A-00002-t2f.nii.gz")[0], image_2,
                               rtol=0, atol=1e-5)
    manifest = json.loads((out / "synthesis.json").read_text())
    assert manifest["complete"] is True
    assert [s["synth_id"] for s in manifest["samples"]] == [f"SYN-A-{i:05d}" for i in range(4)]

    more = _run(models, cache_root, out, num_samples=5)  # more samples later: earlier ones kept
    assert (more.n_made, more.n_skipped) == (1, 4)
    with pytest.raises(SynthesisError, match="SYN-A-00000: made with other settings"):
        _run(models, cache_root, out, guidance_scale=1.0)


def test_rflow_model_and_per_mask_count(models, cache_root, tmp_path):
    cfg = compose(["scheduler=rflow"])
    rflow = replace(models, scheduler_cfg=OmegaConf.to_container(cfg.scheduler))
    summary = _run(rflow, cache_root, tmp_path / "rf", num_samples=1, per_mask=1, batch_size=3, montage_rows=0,
                   host="same", masks={"placement": "keep"})
    assert summary.n_made == 3 and summary.montage is None
    manifest = json.loads((tmp_path / "rf" / "synthesis.json").read_text())
    assert manifest["sampling"]["sampler"] == "rflow"
    assert [(s["source_case"], s["host_case"]) for s in manifest["samples"]] == [(c, c) for c in CASES]


def test_sampler_choice(models):
    ddpm = replace(models, scheduler_cfg=OmegaConf.to_container(compose(["scheduler=ddpm"]).scheduler))
    s = sampling_settings(ddpm, synthesis_config({"num_steps": 20}))
    assert s["sampler"] == "ddim" and s["num_steps"] == 20 and "variance_type" not in s["scheduler"]
    with pytest.raises(SynthesisError, match="trained with 'ddim'"):
        sampling_settings(models, synthesis_config({"sampler": "rflow"}))
    with pytest.raises(SynthesisError, match="DDPM samples with all 1000"):
        sampling_settings(models, synthesis_config({"sampler": "ddpm", "num_steps": 20}))


def test_bad_inputs_name_the_culprit(models, cache_root, tmp_path):
    cache = CaseCache(cache_root)
    out = tmp_path / "bad"

    def run(mask_cases, host_cases, m=models, **cfg):
        return synthesize(m, cache, mask_cases, host_cases, None, out, {**TINY, **cfg}, site="A", seed=0,
                          progress=False)

    with pytest.raises(SynthesisError, match="host case 'B-9' is not in the cache"):
        run(["A-0"], ["A-1", "B-9"])
    with pytest.raises(SynthesisError, match="mask_cases is empty"):
        run([], ["A-1"])
    with pytest.raises(SynthesisError, match="modality 'pd' is unknown"):
        run(["A-0"], ["A-1"], m=replace(models, modalities=["t1", "pd", "flair"]))
    with pytest.raises(SynthesisError, match="'A-0' is listed twice"):
        run(["A-0", "A-0"], ["A-1"])
    with pytest.raises(ValueError, match="synthesis.num_step: unknown key"):
        run(["A-0"], ["A-1"], num_step=3)
    assert not out.exists()  # nothing written on a bad input


def _volumes(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix(): np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.rglob("*.nii.gz"))}


def test_cases_do_not_depend_on_the_batch_size(models, cache_root, tmp_path, monkeypatch):
    # Each sample's initial noise comes from (seed, index) alone, so batching changes nothing but
    # the rounding of batched CPU kernels (~2e-6; a batch-dependent noise changes voxels by ~0.5).
    noises: dict[int, dict[int, torch.Tensor]] = {1: {}, 2: {}}
    real_generate = synthesize_module.generate

    def spy(models_, labels_, *, noise=None, **kw):
        for z in noise:
            noises[size][len(noises[size])] = z.clone()
        return real_generate(models_, labels_, noise=noise, **kw)

    monkeypatch.setattr(synthesize_module, "generate", spy)
    for size in (1, 2):
        _run(models, cache_root, tmp_path / f"b{size}", num_samples=3, batch_size=size, montage_rows=0)
    assert noises[1].keys() == noises[2].keys() == {0, 1, 2}
    for i in range(3):
        assert torch.equal(noises[1][i], noises[2][i])
        assert torch.equal(noises[1][i], synthesize_module.sample_noise(0, i, noises[1][i].shape))
    a, b = _volumes(tmp_path / "b1"), _volumes(tmp_path / "b2")
    assert a.keys() == b.keys() and len(a) == 3 * 4
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)
    rec = json.loads((tmp_path / "b1" / "SYN-A-00002" / "record.json").read_text())
    assert rec["noise"] == {"seed_sequence": [0, 2]} and "batch" not in rec


def test_generate_passes_the_conditioning_scale_to_the_sampler(models, monkeypatch):
    from aldm_fed.diffusion import pipeline

    seen: dict[str, float] = {}
    real_sample = pipeline.sample

    def spy(*args, **kwargs):
        seen["scale"] = kwargs["conditioning_scale"]
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sample", spy)
    labels = torch.zeros(1, S, S, S, dtype=torch.long)
    pipeline.generate(replace(models, conditioning_scale=0.25), labels, num_steps=1)
    assert seen["scale"] == 0.25
    pipeline.generate(models, labels, num_steps=1)
    assert seen["scale"] == 1.0  # the default


def test_items_from_synthesis_name_mask_source_and_host(models, cache_root, tmp_path):
    from aldm_fed.evaluation.tasks import check_no_leakage, items_from_synthesis, training_groups

    out = tmp_path / "synth"
    labels = {"A-0": "HGG", "A-1": "LGG", "A-2": "HGG"}
    summary = _run(models, cache_root, out, labels=labels, montage_rows=0)
    items = items_from_synthesis(out, label_map={"HGG": 1, "LGG": 0})
    manifest = json.loads((out / "synthesis.json").read_text())
    assert [it.group for it in items] == summary.ids
    hosts_differ = False
    for it, rec in zip(items, manifest["samples"]):
        assert it.synthetic and it.image.shape == (len(MODALITIES), S, S, S)
        assert set(it.source_groups) == {rec["source_case"], rec["host_case"]}
        hosts_differ |= rec["source_case"] != rec["host_case"]
        assert it.label == {"HGG": 1, "LGG": 0}[labels[rec["source_case"]]]
        assert it.content_key and it.content_key.startswith("record:")
        t2f = np.asarray(nib.load(str(out / it.group / f"{it.group}-t2f.nii.gz")).dataobj)
        assert np.array_equal(it.image[MODALITIES.index("flair")], t2f)
        assert np.array_equal(it.seg, np.asarray(nib.load(str(out / it.group / f"{it.group}-seg.nii.gz")).dataobj))
    assert hosts_differ  # else the host would be indistinguishable from the mask source here
    # A host patient on the test side is leakage, though its mask was never used.
    k, rec = next((k, r) for k, r in enumerate(manifest["samples"]) if r["source_case"] != r["host_case"])
    with pytest.raises(ValueError, match="patient leakage"):
        check_no_leakage(training_groups([items[k]]), [rec["host_case"]])
    with pytest.raises(ValueError, match="not in label_map"):
        items_from_synthesis(out, label_map={"HGG": 1})


def test_a_non_finite_volume_is_refused_before_anything_of_its_batch_is_written(models, cache_root, tmp_path,
                                                                                 monkeypatch):
    """A NaN from the sampler (e.g. a low-precision kernel gone wrong) never becomes a NIfTI file."""
    import aldm_fed.synthesis.run as run_mod

    real_generate = run_mod.generate

    def nan_generate(*args, **kwargs):
        return real_generate(*args, **kwargs) * float("nan")

    monkeypatch.setattr(run_mod, "generate", nan_generate)
    out = tmp_path / "nan"
    with pytest.raises(SynthesisError, match=r"SYN-A-00000.*NaN or inf in fp32; nothing of this batch was written"):
        _run(models, cache_root, out)
    assert not list(out.glob("SYN-A-*/*.nii.gz"))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            SynthesisError, match=r"under torch.bfloat16 autocast.*device.precision=fp32"):
        _run(models, cache_root, out)
