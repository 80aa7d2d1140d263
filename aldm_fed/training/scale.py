"""Stage 2: the latent scale factor, decided once from the encoded source set.

The diffusion model should see unit-variance latents, so latents are multiplied by
`scale_factor = 1 / std(latents of the source set)` on encode and divided by it on decode
(`aldm_fed.diffusion.ldm.encode` / `decode`). It is computed once here, stored in the scale
stage's checkpoint metadata and copied into every later checkpoint (backbone, ControlNets), and
never recomputed per site.

Built for federation: the statistic is three sums, `LatentStats(count, sum, sum_sq)`, which add
across sites (`stats_a + stats_b`); the server turns the total into one factor with
`scale_factor_from_stats`. A single-site run is the one-site case of the same sum.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL

from aldm_fed.data.volumes import VolumeSet
from aldm_fed.training.artifacts import (
    FINAL_DIR,
    StageResult,
    read_metrics_json,
    write_final,
)
from aldm_fed.training.device import DeviceSetup
from aldm_fed.training.latents import LatentSet, encode_volumes

__all__ = [
    "LatentStats",
    "compute_scale",
    "latent_statistics",
    "scale_factor_from_stats",
]


@dataclass(frozen=True)
class LatentStats:
    """Sufficient statistics of a set of latent values (mergeable: add the fields).

    Args:
        count: number of values.
        sum: their sum.
        sum_sq: the sum of their squares.
    """

    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0

    def __add__(self, other: LatentStats) -> LatentStats:
        if not isinstance(other, LatentStats):
            return NotImplemented
        return LatentStats(self.count + other.count, self.sum + other.sum, self.sum_sq + other.sum_sq)

    @classmethod
    def of(cls, values: torch.Tensor | np.ndarray) -> LatentStats:
        """Statistics of one tensor of latent values (summed in float64).

        Args:
            values: any shape.
        """
        t = torch.as_tensor(values).detach().to("cpu", torch.float64)
        return cls(int(t.numel()), float(t.sum()), float((t * t).sum()))

    @classmethod
    def merge(cls, parts: Iterable[LatentStats]) -> LatentStats:
        """The sum of several sites' statistics.

        Args:
            parts: statistics to add.
        """
        total = cls()
        for p in parts:
            total = total + p
        return total

    @property
    def mean(self) -> float:
        """Mean of the values."""
        return self.sum / self.count if self.count else math.nan

    @property
    def var(self) -> float:
        """Unbiased variance (as `torch.std`, which `compute_scale_factor` uses)."""
        if self.count < 2:
            return math.nan
        return max(self.sum_sq - self.sum * self.sum / self.count, 0.0) / (self.count - 1)

    @property
    def std(self) -> float:
        """Unbiased standard deviation."""
        return math.sqrt(self.var)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (also what a Flower message carries)."""
        return {"count": self.count, "sum": self.sum, "sum_sq": self.sum_sq}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentStats:
        """Inverse of `to_dict`.

        Args:
            d: {"count", "sum", "sum_sq"}.
        """
        return cls(int(d["count"]), float(d["sum"]), float(d["sum_sq"]))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The three numbers as tensors (a checkpoint group)."""
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": torch.tensor(self.sum, dtype=torch.float64),
            "sum_sq": torch.tensor(self.sum_sq, dtype=torch.float64),
        }


def scale_factor_from_stats(stats: LatentStats) -> float:
    """1 / std of the latent values.

    Args:
        stats: (merged) statistics of unscaled latents.

    Raises:
        ValueError: fewer than 2 values, or a zero / non-finite std.
    """
    if stats.count < 2:
        raise ValueError(f"latent statistics: need at least 2 values, got {stats.count}")
    std = stats.std
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent statistics: std must be finite and > 0, got {std}")
    return 1.0 / std


def latent_statistics(
    vae: AutoencoderKL | None,
    volumes: VolumeSet | LatentSet,
    *,
    setup: DeviceSetup | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> LatentStats:
    """Statistics of the unscaled posterior-mean latents of `volumes`.

    Args:
        vae: the trained VAE (unused when `volumes` is already a `LatentSet`).
        volumes: the cases (a site's source set), or their latents.
        setup: device and autocast for the encoder.
        cache_dir: latent cache folder (see `aldm_fed.training.latents`); None = no cache.
        progress: show a progress bar while encoding.
    """
    if isinstance(volumes, LatentSet):
        latents = volumes
    else:
        if vae is None:
            raise ValueError("latent_statistics: a VAE is needed to encode volumes")
        latents = encode_volumes(vae, volumes, setup=setup, cache_dir=cache_dir, progress=progress)
    return LatentStats.merge(LatentStats.of(z) for z in latents.latents)


def compute_scale(
    latents: LatentSet,
    run_dir: str | os.PathLike[str],
    *,
    sources: dict[str, Any],
    data: dict[str, Any] | None = None,
) -> StageResult:
    """The scale stage: statistics of the source latents -> `final/` checkpoint + metrics.json.

    A no-op when `final/` already holds the factor for the same VAE checkpoint and data.

    Args:
        latents: unscaled latents of the source set.
        run_dir: the stage directory (`runs/<name>/scale`).
        sources: input checkpoints, at least `{"vae": checkpoint_identity(vae_ckpt)}` (sha256
            only: a moved run folder must still match).
        data: identity of the source set (recorded).
    """
    run_dir = Path(run_dir)
    data = data if data is not None else latents.identity()
    final = run_dir / FINAL_DIR

    # 1. Already done for this VAE and these cases?
    if (final / "meta.json").is_file():
        import json

        meta = json.loads((final / "meta.json").read_text())
        if meta.get("sources") == sources and meta.get("data") == data:
            doc = read_metrics_json(run_dir)
            return StageResult(
                stage="scale", run_dir=run_dir, checkpoint=final, step=0, skipped=True,
                metrics={k: float(v) for k, v in doc.get("metrics", {}).items()},
            )

    # 2. One pass of sums, then the factor.
    stats = latent_statistics(None, latents)
    factor = scale_factor_from_stats(stats)
    z = latents.latents * factor
    metrics = {
        "scale_factor": factor,
        "latent_std": stats.std,
        "latent_mean": stats.mean,
        "scaled_std": float(z.std()),
        "n_values": float(stats.count),
        "n_cases": float(len(latents)),
    }

    # 3. The checkpoint: the statistics as tensors, the factor in the metadata.
    meta = {
        "stage": "scale",
        "step": 0,
        "scale_factor": factor,
        "stats": stats.to_dict(),
        "sources": sources,
        "data": data,
        "metrics": metrics,
    }
    path = write_final(run_dir, {"stats": stats.to_tensors()}, meta,
                       {"stage": "scale", "metrics": metrics, "stats": stats.to_dict()})
    return StageResult(stage="scale", run_dir=run_dir, checkpoint=path, metrics=metrics)
