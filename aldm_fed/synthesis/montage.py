"""PNG montage of synthetic cases next to their real hosts.

One row per synthetic case; columns: every synthetic modality, then the same modalities of the
real host case, all at the axial slice through the synthetic tumour's centre, with the
conditioning mask drawn as contours (whole tumour green, tumour core red, enhancing yellow) on
every panel, so a reader sees at once whether the generated tumour follows its mask and how the
synthetic brain compares with the real one it was placed in.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch): headless-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aldm_fed.io import atomic_path

__all__ = ["MontageRow", "write_synthesis_montage"]

# BraTS evaluation regions as contours: WT = {1,2,3}, TC = {1,3}, ET = {3}
_REGIONS = (((1, 2, 3), (0.1, 0.85, 0.1)), ((1, 3), (1.0, 0.15, 0.15)), ((3,), (1.0, 0.9, 0.0)))


@dataclass
class MontageRow:
    """One synthetic case in the montage.

    Args:
        label: row caption (id, source -> host, grade).
        synthetic: (C, X, Y, Z) synthetic image in [0, 1].
        seg: (X, Y, Z) conditioning mask, canonical labels.
        host: (C, X, Y, Z) real host image on the same grid, channels in the same order; a channel
            may be None where the cache lacks that modality; None for no host columns.
    """

    label: str
    synthetic: np.ndarray
    seg: np.ndarray
    host: Sequence[np.ndarray | None] | None = None


def _tumour_slice(seg: np.ndarray) -> int:
    """Axial (third RAS axis) index through the tumour centre; the middle slice without tumour."""
    zs = np.nonzero(seg > 0)[2]
    return int(round(float(zs.mean()))) if len(zs) else seg.shape[2] // 2


def _view(sl: np.ndarray) -> np.ndarray:
    # Array axes (x: left->right, y: posterior->anterior): anterior up, patient right on the left.
    return np.asarray(sl)[::-1, :].T


def write_synthesis_montage(
    path: str | Path, rows: Sequence[MontageRow], modalities: Sequence[str], *, title: str
) -> Path:
    """Write the montage PNG (atomically).

    Args:
        path: PNG file.
        rows: one entry per synthetic case shown.
        modalities: canonical names of the channels (column titles).
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = len(modalities)
    with_host = any(r.host is not None for r in rows)
    ncols = C * (2 if with_host else 1)
    nrows = max(len(rows), 1)
    fig = Figure(figsize=(2.0 * ncols + 0.6, 2.1 * nrows + 0.7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, row in enumerate(rows):
        z = _tumour_slice(row.seg)
        seg_sl = _view(row.seg[:, :, z])
        panels: list[tuple[str, np.ndarray | None]] = [
            (f"synthetic {m}", row.synthetic[c]) for c, m in enumerate(modalities)
        ]
        if with_host:
            host = list(row.host) if row.host is not None else [None] * C
            panels += [(f"real host {m}", host[c]) for c, m in enumerate(modalities)]
        for c, (name, vol) in enumerate(panels):
            ax = axes[r, c]
            if vol is not None:
                ax.imshow(_view(vol[:, :, z]), cmap="gray", vmin=0.0, vmax=1.0, origin="lower",
                          interpolation="nearest")
                for values, colour in _REGIONS:
                    region = np.isin(seg_sl, values)
                    if region.any() and not region.all():
                        ax.contour(region.astype(np.float32), levels=[0.5], colors=[colour],
                                   linewidths=0.8, origin="lower")
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row.label}\nz={z}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  (axial, radiological; contours: WT green, TC red, ET yellow)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=72)
    return path
