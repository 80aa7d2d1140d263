"""MRI contrast from tissue properties: relaxation times, proton density and signal equations.

Each tissue class has T1, T2 and proton density (PD). T1 lengthens with field strength
(T1(B) = T1(1.5 T) (B / 1.5)^gamma, gamma ~0.3 for tissue, ~0 for fluid); T2 barely changes and is
kept fixed. Gadolinium shortens T1 where the blood-brain barrier is broken (enhancing tumour):
1/T1' = 1/T1 + r1 [Gd]. A voxel's signal is the sum of its tissue fractions times their signals
(partial volume), so borders and the blurred 4 mm grid look right without special cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aldm_fed.data.phantom.scanner import ScannerProfile, Sequence

__all__ = ["HEALTHY", "TISSUES", "TUMOUR", "Tissue", "TISSUE_PROPERTIES", "render", "signal", "tissue_signals"]

HEALTHY: tuple[str, ...] = ("wm", "gm", "csf")
TUMOUR: tuple[str, ...] = ("oedema", "core", "necrosis", "enhancing")
TISSUES: tuple[str, ...] = HEALTHY + TUMOUR

# Gadolinium T1 relaxivity, 1/(mM s) (gadoterate-like, roughly field independent at 1.5-3 T).
_R1_PER_MM_S = 4.0


@dataclass(frozen=True)
class Tissue:
    """Relaxation properties of one tissue class.

    Args:
        t1_ms: T1 at 1.5 T.
        t2_ms: T2.
        pd: proton density relative to water.
        field_exponent: gamma in T1(B) = T1(1.5) (B / 1.5)^gamma.
        gd_mm: tissue gadolinium concentration (mM) after a standard dose.
    """

    t1_ms: float
    t2_ms: float
    pd: float
    field_exponent: float
    gd_mm: float = 0.0


# Literature-ballpark values (1.5 T); tumour classes sit between tissue and fluid: oedema is
# tissue with extra water, necrosis is nearly fluid, the enhancing rim takes up contrast agent.
TISSUE_PROPERTIES: dict[str, Tissue] = {
    "wm": Tissue(t1_ms=650.0, t2_ms=80.0, pd=0.70, field_exponent=0.35),
    "gm": Tissue(t1_ms=1100.0, t2_ms=100.0, pd=0.80, field_exponent=0.30),
    "csf": Tissue(t1_ms=4000.0, t2_ms=2000.0, pd=1.00, field_exponent=0.05),
    "oedema": Tissue(t1_ms=1300.0, t2_ms=220.0, pd=0.88, field_exponent=0.20, gd_mm=0.01),
    "core": Tissue(t1_ms=1200.0, t2_ms=160.0, pd=0.85, field_exponent=0.25, gd_mm=0.04),
    "necrosis": Tissue(t1_ms=2200.0, t2_ms=450.0, pd=0.92, field_exponent=0.10),
    "enhancing": Tissue(t1_ms=1050.0, t2_ms=120.0, pd=0.85, field_exponent=0.30, gd_mm=0.5),
    # Outside the brain: scalp and marrow fat, which a site's skull stripping may leave behind
    # (`scanner.residual_non_brain`). Short T1, bright on every contrast here.
    "fat": Tissue(t1_ms=260.0, t2_ms=80.0, pd=0.90, field_exponent=0.10),
}


def signal(seq: Sequence, t1_ms: float, t2_ms: float, pd: float) -> float:
    """Signal of one tissue for one sequence (spin echo or magnitude inversion recovery).

    Args:
        seq: the sequence timing.
        t1_ms: effective T1 (field and contrast agent applied).
        t2_ms: T2.
        pd: proton density.
    """
    decay = math.exp(-seq.te_ms / t2_ms)
    if seq.kind == "se":
        return pd * (1.0 - math.exp(-seq.tr_ms / t1_ms)) * decay
    assert seq.ti_ms is not None
    return pd * abs(1.0 - 2.0 * math.exp(-seq.ti_ms / t1_ms) + math.exp(-seq.tr_ms / t1_ms)) * decay


def tissue_signals(profile: ScannerProfile, modality: str) -> dict[str, float]:
    """Signal of every tissue class for one modality at one site.

    Args:
        profile: the site's scanner (field strength, sequences, contrast dose).
        modality: one of t1n, t1c, t2w, t2f (gadolinium only for t1c).
    """
    seq = profile.sequence(modality)
    out: dict[str, float] = {}
    for name, tis in TISSUE_PROPERTIES.items():
        t1 = tis.t1_ms * (profile.field_t / 1.5) ** tis.field_exponent
        if modality == "t1c" and tis.gd_mm > 0:
            rate = 1.0 / t1 + _R1_PER_MM_S * tis.gd_mm * profile.gd_dose / 1000.0  # per ms
            t1 = 1.0 / rate
        out[name] = signal(seq, t1, tis.t2_ms, tis.pd)
    return out


def render(
    healthy: Mapping[str, np.ndarray],
    tumour: Mapping[str, np.ndarray],
    region: tuple[slice, slice, slice],
    signals: Mapping[str, float],
    texture: np.ndarray,
    tumour_texture: np.ndarray,
) -> np.ndarray:
    """Noise-free image: sum over tissues of fraction x signal x texture.

    Args:
        healthy: wm, gm, csf fractions on the image grid.
        tumour: oedema, core, necrosis, enhancing fractions on the sub-box `region`.
        region: where the tumour fractions live inside the image grid.
        signals: per-tissue signal for this modality and site.
        texture: multiplicative tissue heterogeneity (~1) on the image grid.
        tumour_texture: multiplicative tumour heterogeneity (~1) on `region`.
    """
    img = np.zeros_like(healthy["wm"])
    for name in HEALTHY:
        img += np.float32(signals[name]) * healthy[name]
    img *= texture
    sub = img[region]
    taken = np.zeros_like(sub)
    lesion = np.zeros_like(sub)
    for name in TUMOUR:
        taken += tumour[name]
        lesion += np.float32(signals[name]) * tumour[name]
    # Overlapping soft borders may sum past 1: renormalise so a voxel is never more than full.
    over = np.maximum(taken, 1.0)
    lesion /= over
    taken /= over
    # Tumour displaces the healthy share of each voxel it occupies.
    img[region] = sub * (1.0 - taken) + lesion * tumour_texture
    return img
