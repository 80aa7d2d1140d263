"""A deliberately overfit model, TRAINED (not emulated), is caught by the memorisation audit (issue #8).

tests/synthesis/test_audit.py emulates a memorising model with noisy copies of training cases; here
the real stages (`run_stage`: VAE, scale, backbone, ControlNet) are trained on a one-site phantom
with 2 source + 2 target cases until they memorise, `synthesize_site` generates with the target
cases' own masks (mask augmentation off, each mask in its own brain), and the audit that
`synthesize_site` runs must flag every sample, with the case whose mask it was given as nearest.
The control that lets the test fail: the SAME pipeline with the diffusion stages barely trained
is not flagged, and its ratios are far higher.

Why this configuration (each choice measured with scratch runs; ratios = the audit's image ratio,
flagged below 0.5):
- 16^3 volumes, one modality (t1): a training step is ~30x cheaper than on the tiny 32^3 x 4 grid,
  where 300 VAE steps alone took minutes and still reconstructed at ratio 0.7-0.95.
- A VAE without downsampling (`model.vae.channels=[8]`): the VAE trains on the SOURCE cases only,
  and a 2x-downsampling one fitted to 2 source cases reconstructs the unseen target cases no
  closer than ratio ~0.4-0.5 (the threshold), so no generator behind it could copy them visibly;
  without downsampling it generalises (target reconstructions at ratio ~0.1 after 400 steps).
- v-prediction: with epsilon prediction the same budget gave samples at ratio ~3.7 (the x0
  estimate at high noise amplifies epsilon errors); with v-prediction 0.6-0.8 after 300 steps.
- No EMA, no condition dropout, guidance 1 (the conditional model only), DDIM 10 steps (25 or 50
  steps gave the same ratios).
- 800 backbone + 800 ControlNet steps: 300 + 1000 gave ratios 0.60-0.73, 400 + 1000 gave
  0.52-0.61 (the backbone's budget matters most), 800 + 1500 gave 0.33-0.35 for 45 s more.
Measured with these settings (2-core machine shared with other jobs, ~165 s for the module):
overfit samples at ratio 0.36-0.40, all flagged, each nearest to its mask's case; the control
(20 diffusion steps) at 2.44-2.56, none flagged, all nearest to one source case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from aldm_fed.config import compose
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.synthesis import synthesize_site
from aldm_fed.synthesis.run import SynthesisSummary
from aldm_fed.training.stages import run_stage

pytestmark = pytest.mark.slow

SITE = "A"
# One site: 2 source cases (VAE + backbone) and K = 2 target cases (the ControlNet's training set).
SITES = {SITE: {"profile": "A", "n_source": 2, "n_target": 2, "n_test": 0}}
MODEL = [
    "data.size=16", "data.modalities=[t1]",
    "model.vae.channels=[8]", "model.vae.attention_levels=[false]",      # no downsampling (see above)
    "model.controlnet.conditioning_embedding_num_channels=[4]",          # mask encoder: 0 stride-2 stages
    "scheduler.prediction_type=v_prediction",
    "model.conditioning.drop_prob=0.0",
]
TRAIN = [
    "train.vae.lr=3e-3", "train.backbone.lr=2e-3", "train.controlnet.lr=2e-3",
    "train.backbone.ema_decay=null", "train.controlnet.ema_decay=null", "train.controlnet.backbone_weights=raw",
    "train.vae.ckpt_every=1000", "train.backbone.ckpt_every=1000", "train.controlnet.ckpt_every=1000",
    "train.vae.progress=false", "train.backbone.progress=false", "train.controlnet.progress=false",
]
SYNTHESIS = [  # the training masks themselves: no augmentation, each in its own brain
    "synthesis.host=same", "synthesis.masks.placement=keep", "synthesis.masks.flip_prob=0.0",
    "synthesis.masks.rotate_deg=0.0", "synthesis.masks.scale=[1.0,1.0]", "synthesis.masks.translate_mm=0.0",
    "synthesis.masks.elastic_mm=0.0",
    "synthesis.masks.min_inside=0.9",  # a real mask pokes a few voxels out of its brain mask at 16^3
    "synthesis.per_mask=2",            # two noise draws per mask: copying must not depend on the noise
    "synthesis.num_steps=10", "synthesis.guidance_scale=1.0", "synthesis.montage_rows=0",
]
VAE_STEPS = 400
OVERFIT_STEPS = 800   # backbone and ControlNet steps that memorise
CONTROL_STEPS = 20    # the same pipeline, diffusion barely trained


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overfit")
    phantom = OmegaConf.to_container(compose(["experiment=tiny"]).phantom, resolve=True)
    make_cohort(root / "cohort", PhantomConfig.from_mapping({**phantom, "sites": SITES}), seed=0, progress=False)
    return root


def run_pipeline(root: Path, runs: str, diffusion_steps: int) -> SynthesisSummary:
    """Train every stage of the generative core in `root/runs`, then synthesize (and audit) site A."""
    cfg = compose(["experiment=tiny", "device=cpu", f"site={SITE}", f"paths.cohort={root / 'cohort'}",
                   f"paths.cache={root / 'cache'}", f"paths.runs={root / runs}", *MODEL, *TRAIN, *SYNTHESIS,
                   f"train.vae.max_steps={VAE_STEPS}", f"train.backbone.max_steps={diffusion_steps}",
                   f"train.controlnet.max_steps={diffusion_steps}"])
    for stage in ("vae", "scale", "backbone", "controlnet"):
        run_stage(cfg, stage, progress=False)
    return synthesize_site(cfg, progress=False)


def mask_cases(summary: SynthesisSummary) -> list[str]:
    """The real case whose mask (and brain) each synthetic volume was made for, in sample order."""
    return [s["source_case"] for s in json.loads(Path(summary.manifest).read_text())["samples"]]


def ratios(summary: SynthesisSummary) -> list[float]:
    return [s.ratio for s in summary.audit.samples]


@pytest.fixture(scope="module")
def overfit(root: Path) -> SynthesisSummary:
    return run_pipeline(root, "runs-overfit", OVERFIT_STEPS)


@pytest.fixture(scope="module")
def control(root: Path) -> SynthesisSummary:
    return run_pipeline(root, "runs-control", CONTROL_STEPS)


def test_samples_of_an_overfit_model_are_flagged_as_copies_of_their_training_case(overfit: Any):
    audit = overfit.audit
    assert audit is not None and len(audit.samples) == 4
    print(f"overfit model: image ratios {[round(r, 3) for r in ratios(overfit)]}")  # shown with pytest -s
    targets = sorted(set(mask_cases(overfit)))
    assert len(targets) == 2 and set(targets) < set(audit.reference_cases)  # target + source cases
    # Every sample is flagged, and its nearest real case is the training case it was conditioned on.
    assert audit.flagged_ids == overfit.ids, f"ratios {ratios(overfit)}"
    assert [s.nearest_case for s in audit.samples] == mask_cases(overfit)
    # The rule does not flag the real patients themselves (its false alarms on this site: none).
    assert audit.summary()["audit.n_real_below"] == 0


def test_the_same_pipeline_barely_trained_is_not_flagged(overfit: Any, control: Any):
    assert control.audit is not None and control.audit.flagged_ids == [], f"ratios {ratios(control)}"
    print(f"barely trained control: image ratios {[round(r, 3) for r in ratios(control)]}")  # pytest -s
    # Same cohort, masks, noise and audit: only the diffusion training budget differs.
    assert control.audit.reference_cases == overfit.audit.reference_cases
    assert mask_cases(control) == mask_cases(overfit)
    assert min(ratios(control)) > 2 * max(ratios(overfit)), (ratios(control), ratios(overfit))
