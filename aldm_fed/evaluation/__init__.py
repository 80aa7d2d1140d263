"""Evaluation of synthetic data: downstream classification regimes and image-quality metrics.

- `metrics`: classification metrics with patient-level bootstrap intervals, seed aggregation;
  SSIM, MS-SSIM diversity, MMD, Frechet distances in a fixed random ResNet-10 feature space.
- `tasks`: `CaseItem` (one real or synthetic volume), the slice and volume tasks, leakage guards.
- `regimes`: real-only, real + augmentation, real + synthetic, synthetic-only and oracle runs,
  tested on held-out real cases only.
- `site`: every regime on one site's own cases from a composed config (`evaluate_site`, what
  `aldm-fed evaluate` and a federated site call); `SiteEvaluation.metrics()` is what may be shared.
- `plausibility`: whether a synthetic brain's intensities outside the tumour lie in the range real
  brains span (the report's "brain plausible").
- `faithfulness`: a MONAI tumour segmenter trained on real target cases; its Dice on synthetic
  volumes against their conditioning masks beside its Dice on real test cases
  (`faithfulness_metrics` gives the shareable numbers).
- `report`: `report.{md,csv,json}` from the metrics of one or many sites (`write_report`);
  `report_html`: the same as one self-contained `report.html` with ROC and training curves.
"""

from __future__ import annotations
