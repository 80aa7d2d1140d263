"""Evaluation of synthetic data: downstream classification regimes and image-quality metrics.

- `metrics`: classification metrics with patient-level bootstrap intervals, seed aggregation;
  SSIM, MS-SSIM diversity, MMD, Frechet distances in a fixed random ResNet-10 feature space.
- `tasks`: `CaseItem` (one real or synthetic volume), the slice and volume tasks, leakage guards.
- `regimes`: real-only, real + augmentation, real + synthetic, synthetic-only and oracle runs,
  tested on held-out real cases only.
"""

from __future__ import annotations
