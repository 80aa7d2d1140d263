"""Mask control of the trained generative core (issue #3): with the SAME starting noise, moving the
tumour to the other hemisphere (or removing it) changes the sampled volume where the tumour was
and is, and leaves the brain around it alone and plausible.

The tiny chain vae -> scale -> backbone -> site C ControlNet is trained on the tiny phantom cohort
just long enough for the mask to matter (`STEPS`); then each of site C's cases is sampled twice
from one noise tensor (DDIM, deterministic): with its own mask and with the changed one.

- Locality: mean |x_a - x_b| inside the union of both tumours, dilated by the VAE's downsampling
  factor (a latent voxel covers f^3 image voxels), over the same inside the rest of the brain.
- Plausibility: per modality, the mean and std of each sample inside the brain outside that union
  lie within the real cases' range (every case of the cohort, same region), widened by a margin.
  NOT MET by the tiny model at this budget (strict xfail, see the test): its samples are
  brain-sized blobs of about the right overall intensity without brain anatomy. The same chain
  with `scheduler=rflow` came closer (sampled T1 0.34 against real 0.35-0.57) but still failed it,
  and its mask no longer steered locally at these steps (median locality 1.06): so this test keeps
  tiny's epsilon objective (measured 2026-11-26).

Thresholds come from measurements (see each constant); `test_the_locality_check_can_fail` shows
that a pair differing for another reason than the mask (other noise, same mask) fails the check.

The concatenated mask alone already places the tumour, so the locality test would pass with a
ControlNet that stopped steering. `test_the_controlnet_itself_steers_at_the_tumour` is the
ControlNet-off control: same mask and noise, ControlNet on vs off. NOT MET by the tiny model
either (strict xfail): what its ControlNet changes is spread over the brain.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.diffusion.pipeline import GenerativeModels, generate
from aldm_fed.evaluation.plausibility import STAT_MARGIN, RealRange, brain_statistics
from aldm_fed.synthesis.config import synthesis_config
from aldm_fed.synthesis.run import sample_noise, sampling_settings
from aldm_fed.training.artifacts import load_generative_models
from aldm_fed.training.stages import run_stage

pytestmark = pytest.mark.slow

# Training steps per stage. Measured locality ratios (below) at 80/120/40 steps: 1.5-2.3 (median
# 1.9), too close to the other-noise control; at 80/500/150: 1.7-4.3 (median 2.75).
STEPS = ["train.vae.max_steps=80", "train.backbone.max_steps=500", "train.controlnet.max_steps=150"]
SAMPLING_STEPS = 25
# Locality ratio, inside / outside mean |x_a - x_b|. Measured at STEPS over site C's 4 cases x
# (moved, removed), two trainings: min 1.72 / 2.14, median 2.75 / 2.79. A pair with the same mask
# and other noise: 0.96-1.34 (median 1.17); with the ControlNet off (conditioning scale 0, the
# concatenated mask still on): 1.8-3.4, i.e. the concatenated mask alone already places the tumour.
MIN_MEDIAN_LOCALITY = 2.0   # ~27 % under the measured medians, ~70 % over the other-noise one
MIN_LOCALITY = 1.4          # every pair; ~20 % under the lowest measured pair
# The ControlNet's own effect (same mask and noise, ControlNet on vs off), inside / outside the
# dilated tumour: what a ControlNet that steers the tumour must show (the other-noise control sits
# at 0.96-1.34). Measured at STEPS on site C's 4 cases (2026-12-08): 0.81-1.47, median 0.99.
MIN_CONTROLNET_LOCALITY = 1.5
# Plausibility: `aldm_fed.evaluation.plausibility` (margin STAT_MARGIN = 0.05 around the real cases'
# [min, max] of each statistic; measured real brain means per modality 0.22-0.57, stds 0.09-0.23).


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two samples from one noise tensor, and the regions they are compared in."""

    case_id: str
    change: str
    samples: np.ndarray  # (2, C, S, S, S) in [0, 1]
    union: np.ndarray    # bool (S, S, S): both tumours, dilated by the latent factor
    brain: np.ndarray    # bool (S, S, S): the host case's brain


def locality_ratio(pair: Pair) -> float:
    """Mean |x_a - x_b| (over channels) inside `union` over the same in the brain outside it."""
    diff = np.abs(pair.samples[0] - pair.samples[1]).mean(0)
    return float(diff[pair.union].mean() / diff[pair.brain & ~pair.union].mean())


def moved(seg: np.ndarray) -> np.ndarray:
    """The tumour mirrored to the other hemisphere (RAS: axis 0 is left-right)."""
    return np.ascontiguousarray(np.flip(seg, axis=0))


def sample_pair(models: GenerativeModels, seg_a: np.ndarray, seg_b: np.ndarray, noise: torch.Tensor,
                noise_b: torch.Tensor | None = None) -> np.ndarray:
    """Sample `seg_a` and `seg_b` from `noise` (`seg_b` from `noise_b` when given), in one batch."""
    sampling = sampling_settings(models, synthesis_config({"sampler": "auto", "num_steps": SAMPLING_STEPS}))
    bundle = dataclasses.replace(models, scheduler_cfg=sampling["scheduler"])
    labels = torch.from_numpy(np.stack([seg_a, seg_b]).astype(np.int64))
    x = generate(bundle, labels, num_steps=SAMPLING_STEPS, noise=torch.stack([noise, noise if noise_b is None else noise_b]))
    return x.float().clamp(0, 1).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny chain trained for site C, its cases and the real brain statistics."""
    root = tmp_path_factory.mktemp("mask_control")
    cfg = compose([
        "experiment=tiny", "device=cpu", "site=C", f"paths.cohort={root / 'cohort'}",
        f"paths.cache={root / 'cache'}", f"paths.runs={root / 'runs'}",
        # One thread: on a 2-core machine shared with other jobs, two threads spin against each
        # other (measured ~10x slower per step under load).
        "device.num_threads=1", *STEPS,
    ])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    for stage in ("vae", "scale", "backbone", "controlnet"):
        run_stage(cfg, stage, progress=False)
    models = load_generative_models(cfg, "C")
    manifests = site_manifests(str(cfg.paths.cohort))
    site_c = [c for split in ("target", "test") for c in manifests["C"][1].cases(split)]
    every = []
    for site, (_, manifest) in manifests.items():
        for split in ("source", "target", "test"):
            if manifest.cases(split):
                load_split(cfg, split, sites=[site], progress=False)  # prepares what training did not
                every += manifest.cases(split)
    cache = CaseCache(str(cfg.paths.cache))  # after preparing: the index lists every case
    f = int(models.vae_downsample)
    # every case of the cohort: the range a plausible brain lies in
    real = RealRange.from_cases(((c.image, c.brain > 0, c.seg) for c in map(cache.load, every)), dilate=f)
    return {"models": models, "cache": cache, "cases": site_c, "real": real, "factor": f}


@pytest.fixture(scope="module")
def pairs(trained: dict[str, Any]) -> list[Pair]:
    models, cache, f = trained["models"], trained["cache"], trained["factor"]
    shape = (int(models.unet.out_channels), *(cache.size // f,) * 3)
    out = []
    for i, case_id in enumerate(trained["cases"]):
        case = cache.load(case_id, mmap=False)
        seg = case.seg.astype(np.int64)
        for change, other in (("moved", moved(seg)), ("removed", np.zeros_like(seg))):
            samples = sample_pair(models, seg, other, sample_noise(0, i, shape))
            union = ndimage.binary_dilation((seg > 0) | (other > 0), iterations=f)
            out.append(Pair(case_id, change, samples, union, case.brain > 0))
    return out


def test_changing_the_mask_changes_the_sample_inside_the_tumour_regions(pairs: list[Pair]):
    ratios = {(p.case_id, p.change): locality_ratio(p) for p in pairs}
    print("locality ratios:", {k: round(v, 2) for k, v in ratios.items()})
    assert len(ratios) >= 4
    median = float(np.median(list(ratios.values())))
    assert median >= MIN_MEDIAN_LOCALITY, f"mask change not local enough: median ratio {median:.2f} < {MIN_MEDIAN_LOCALITY}"
    low = {k: v for k, v in ratios.items() if not v >= MIN_LOCALITY}  # NaN (no change at all) fails too
    assert not low, f"mask change not local enough (ratio < {MIN_LOCALITY}): {low}"


@pytest.mark.xfail(strict=True, reason=(
    "the tiny model at STEPS does not learn brain anatomy: measured T1 mean inside the host brain "
    "0.19-0.23 vs real 0.35-0.57 (FLAIR 0.10-0.13 vs 0.32-0.55); 120 -> 500 backbone steps did not "
    "move it. Needs a much longer-trained backbone than fits this test's time"))
def test_the_brain_outside_the_tumour_stays_plausible(pairs: list[Pair], trained: dict[str, Any]):
    real: RealRange = trained["real"]
    print("real mean/std range per modality:", np.stack([real.lo, real.hi], -1).round(3).tolist())
    for p in pairs:
        for k in range(2):
            got = brain_statistics(p.samples[k], p.brain, p.union, dilate=0)  # union is dilated already
            print(p.case_id, p.change, k, got.round(3).tolist())
            bad = real.outside(got, STAT_MARGIN)
            assert not bad, (
                f"{p.case_id} ({p.change}, sample {k}): brain statistics outside the real range "
                f"(+- {STAT_MARGIN}) at (modality, mean|std) {bad}: got {got.round(3).tolist()}, "
                f"real {real.lo.round(3).tolist()} .. {real.hi.round(3).tolist()}"
            )


@pytest.mark.xfail(strict=True, reason=(
    "the tiny ControlNet at STEPS does not steer the tumour: its own effect (on vs off, same mask and "
    "noise) is spread over the brain, locality ratio 0.81-1.47, median 0.99 (measured 2026-12-08); the "
    "concatenated mask does the placing. The synthesis issue (#18) is to make it steer"))
def test_the_controlnet_itself_steers_at_the_tumour(trained: dict[str, Any]):
    """The concatenated mask alone already places a tumour (see MIN_MEDIAN_LOCALITY's note), so the
    locality test above would pass with a ControlNet that stopped steering. This control compares
    the same mask and noise with the ControlNet on and off (conditioning scale 1 vs 0): what the
    ControlNet changes must lie at the tumour, and a ControlNet whose residuals are zero fails."""
    models, cache, f = trained["models"], trained["cache"], trained["factor"]
    shape = (int(models.unet.out_channels), *(cache.size // f,) * 3)
    off = dataclasses.replace(models, conditioning_scale=0.0)
    ratios = []
    for i, case_id in enumerate(trained["cases"]):
        case = cache.load(case_id, mmap=False)
        seg = case.seg.astype(np.int64)
        noise = sample_noise(0, i, shape)
        x_on = sample_pair(models, seg, seg, noise)[0]
        x_off = sample_pair(off, seg, seg, noise)[0]
        union = ndimage.binary_dilation(seg > 0, iterations=f)
        ratios.append(locality_ratio(Pair(case_id, "controlnet off", np.stack([x_on, x_off]), union, case.brain > 0)))
    print("ControlNet on/off locality ratios:", [round(r, 2) for r in ratios])
    median = float(np.median(ratios))
    assert median >= MIN_CONTROLNET_LOCALITY, (
        f"the ControlNet's own effect is not at the tumour: median ratio {median:.2f} < {MIN_CONTROLNET_LOCALITY}")


def test_the_locality_check_can_fail(trained: dict[str, Any], pairs: list[Pair]):
    """Same mask, other noise: the samples differ everywhere, and the ratio says so (measured
    0.96-1.34). Identical masks with the same noise give identical samples: ratio NaN, which
    fails `>=` as well."""
    models, cache, f = trained["models"], trained["cache"], trained["factor"]
    shape = (int(models.unet.out_channels), *(cache.size // f,) * 3)
    p = pairs[0]
    seg = cache.load(p.case_id, mmap=False).seg.astype(np.int64)
    samples = sample_pair(models, seg, moved(seg), sample_noise(0, 0, shape), sample_noise(1, 0, shape))
    ratio = locality_ratio(Pair(p.case_id, "other noise", samples, p.union, p.brain))
    print("other-noise ratio:", round(ratio, 2))
    assert ratio < MIN_MEDIAN_LOCALITY
