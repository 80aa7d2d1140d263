"""Image quality of a site's synthetic sets (`aldm_fed.evaluation.image_quality`): known answers,
host pairing, the fixed names and the allow-list."""

from __future__ import annotations

import re

import numpy as np
import pytest

from aldm_fed.evaluation.image_quality import host_of, metric_key_pattern, site_image_quality
from aldm_fed.evaluation.metrics import FD_2D_NAME, FD_3D_NAME, ms_ssim_diversity
from aldm_fed.evaluation.tasks import CaseItem

S = 32  # the tiny experiment's volume size
SETS = ("aldm", "noadapt", "concat", "gan")


def real_cases(n: int = 4, seed: int = 0) -> dict[str, CaseItem]:
    rng = np.random.default_rng(seed)
    return {f"R{i}": CaseItem(image=rng.random((2, S, S, S), dtype=np.float32), group=f"R{i}") for i in range(n)}


def synthetic(images: list[np.ndarray], hosts: list[str], prefix: str = "S") -> list[CaseItem]:
    # source_groups as items_from_synthesis fills it: (mask source, host), deduplicated.
    return [CaseItem(image=im, group=f"{prefix}{i}", synthetic=True, source_groups=("R0", h) if h != "R0" else (h,))
            for i, (im, h) in enumerate(zip(images, hosts, strict=True))]


def test_a_set_identical_to_its_hosts_scores_as_a_copy_and_a_shift_raises_mmd_exactly():
    real = real_cases()
    hosts = ["R1", "R2", "R3", "R1"]  # R1 hosts two volumes; R0 none
    # Fortran order, as nibabel loads a synthetic case's NIfTI files.
    copies = synthetic([np.asfortranarray(real[h].image) for h in hosts], hosts)
    shifted = synthetic([real[h].image + 0.1 for h in hosts], hosts, "T")
    assert [host_of(it) for it in copies] == hosts
    out = site_image_quality(real, {"aldm": copies, "gan": shifted})
    assert out["quality.aldm.ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out[f"quality.aldm.{FD_2D_NAME}"] == pytest.approx(0.0, abs=1e-6)
    assert out[f"quality.aldm.{FD_3D_NAME}"] == pytest.approx(0.0, abs=1e-6)
    # MONAI's unbiased MMD of a set with itself is not 0 (see metrics.mmd); a constant shift c of
    # every voxel raises it by exactly n_voxels * c^2, so the pairing must be host by host.
    assert out["quality.gan.mmd"] - out["quality.aldm.mmd"] == pytest.approx(2 * S**3 * 0.01, rel=1e-3)
    assert out["quality.gan.ssim"] < out["quality.aldm.ssim"]
    stacked = np.stack([real[h].image for h in hosts])
    assert out["quality.aldm.ms_ssim_diversity"] == pytest.approx(ms_ssim_diversity(stacked), rel=1e-6)
    assert out["quality.real.ms_ssim_diversity"] == pytest.approx(
        ms_ssim_diversity(np.stack([it.image for it in real.values()])), rel=1e-6)
    assert (out["quality.aldm.n"], out["quality.gan.n"], out["quality.real.n"]) == (4, 4, 4)
    # copies of real brains are plausible; a brain 0.1 brighter everywhere is not (margin 0.05)
    assert (out["quality.aldm.plausible"], out["quality.gan.plausible"]) == (1.0, 0.0)
    assert all(type(v) in (int, float) and np.isfinite(v) for v in out.values())


def test_unknown_hosts_are_measured_unpaired_and_tiny_sets_are_left_out_with_a_note():
    real = real_cases()
    rng = np.random.default_rng(1)
    foreign = synthetic([rng.random((2, S, S, S), dtype=np.float32) for _ in range(3)], ["R1", "X9", "R2"])
    notes: list[str] = []
    out = site_image_quality(real, {"aldm": foreign, "gan": foreign[:1]}, notes=notes)
    assert set(out) == {"quality.real.ms_ssim_diversity", "quality.real.n", "quality.aldm.ms_ssim_diversity",
                        f"quality.aldm.{FD_2D_NAME}", f"quality.aldm.{FD_3D_NAME}", "quality.aldm.plausible",
                        "quality.aldm.n"}
    assert any("aldm" in n and "unpaired" in n for n in notes) and any("gan set has 1 volume" in n for n in notes)
    assert not any("X9" in n for n in notes)  # notes name no case
    with pytest.raises(ValueError, match="image quality: the aldm set has volumes of shape"):
        site_image_quality(real, {"aldm": synthetic([np.zeros((2, S, S, 16), np.float32)] * 2, ["R1", "R2"])})


def test_names_match_the_allow_list_and_a_case_id_does_not():
    real = real_cases(3)
    hosts = ["R0", "R1"]
    out = site_image_quality(real, {"aldm": synthetic([real[h].image for h in hosts], hosts)})
    pattern = re.compile(metric_key_pattern(SETS))
    assert out and all(pattern.fullmatch(k) for k in out), out
    for key in ("quality.R0.ssim", "quality.aldm.ssim_per_case", "quality.real.ssim", "quality.other.n",
                "quality.aldm", "quality..n"):
        assert not pattern.fullmatch(key), key
    assert not re.fullmatch(metric_key_pattern(()), "quality.aldm.n")
