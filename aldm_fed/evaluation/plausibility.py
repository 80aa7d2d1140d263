"""Is the brain around a synthetic tumour plausible? Its intensities against the range real brains span.

A synthetic volume can put the tumour where its mask says and still surround it with something no
scanner would show (the blotches of an undertrained epsilon backbone, a uniformly grey blob). This
check is deliberately simple and readable: per modality, the mean and the standard deviation of
the volume inside its host's brain, outside the tumour (dilated by the VAE's downsampling factor,
so that latent voxels touching the tumour do not count), must lie within the [min, max] that the
real cases span over the same region, widened by a margin.

```python
real = RealRange.from_cases([(case.image, case.brain > 0, case.seg) for case in real_cases], dilate=4)
excess = real.excess(brain_statistics(volume, host_brain, mask, dilate=4))  # <= 0.05: plausible
```

`python benchmarks/plausibility.py` runs it over a site's synthesis folder; the tiny mask-control
test (`tests/synthesis/test_mask_control.py`) asks it of the tiny model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["STAT_MARGIN", "RealRange", "brain_statistics", "outside_tumour"]

# Margin around the real [min, max] of each statistic (intensities in [0, 1]; real brain means per
# modality span ~0.2-0.6 and stds ~0.1-0.2 on the phantom, so 0.05 is a quarter of a range or less).
STAT_MARGIN = 0.05


def outside_tumour(brain: np.ndarray, seg: np.ndarray, dilate: int) -> np.ndarray:
    """Brain voxels farther than `dilate` voxels from any tumour label (bool, brain's shape)."""
    tumour = np.asarray(seg) > 0
    if dilate > 0 and tumour.any():
        tumour = ndimage.binary_dilation(tumour, iterations=int(dilate))
    return np.asarray(brain, dtype=bool) & ~tumour


def brain_statistics(image: np.ndarray, brain: np.ndarray, seg: np.ndarray, dilate: int) -> np.ndarray:
    """(C, 2): mean and std of each channel of `image` (clipped to [0, 1]) over `outside_tumour`.

    Raises:
        ValueError: no brain voxel is left outside the tumour.
    """
    region = outside_tumour(brain, seg, dilate)
    if not region.any():
        raise ValueError("brain_statistics: no brain voxel outside the (dilated) tumour")
    x = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    return np.array([[x[c][region].mean(), x[c][region].std()] for c in range(x.shape[0])])


@dataclass(frozen=True)
class RealRange:
    """The [lo, hi] of `brain_statistics` over real cases, each (C, 2)."""

    lo: np.ndarray
    hi: np.ndarray
    n_cases: int

    @classmethod
    def from_cases(cls, cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], dilate: int) -> RealRange:
        """From (image, brain, seg) triples of real cases; a case whose tumour (dilated) covers its
        whole brain has nothing to measure and is left out.

        Raises:
            ValueError: no case with brain outside its tumour.
        """
        stats = [brain_statistics(image, brain, seg, dilate) for image, brain, seg in cases
                 if outside_tumour(brain, seg, dilate).any()]
        if not stats:
            raise ValueError("RealRange.from_cases: no real case with brain voxels outside its tumour")
        s = np.stack(stats)
        return cls(lo=s.min(0), hi=s.max(0), n_cases=len(stats))

    def excess(self, stats: np.ndarray) -> float:
        """How far `stats` (C, 2) lies outside the range at its worst entry (<= 0: inside)."""
        return float(np.maximum(self.lo - stats, stats - self.hi).max())

    def outside(self, stats: np.ndarray, margin: float = STAT_MARGIN) -> list[tuple[int, int]]:
        """(modality, 0 = mean | 1 = std) entries beyond the range widened by `margin`."""
        bad = (stats < self.lo - margin) | (stats > self.hi + margin)
        return [(int(c), int(k)) for c, k in np.argwhere(bad)]
