"""The generative core's training stages on the tiny phantom: VAE -> scale -> backbone ->
site ControlNet -> GenerativeModels, with resume, no-op reruns, frozen backbone and clear errors.

Everything runs on CPU in fp32 (`device=cpu`) so resumed runs can be compared bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.config import compose
from aldm_fed.data.manifest import SiteManifest, write_manifest
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import VolumeSet, load_split
from aldm_fed.diffusion.ldm import compute_scale_factor, decode, encode
from aldm_fed.diffusion.pipeline import generate
from aldm_fed.training.artifacts import (
    MissingStageError,
    RunLayout,
    load_backbone_unet,
    load_final,
    load_generative_models,
    load_vae,
)
from aldm_fed.training.backbone import train_backbone
from aldm_fed.training.controlnet import train_controlnet
from aldm_fed.training.latents import LatentSet, encode_volumes
from aldm_fed.training.loop import METRICS_FILE
from aldm_fed.training.scale import LatentStats, latent_statistics, scale_factor_from_stats
from aldm_fed.training.stages import run_stage
from aldm_fed.training.vae import (
    build_perceptual_loss,
    kl_divergence,
    kl_weight_at,
    train_vae,
    vae_section,
)

# A few steps per stage: shapes and plumbing, not quality.
FAST = [
    "train.vae.max_steps=4", "train.vae.ckpt_every=2",
    "train.vae.eval.split=test",  # off by default (configs/train/vae.yaml); these tests check it
    "train.backbone.max_steps=4", "train.backbone.ckpt_every=2",
    "train.controlnet.max_steps=3", "train.controlnet.ckpt_every=2",
]


def make_cfg(overrides: list[str]) -> Any:
    return compose(overrides)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny phantom cohort (3 sites, 16 cases) and one shared preprocessing cache."""
    root = tmp_path_factory.mktemp("stages")
    cfg = make_cfg(["experiment=tiny"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    return root


def tiny_cfg(data_root: Path, runs: Path, *extra: str) -> Any:
    return make_cfg([
        "experiment=tiny", "device=cpu",
        f"paths.cohort={data_root / 'cohort'}", f"paths.cache={data_root / 'cache'}",
        f"paths.runs={runs}", *FAST, *extra,
    ])


@pytest.fixture(scope="module")
def pipeline(data_root: Path) -> dict[str, Any]:
    """All four stages once, for site C (the unseen target hospital)."""
    cfg = tiny_cfg(data_root, data_root / "runs", "site=C")
    results = {stage: run_stage(cfg, stage, progress=False) for stage in ("vae", "scale", "backbone", "controlnet")}
    return {"cfg": cfg, "results": results, "layout": RunLayout.from_cfg(cfg)}


def source_latents(pipeline: dict[str, Any]) -> tuple[LatentSet, float]:
    cfg, layout = pipeline["cfg"], pipeline["layout"]
    vae, _ = load_vae(load_final(layout, "vae"))
    latents = encode_volumes(vae, load_split(cfg, "source", progress=False))
    return latents, float(load_final(layout, "scale").meta["scale_factor"])


def crop16(volumes: VolumeSet) -> VolumeSet:
    """The central 16^3 of each case (VAE steps are ~10x cheaper than at 32^3 on CPU)."""
    box = (slice(None), *(slice(8, 24),) * 3)
    return VolumeSet(
        case_ids=list(volumes.case_ids),
        images=[np.ascontiguousarray(im[box]) for im in volumes.images],
        segs=[np.ascontiguousarray(sg[box[1:]]) for sg in volumes.segs],
        sites=list(volumes.sites), modalities=volumes.modalities, size=16, prep_hash=volumes.prep_hash,
    )


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- configs


def test_stage_sections_compose_without_overwriting_each_other():
    for exp in ("tiny", "demo", "paper"):
        cfg = make_cfg([f"experiment={exp}", "train.vae.max_steps=5"])
        assert cfg.train.vae.max_steps == 5
        assert cfg.train.backbone.max_steps != 5 and cfg.train.controlnet.max_steps != 5
        for stage in ("vae", "backbone", "controlnet"):
            assert {"max_steps", "ckpt_every", "keep_last", "lr", "batch_size"} <= set(cfg.train[stage])
    demo = make_cfg(["experiment=demo", "train.backbone.lr=0.123"])
    assert demo.train.backbone.lr == 0.123 and demo.train.vae.lr != 0.123 and demo.train.controlnet.lr != 0.123
    paper = make_cfg(["experiment=paper"])
    assert list(paper.data.modalities) == ["t1", "t2", "flair"] and paper.data.size == 112
    assert paper.model.vae.latent_channels == 8 and paper.train.backbone.ema_decay == 0.999
    tiny = make_cfg(["experiment=tiny"])
    assert tiny.data.size == 32 and tiny.data.spacing is None and tiny.phantom.resolution_mm == 4.0


# -------------------------------------------------------------------------------------- data


def test_load_split_prepares_missing_cases(data_root: Path, tmp_path: Path):
    cfg = tiny_cfg(data_root, tmp_path / "runs", f"paths.cache={tmp_path / 'cache'}")
    source = load_split(cfg, "source", progress=False)
    assert len(source) == 4 and set(source.sites) == {"A", "B"}  # C has no source cases
    assert source.images_batch([0, 3]).shape == (2, 4, 32, 32, 32)
    assert source.segs_batch([1]).dtype == torch.uint8 and int(source.segs_batch([1]).max()) <= 3
    target = load_split(cfg, "target", sites=["C"], progress=False)
    assert len(target) == 2 and target.sites == ["C", "C"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted(
        source.case_ids + target.case_ids)  # only what was asked for was prepared
    assert len(load_split(cfg, "test", max_cases=3, progress=False)) == 3


# ---------------------------------------------------------------------------------- pipeline


def test_every_stage_writes_its_final_checkpoint(pipeline: dict[str, Any]):
    layout, res = pipeline["layout"], pipeline["results"]
    vae = load_final(layout, "vae")
    assert vae.meta["step"] == 4 and vae.meta["vae_downsample"] == 4 and vae.meta["modalities"] == ["t1", "t1c", "t2", "flair"]
    assert {"psnr", "ssim"} <= set(vae.meta["metrics"]) and math.isfinite(res["vae"].metrics["psnr"])
    doc = json.loads((layout.stage_dir("vae") / "metrics.json").read_text())
    assert doc["evaluation"]["n_cases"] == 2 and len(doc["evaluation"]["cases"]) == 2
    assert res["scale"].metrics["scale_factor"] > 0
    bb = load_final(layout, "backbone")
    assert {"unet", "ema.unet", "controlnet", "ema.controlnet"} <= set(bb.groups)
    assert bb.meta["sources"]["vae"]["sha256"] == vae.meta["weights"]["sha256"]
    cn = load_final(layout, "controlnet", "C")
    assert cn.meta["init"]["kind"] == "source" and cn.meta["site"] == "C" and cn.step == 3
    assert set(cn.groups) == {"controlnet", "ema.controlnet"}  # the frozen UNet is not saved again
    assert cn.meta["sources"]["backbone"]["sha256"] == bb.meta["weights"]["sha256"]
    latents, _ = source_latents(pipeline)
    assert latents.latents.shape == (4, 4, 8, 8, 8)  # 4 source cases, 4 x (32 / 4)^3
    latent_dirs = list((layout.root / "latents").iterdir())
    assert len(latent_dirs) == 1 and len(list(latent_dirs[0].glob("*.npy"))) == 6  # 4 source + 2 target of C
    assert all(r.to_dict()["checkpoint"].endswith("final") for r in res.values())


def test_scale_factor_round_trips(pipeline: dict[str, Any]):
    cfg, layout = pipeline["cfg"], pipeline["layout"]
    factor = float(load_final(layout, "scale").meta["scale_factor"])
    assert float(load_final(layout, "backbone").meta["scale_factor"]) == factor
    assert float(load_final(layout, "controlnet", "C").meta["scale_factor"]) == factor
    models = load_generative_models(cfg, "C")
    assert models.scale_factor == factor
    # Encoding the training set with the stored factor gives unit-std latents...
    source = load_split(cfg, "source", progress=False)
    with torch.no_grad():
        z = torch.cat([encode(models.vae, source.images_batch([i]), factor) for i in range(len(source))])
    assert abs(float(z.std()) - 1.0) < 1e-4
    # ... the mergeable statistics agree with the one-shot formula, across a site split ...
    unscaled = z / factor
    a, b = (LatentStats.of(unscaled[:2]), LatentStats.of(unscaled[2:]))
    assert scale_factor_from_stats(a + b) == pytest.approx(compute_scale_factor(unscaled), rel=1e-6)
    assert LatentStats.from_dict((a + b).to_dict()) == LatentStats.merge([a, b])
    assert latent_statistics(models.vae, source).count == unscaled.numel()
    # ... and ldm.decode divides by the same factor ldm.encode multiplied with.
    with torch.no_grad():
        x = source.images_batch([0])
        mu, _ = models.vae.encode(x)
        z = encode(models.vae, x, factor)
        assert torch.allclose(z, mu * factor)
        assert torch.allclose(decode(models.vae, z, factor), models.vae.decode(mu), atol=1e-5)
        assert not torch.allclose(decode(models.vae, z, 1.0), models.vae.decode(mu), atol=1e-3)


def test_generative_models_bundle_generates_volumes(pipeline: dict[str, Any]):
    cfg = pipeline["cfg"]
    site_models = load_generative_models(cfg, "C")
    assert site_models.provenance["controlnet"]["kind"] == "site"
    assert site_models.provenance["backbone"]["weights"] == "ema"
    labels = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    labels[:, 12:20, 12:20, 12:20] = 2
    labels[:, 14:18, 14:18, 14:18] = 3
    x = generate(site_models, labels, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 32, 32, 32) and torch.isfinite(x).all()
    fallback = load_generative_models(cfg, "B")  # B has no adapted ControlNet
    assert fallback.provenance["controlnet"]["kind"] == "source"
    assert "no adapted ControlNet" in fallback.provenance["controlnet"]["reason"]
    assert load_generative_models(cfg).provenance["controlnet"]["kind"] == "source"


def test_denoising_benchmark_reads_the_trained_run(pipeline: dict[str, Any], data_root: Path, tmp_path: Path):
    """benchmarks/denoising.py on the tiny run: one row per noise level, the JSON written, and an
    epsilon backbone's implied clean latent far worse at the noisiest level than at the cleanest."""
    from benchmarks import denoising

    overrides = ["experiment=tiny", "device=cpu", f"paths.cohort={data_root / 'cohort'}",
                 f"paths.cache={data_root / 'cache'}", f"paths.runs={data_root / 'runs'}", *FAST]
    out = tmp_path / "denoising.json"
    result = denoising.main([*overrides, "--site", "C", "--n", "2", "--out", str(out)])
    rows = result["rows"]
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows) and len(rows) == len(denoising.LEVELS)
    assert all(math.isfinite(r["relative_mse"]) and r["relative_mse"] > 0 for r in rows)
    assert result["scheduler"]["prediction_type"] == "epsilon"
    assert rows[-1]["relative_mse"] > 10 * rows[0]["relative_mse"]
    assert json.loads(out.read_text())["rows"] == rows


def test_rerunning_a_finished_stage_is_a_noop(pipeline: dict[str, Any]):
    cfg, layout = pipeline["cfg"], pipeline["layout"]
    log = layout.stage_dir("vae") / METRICS_FILE
    before = (log.read_text(), (layout.final("vae") / "meta.json").read_text())
    again = run_stage(cfg, "vae", progress=False)
    assert again.skipped and again.step == 4
    assert again.metrics["psnr"] == pipeline["results"]["vae"].metrics["psnr"]
    assert (log.read_text(), (layout.final("vae") / "meta.json").read_text()) == before
    assert run_stage(cfg, "scale", progress=False).skipped


def test_raising_max_steps_continues_a_finished_stage(pipeline: dict[str, Any], data_root: Path):
    # Site A (not used by the other tests): 3 steps, then 5.
    cfg = tiny_cfg(data_root, pipeline["layout"].root, "site=A")
    first = run_stage(cfg, "controlnet", progress=False)
    more = run_stage(tiny_cfg(data_root, pipeline["layout"].root, "site=A",
                              "train.controlnet.max_steps=5"), "controlnet", progress=False)
    assert (first.step, more.resumed_from, more.step, more.skipped) == (3, 3, 5, False)
    assert load_final(pipeline["layout"], "controlnet", "A").step == 5


# ------------------------------------------------------------------------------- properties


def test_vae_overfits_one_case(data_root: Path, tmp_path: Path):
    cfg = tiny_cfg(data_root, tmp_path, "train.vae.max_steps=60", "train.vae.lr=3e-3",
                   "train.vae.ckpt_every=100")
    one = crop16(load_split(cfg, "source", progress=False).subset([0]))
    cfg0 = tiny_cfg(data_root, tmp_path, "train.vae.max_steps=0")
    before = train_vae(cfg0, one, tmp_path / "untrained", eval_volumes=one, progress=False).metrics["psnr"]
    after = train_vae(cfg, one, tmp_path / "trained", eval_volumes=one, progress=False).metrics
    assert after["psnr"] > 16.0 and after["psnr"] > before + 6.0, (before, after)  # 8.4 -> 18.4 dB


def test_resumed_runs_equal_uninterrupted_ones(pipeline: dict[str, Any], data_root: Path, tmp_path: Path):
    # VAE with the adversarial loss switched on at step 1 (two optimizers, a discriminator).
    adv = ["train.vae.adv_weight=0.1", "train.vae.adv_start_step=1", "train.vae.ckpt_every=2",
           "train.vae.disc_layers=2"]
    volumes = crop16(load_split(pipeline["cfg"], "source", progress=False).subset([0, 1]))
    full = tiny_cfg(data_root, tmp_path, *adv, "train.vae.max_steps=4")
    half = tiny_cfg(data_root, tmp_path, *adv, "train.vae.max_steps=2")
    train_vae(full, volumes, tmp_path / "vae_once", progress=False)
    train_vae(half, volumes, tmp_path / "vae_twice", progress=False)
    resumed = train_vae(full, volumes, tmp_path / "vae_twice", progress=False)
    assert resumed.resumed_from == 2 and "adv_d" in json.loads(
        (tmp_path / "vae_twice" / METRICS_FILE).read_text().splitlines()[-1])
    a, b = load_checkpoint(tmp_path / "vae_once" / "final"), load_checkpoint(tmp_path / "vae_twice" / "final")
    assert states_equal(a.tensors["vae"], b.tensors["vae"])
    # Backbone with EMA.
    latents, factor = source_latents(pipeline)
    for name, steps in (("bb_once", [4]), ("bb_twice", [2, 4])):
        for n in steps:
            cfg = tiny_cfg(data_root, tmp_path, f"train.backbone.max_steps={n}")
            train_backbone(cfg, latents, tmp_path / name, scale_factor=factor, progress=False)
    a, b = load_checkpoint(tmp_path / "bb_once" / "final"), load_checkpoint(tmp_path / "bb_twice" / "final")
    for group in ("unet", "controlnet", "ema.unet", "ema.controlnet"):
        assert states_equal(a.tensors[group], b.tensors[group]), group


def test_controlnet_adaptation_keeps_the_backbone_frozen(pipeline: dict[str, Any], tmp_path: Path):
    cfg, layout = pipeline["cfg"], pipeline["layout"]
    bb = load_final(layout, "backbone")
    unet, _ = load_backbone_unet(bb)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    vae, _ = load_vae(load_final(layout, "vae"))
    latents = encode_volumes(vae, load_split(cfg, "target", sites=["C"], progress=False))
    result = train_controlnet(cfg, latents, tmp_path / "cn", unet=unet,
                              scale_factor=float(bb.meta["scale_factor"]), site="C", progress=False)
    assert result.step == 3
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training
    assert states_equal(before, unet.state_dict())  # bit-identical
    trained = load_checkpoint(result.checkpoint).tensors["controlnet"]
    zero_convs = [k for k in trained if k.startswith("controlnet_mid_block")]
    assert zero_convs and any(trained[k].abs().sum() > 0 for k in zero_convs)  # it learned


# ------------------------------------------------------------------------------------ errors


def test_stages_fail_clearly_without_their_inputs(pipeline: dict[str, Any], data_root: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    # No VAE yet: the scale stage names the command and the path.
    with pytest.raises(MissingStageError, match=r"aldm-fed train vae.*first"):
        run_stage(tiny_cfg(data_root, runs), "scale", progress=False)
    # A VAE but no scale factor / backbone.
    shutil.copytree(pipeline["layout"].stage_dir("vae") / "final", runs / "vae" / "final")
    with pytest.raises(MissingStageError, match="aldm-fed train scale"):
        run_stage(tiny_cfg(data_root, runs), "backbone", progress=False)
    with pytest.raises(MissingStageError, match=r"aldm-fed train backbone.*first") as err:
        run_stage(tiny_cfg(data_root, runs, "site=C"), "controlnet", progress=False)
    assert str(runs / "backbone" / "final") in str(err.value)
    # No site, an unknown site, a site without target cases.
    with pytest.raises(ValueError, match="site=<SITE>"):
        run_stage(tiny_cfg(data_root, runs), "controlnet", progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest for site"):
        run_stage(tiny_cfg(data_root, runs, "site=Z"), "controlnet", progress=False)
    cohort = tmp_path / "cohort"
    write_manifest(SiteManifest(site="Z", data_root=str(data_root / "cohort" / "C"),
                                splits={"source": [], "target": [], "test": ["PH-C-0000"]}),
                   cohort / "manifests" / "Z.json")
    with pytest.raises(ValueError, match="site Z has no target"):
        run_stage(tiny_cfg(data_root, runs, "site=Z", f"paths.cohort={cohort}"), "controlnet",
                  progress=False)
    with pytest.raises(ValueError, match="unknown training stage"):
        run_stage(tiny_cfg(data_root, runs), "classifier", progress=False)
    # A config whose root lacks the stage's section (or has only an experiment's partial one).
    partial = OmegaConf.create({"seed": 0, "train": {"vae": {"max_steps": 3}}})
    with pytest.raises(ValueError, match=r"train@train.vae: vae"):
        vae_section(partial)


def test_perceptual_loss_is_off_without_weights_and_refuses_bad_paths(tmp_path: Path):
    loss, note = build_perceptual_loss({"perceptual_weight": 1e-3, "perceptual_weights": None})
    assert loss is None and "off" in note
    with pytest.raises(ValueError, match="no such file"):
        build_perceptual_loss({"perceptual_weight": 1e-3, "perceptual_weights": str(tmp_path / "nope.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="cannot build MONAI's PerceptualLoss"):
        build_perceptual_loss({"perceptual_weight": 1e-3, "perceptual_weights": str(junk)})


def test_kl_term_and_warmup():
    mu, sigma = torch.zeros(1, 4, 2, 2, 2), torch.ones(1, 4, 2, 2, 2)
    assert float(kl_divergence(mu, sigma)) == 0.0
    assert float(kl_divergence(mu + 1, sigma)) == pytest.approx(0.5)  # mean, not sum
    assert [kl_weight_at(s, 1e-4, 4) for s in (0, 2, 4, 9)] == [0.0, 5e-5, 1e-4, 1e-4]
    assert kl_weight_at(0, 1e-4, 0) == 1e-4


def test_volume_set_subsets_share_arrays(pipeline: dict[str, Any]):
    source: VolumeSet = load_split(pipeline["cfg"], "source", progress=False)
    sub = source.subset([2, 0])
    assert sub.case_ids == [source.case_ids[2], source.case_ids[0]] and sub.images[1] is source.images[0]
    assert sub.identity() != source.identity()


def test_perceptual_off_is_logged(data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = tiny_cfg(data_root, tmp_path, "train.vae.max_steps=1")
    volumes = crop16(load_split(cfg, "source", progress=False).subset([0]))
    with caplog.at_level(logging.WARNING, logger="aldm_fed.training.vae"):
        result = train_vae(cfg, volumes, tmp_path / "v1", progress=False)
    assert any("perceptual loss: off" in r.getMessage() for r in caplog.records)
    assert any("perceptual loss: off" in n for n in result.notes)


# ------------------------------------------------------------------- identity and weight pairing


def _copy_runs(pipeline: dict[str, Any], dest: Path) -> Path:
    """The pipeline's VAE, scale and backbone (and latents) in another folder, no site ControlNet."""
    shutil.copytree(pipeline["layout"].root, dest, ignore=shutil.ignore_patterns("sites"))
    return dest


def test_site_controlnet_samples_with_the_backbone_weights_it_was_adapted_to(
    pipeline: dict[str, Any], data_root: Path, tmp_path: Path
):
    runs = _copy_runs(pipeline, tmp_path / "runs")
    cfg = tiny_cfg(data_root, runs, "site=C", "train.controlnet.backbone_weights=raw")
    run_stage(cfg, "controlnet", progress=False)
    cn = load_final(RunLayout(runs), "controlnet", "C")
    assert cn.meta["sources"]["backbone"]["weights"] == "raw"
    bb = load_final(RunLayout(runs), "backbone")
    raw, ema = bb.tensors["unet"], bb.tensors["ema.unet"]
    assert not states_equal(raw, ema)  # else the test could not tell them apart
    for use_ema in (True, False):  # the record pins the UNet; use_ema does not override it
        models = load_generative_models(cfg, "C", use_ema=use_ema)
        assert states_equal(models.unet.state_dict(), raw)
        assert models.provenance["backbone"]["weights"] == "raw"
        assert models.provenance["controlnet"]["weights"] == ("ema" if use_ema else "raw")
    # The source ControlNet (no site record) still follows use_ema.
    assert states_equal(load_generative_models(cfg, "B").unet.state_dict(), ema)
    assert states_equal(load_generative_models(cfg, "B", use_ema=False).unet.state_dict(), raw)


def test_sampling_decodes_with_the_vae_weights_that_encoded_the_latents(pipeline: dict[str, Any]):
    cfg, layout = pipeline["cfg"], pipeline["layout"]
    bb = load_final(layout, "backbone")
    recorded = bb.meta["sources"]["vae"]["weights"]
    vae_ckpt = load_final(layout, "vae")
    assert recorded == ("ema" if "ema.vae" in vae_ckpt.groups else "raw")
    group = "ema.vae" if recorded == "ema" else "vae"
    for use_ema in (True, False):
        models = load_generative_models(cfg, "C", use_ema=use_ema)
        assert states_equal(models.vae.state_dict(), vae_ckpt.tensors[group])
        assert models.provenance["vae"]["weights"] == recorded
    # The latent cache folder names the weights and the precision that encoded it.
    (latent_dir,) = (layout.root / "latents").iterdir()
    assert f"-{recorded}-fp32-" in latent_dir.name


def test_generative_models_carry_the_controlnet_conditioning_scale(pipeline: dict[str, Any]):
    from aldm_fed.models import controlnet_conditioning_scale

    cfg, layout = pipeline["cfg"], pipeline["layout"]
    cn = load_final(layout, "controlnet", "C")
    models = load_generative_models(cfg, "C")
    assert models.conditioning_scale == controlnet_conditioning_scale(cn.meta["model"]["controlnet"])


def test_a_moved_or_absolute_runs_folder_resumes(
    pipeline: dict[str, Any], data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The same runs folder named by a relative path, then by an absolute one, after a move.
    runs = _copy_runs(pipeline, tmp_path / "moved" / "runs")
    shutil.copytree(pipeline["layout"].root / "sites" / "C", runs / "sites" / "C")
    monkeypatch.chdir(tmp_path / "moved")
    for where in ("runs", str(runs)):
        cfg = make_cfg([
            "experiment=tiny", "device=cpu", f"paths.cohort={data_root / 'cohort'}",
            f"paths.cache={data_root / 'cache'}", f"paths.runs={where}", *FAST, "site=C",
            "scheduler.num_inference_steps=7",  # sampling-only: not part of any run's identity
        ])
        for stage in ("vae", "scale", "backbone", "controlnet"):
            assert run_stage(cfg, stage, progress=False).skipped, (where, stage)


def test_latent_cache_reencodes_when_index_disagrees(pipeline: dict[str, Any], tmp_path: Path):
    from aldm_fed.training.latents import latent_cache_key

    cfg, layout = pipeline["cfg"], pipeline["layout"]
    keys = {latent_cache_key("a" * 64, "p", weights=w, precision=pr) for w in ("ema", "raw") for pr in ("fp32", "bf16")}
    assert len(keys) == 4
    vae, _ = load_vae(load_final(layout, "vae"))
    one = load_split(cfg, "source", progress=False).subset([0])
    folder = tmp_path / "latents"
    encode_volumes(vae, one, cache_dir=folder, cache_info={"vae": {"sha256": "s", "weights": "ema"}})
    npy = folder / f"{one.case_ids[0]}.npy"
    np.save(npy, np.zeros_like(np.load(npy)))  # what another encoder would have written
    same = encode_volumes(vae, one, cache_dir=folder, cache_info={"vae": {"sha256": "s", "weights": "ema"}})
    assert float(same.latents.abs().sum()) == 0.0  # matching index: reused as is
    other = encode_volumes(vae, one, cache_dir=folder, cache_info={"vae": {"sha256": "s", "weights": "raw"}})
    assert float(other.latents.abs().sum()) > 0.0  # other weights recorded: encoded again
    assert json.loads((folder / "index.json").read_text())["vae"]["weights"] == "raw"
