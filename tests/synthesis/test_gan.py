"""The pix2pix GAN baseline (issue #4): networks, training (it fits a case; a crashed run resumes
to the same weights), and its synthesis folder, which must be the layout `aldm-fed synthesize`
writes (read unchanged by the evaluation and the memorisation audit), made from the same masks
and hosts as ALDM's synthesis would use. All on the tiny phantom, fp32 on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import VolumeSet, load_split, site_manifests
from aldm_fed.evaluation.tasks import items_from_synthesis
from aldm_fed.models.gan import build_gan, gan_config
from aldm_fed.synthesis.audit import AUDIT_JSON
from aldm_fed.synthesis.config import synthesis_config
from aldm_fed.synthesis.gan import GAN_GENERATOR, synthesize_gan_site
from aldm_fed.synthesis.masks import make_masks
from aldm_fed.training.artifacts import MissingStageError
from aldm_fed.training.gan import train_gan
from aldm_fed.training.loop import METRICS_FILE
from aldm_fed.training.stages import run_stage

NO_BAR = ["train.gan.progress=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny phantom; site C has 2 target (few-shot) cases."""
    root = tmp_path_factory.mktemp("gan")
    make_cohort(root / "cohort", PhantomConfig.from_mapping(compose(["experiment=tiny"]).phantom), seed=0,
                progress=False)
    return root


def site_cfg(root: Path, *extra: str) -> Any:
    return compose(["experiment=tiny", "device=cpu", "site=C", f"paths.cohort={root / 'cohort'}",
                    f"paths.cache={root / 'cache'}", f"paths.runs={root / 'runs'}", *NO_BAR, *extra])


def target_volumes(root: Path) -> VolumeSet:
    return load_split(site_cfg(root), "target", sites=["C"], progress=False)


# ----------------------------------------------------------------------------------- networks


def test_shapes_range_and_config_errors():
    g, d = build_gan(compose(["experiment=tiny"]).model.gan, image_channels=3)
    seg = torch.zeros(2, 32, 32, 32, dtype=torch.uint8)
    seg[:, 8:14, 8:14, 8:14] = 2
    seg[:, 10:12, 10:12, 10:12] = 3
    cond = g.condition(seg)
    assert cond.shape == (2, 3, 32, 32, 32)  # regions: WT, TC, ET
    assert cond[:, 0].sum() == 2 * 6**3 and cond[:, 2].sum() == 2 * 2**3
    x = g(cond, torch.randn(2, 1, 32, 32, 32))
    assert x.shape == (2, 3, 32, 32, 32) and 0.0 <= float(x.detach().min()) and float(x.detach().max()) <= 1.0
    assert d(torch.cat([cond, x], 1))[-1].shape[:2] == (2, 1)
    with pytest.raises(ValueError, match="noise"):
        g(cond)
    with_brain, _ = build_gan({"channels": [4, 8], "brain_channel": True, "noise_channels": 0}, 3)
    assert with_brain.condition(seg, (seg >= 0)).shape[1] == 4
    with pytest.raises(ValueError, match="brain mask"):
        with_brain.condition(seg)
    for bad, key in (({"colour": 1}, "model.gan.colour"), ({"norm": "group"}, "model.gan.norm"),
                     ({"channels": [8]}, "model.gan.channels")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            gan_config(bad)


def test_each_experiment_gets_its_own_gan_preset_and_it_fits_the_volume():
    """model.gan follows the model.vae preset (configs/config.yaml), and each preset can
    down-sample its experiment's volume edge."""
    for exp, channels in (("tiny", [4, 8, 16]), ("demo", [16, 32, 64, 128]), ("paper", [32, 64, 128, 256, 512])):
        cfg = compose([f"experiment={exp}"])
        gan = gan_config(cfg.model.gan)
        assert list(gan.channels) == channels and int(cfg.data.size) % gan.downsample == 0, exp
        assert cfg.train.gan.lr == 2e-4 and list(cfg.train.gan.betas) == [0.5, 0.999] and cfg.train.gan.l1_weight == 100


# ----------------------------------------------------------------------------------- training


def test_the_gan_overfits_one_case(root, tmp_path):
    """Trained on one case only, its L1 to that case falls markedly (pix2pix loss, both networks):
    to below 0.6x the first steps' in 80 steps (measured: ~0.45x; ~5 s)."""
    one = target_volumes(root).subset([0])
    cfg = site_cfg(root, "train.gan.max_steps=80", "train.gan.ckpt_every=80", "train.gan.lr=5e-3",
                   "model.gan.channels=[8,16,32]")
    result = train_gan(cfg, one, tmp_path / "gan", site="C", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "gan" / METRICS_FILE).read_text().splitlines()]
    l1 = [line["l1"] for line in lines]
    assert len(l1) == 80 and {"adv_g", "adv_d"} <= set(lines[0])
    assert np.mean(l1[-5:]) < 0.6 * np.mean(l1[:5]), (l1[:5], l1[-5:])
    assert result.step == 80 and (tmp_path / "gan" / "final" / "meta.json").is_file()


class _Crashing(VolumeSet):
    """The same cases; the process 'dies' when step `crash_at` draws its batch."""

    crash_at = 5

    def images_batch(self, indices, device="cpu"):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.crash_at + 1:
            raise RuntimeError("killed")
        return super().images_batch(indices, device)


def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_weights(root, tmp_path):
    volumes = target_volumes(root)
    cfg = site_cfg(root, "train.gan.max_steps=8", "train.gan.ckpt_every=2")
    whole = train_gan(cfg, volumes, tmp_path / "whole", site="C", progress=False)
    crashing = _Crashing(**{k: getattr(volumes, k) for k in volumes.__dataclass_fields__})
    with pytest.raises(RuntimeError, match="killed"):
        train_gan(cfg, crashing, tmp_path / "crashed", site="C", progress=False)
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = train_gan(cfg, volumes, tmp_path / "crashed", site="C", progress=False)
    assert resumed.resumed_from == 4 and resumed.step == 8
    from aldm_fed.checkpoints import load_checkpoint

    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for group in ("generator", "disc"):
        for key, tensor in a.tensors[group].items():
            assert torch.equal(tensor, b.tensors[group][key]), f"{group}.{key}"
    assert train_gan(cfg, volumes, tmp_path / "crashed", site="C", progress=False).skipped


# ----------------------------------------------------------------------------------- synthesis


@pytest.mark.slow  # trains 4 steps, synthesizes, runs the audit's feature network: ~50 s on a loaded 2-core machine
def test_gan_stage_and_synthesis_folder_is_read_like_aldm_synthesis(root):
    cfg = site_cfg(root, "train.gan.max_steps=4", "train.gan.ckpt_every=4")
    with pytest.raises(MissingStageError, match="aldm-fed train gan"):
        synthesize_gan_site(cfg, progress=False)
    result = run_stage(cfg, "gan", progress=False)
    assert result.checkpoint == root / "runs" / "sites" / "C" / "gan" / "final"

    summary = synthesize_gan_site(cfg, progress=False)
    out = root / "runs" / "sites" / "C" / "baselines" / "gan"
    n = synthesis_config(cfg.synthesis).total(2)
    assert summary.out_dir == out and summary.n_made == n and summary.montage is not None
    assert summary.montage.is_file() and (out / "labels.csv").is_file() and (out / AUDIT_JSON).is_file()
    assert summary.audit is not None and len(summary.audit.samples) == n
    manifest = json.loads((out / "synthesis.json").read_text())
    assert manifest["generator"] == GAN_GENERATOR and manifest["complete"]
    assert all(s["generator"] == GAN_GENERATOR and s["synth_id"].startswith("GAN-C-") for s in manifest["samples"])

    # The same masks and hosts as ALDM's synthesis (make_masks with the same settings and seed).
    cache = CaseCache(str(cfg.paths.cache))
    _, site_manifest = site_manifests(str(cfg.paths.cohort), ["C"])["C"]
    cases = site_manifest.cases("target")
    syn = synthesis_config(cfg.synthesis)
    labels = {c: site_manifest.label(c) for c in cases}
    aldm_masks = make_masks(cache, cases, cases, labels, syn.masks, seed=int(cfg.seed), indices=range(n),
                            host=syn.host)

    # The evaluation reads it unchanged; every NIfTI has the host's affine and the mask as seg.
    items = items_from_synthesis(out, label_map={"HGG": 1, "LGG": 0})
    assert [it.group for it in items] == summary.ids and all(it.synthetic for it in items)
    for sample, mask, item in zip(manifest["samples"], aldm_masks, items):
        assert (sample["source_case"], sample["host_case"]) == (mask.source_case, mask.host_case)
        host = cache.load(mask.host_case)
        np.testing.assert_array_equal(item.seg, mask.seg)
        assert item.image.shape == (len(cache.modalities), 32, 32, 32)
        assert float(np.abs(item.image * (np.asarray(host.brain) == 0)).max()) == 0.0  # zero outside the host brain
        for name in sample["files"].values():
            np.testing.assert_allclose(nib.load(str(out / sample["synth_id"] / name)).affine, host.affine)

    # Resumable: a rerun keeps every case and makes none.
    again = synthesize_gan_site(cfg, progress=False)
    assert again.n_made == 0 and again.n_skipped == n
