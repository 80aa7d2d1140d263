"""PNG montage of a site's cases: 4 contrasts plus the segmentation, axial slice through the tumour.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it works
headless and never disturbs a caller's interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aldm_fed.io import atomic_path

__all__ = ["write_montage"]

_COLUMNS = (("t1n", "T1 (t1n)"), ("t1c", "T1ce (t1c)"), ("t2w", "T2 (t2w)"), ("t2f", "FLAIR (t2f)"))
# BraTS viewer colours: NCR red, ED green, ET yellow.
_LABEL_RGB = {1: (1.0, 0.1, 0.1), 2: (0.1, 0.85, 0.1), 3: (1.0, 0.9, 0.0)}


def write_montage(path: str | Path, cases: Sequence[tuple[str, str, Path]], *, title: str) -> Path:
    """Write a grid: one row per case, columns T1, T1ce, T2, FLAIR and the seg over T1ce.

    Args:
        path: PNG file to write (atomically).
        cases: (case_id, grade, case folder) per row.
        title: figure title (e.g. the site and its scanner).
    """
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(cases), 1)
    fig = Figure(figsize=(2.3 * 5, 2.4 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 5, squeeze=False)
    for r, (case_id, grade, folder) in enumerate(cases):
        seg = np.asarray(nib.load(str(folder / f"{case_id}-seg.nii.gz")).dataobj)
        z = _tumour_slice(seg)
        vols = {m: np.asarray(nib.load(str(folder / f"{case_id}-{m}.nii.gz")).dataobj) for m, _ in _COLUMNS}
        for c, (m, label) in enumerate(_COLUMNS):
            ax = axes[r, c]
            sl = _view(vols[m][:, :, z])
            ax.imshow(sl, cmap="gray", vmin=0, vmax=_window(sl), origin="lower", interpolation="nearest")
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{case_id}\n{grade}, z={z}", fontsize=9)
        ax = axes[r, 4]
        base = _view(vols["t1c"][:, :, z]).astype(np.float32)
        ax.imshow(base, cmap="gray", vmin=0, vmax=_window(base), origin="lower", interpolation="nearest")
        ax.imshow(_overlay(_view(seg[:, :, z])), origin="lower", interpolation="nearest")
        if r == 0:
            ax.set_title("seg: NCR red, ED green, ET yellow", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  (axial, radiological: patient right on the left)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


def _tumour_slice(seg: np.ndarray) -> int:
    """Axial index through the tumour centre (the middle slice when there is no tumour)."""
    zs = np.nonzero(seg > 0)[2]
    return int(round(float(zs.mean()))) if len(zs) else seg.shape[2] // 2


def _view(sl: np.ndarray) -> np.ndarray:
    # Array axes are (x: left->right, y: posterior->anterior); show anterior up, patient right left.
    return sl[::-1, :].T


def _window(sl: np.ndarray) -> float:
    vals = sl[sl > 0]
    return float(np.percentile(vals, 99.5)) if len(vals) else 1.0


def _overlay(seg: np.ndarray) -> np.ndarray:
    rgba = np.zeros((*seg.shape, 4), dtype=np.float32)
    for label, rgb in _LABEL_RGB.items():
        m = seg == label
        rgba[m, :3] = rgb
        rgba[m, 3] = 0.45
    return rgba
