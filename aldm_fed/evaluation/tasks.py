"""Classification tasks built from volumes, whatever their origin (cache, synthesis, a test).

Everything starts from `CaseItem`s: one volume with its mask, case label, patient id and an
`is synthetic` flag. Where they came from (the preprocessed cache, a folder of synthetic NIfTI
files, arrays made by hand in a test) does not matter past this point:

```python
real = items_from_cache(cache, manifest.cases("target"), labels=grade_codes)
syn = items_from_synthesis("runs/x/sites/A/synthesis", label_map={"HGG": 1, "LGG": 0})
task = slice_task(real, min_brain_fraction=0.05)     # axial slices, label = any tumour voxel
task.inputs([0, 5, 7])                               # float32 (3, C, S, S)
task.groups                                          # patient id per slice
```

Tasks:

- **slice** (ALDM's task): every axial slice of every volume; label 1 when the slice holds any
  tumour voxel (`seg > 0`). Axial = the last array axis: the cache grid is RAS, so its third
  axis runs inferior -> superior. Slices with less brain than `min_brain_fraction` of their
  area can be left out (the empty caps of the cube say nothing about tumours and would inflate
  the negatives).
- **volume**: one sample per case; label = the case label mapped to 0/1 (e.g. HGG=1, LGG=0 with
  `encode_case_labels`).

Slices are not copied: a task keeps references (volume, slice) and cuts a batch on demand, so a
slice task over 112^3 volumes costs no more memory than the volumes themselves (which may be
memory-mapped).

Leakage rules, enforced here and by `regimes.run_regime`: a patient is never on both sides of a
train/test split (`check_no_leakage`), and the test side is always real (`check_real_test_items`).
A synthetic volume's `source_groups` (the real patient whose mask conditioned it, and the host
patient whose brain received it) count as training patients, because that patient's tumour layout
and that host's anatomy (brain mask, grid) went into training through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aldm_fed.data.patients import patient_id

__all__ = [
    "TASKS",
    "CaseItem",
    "TaskData",
    "check_no_leakage",
    "check_real_test_items",
    "encode_case_labels",
    "item_from_cached",
    "items_from_cache",
    "items_from_synthesis",
    "make_task",
    "slice_labels",
    "slice_task",
    "training_groups",
    "volume_task",
]

TASKS: tuple[str, ...] = ("slice", "volume")


@dataclass(frozen=True, eq=False)
class CaseItem:
    """One volume for classification, real or synthetic.

    Args:
        image: float32-compatible (C, S, S, S) array in [0, 1], 0 outside the brain.
        group: patient id (real) or sample id (synthetic); all samples cut from this volume carry it.
        seg: (S, S, S) tumour labels (0 = background); needed by the slice task. For a synthetic
            volume: the mask it was generated from.
        label: case-level label as 0/1 (volume task), or None.
        synthetic: True for generated volumes; they may train but never test.
        source_groups: for a synthetic volume, the real patients behind it: the one whose mask
            conditioned it and the host whose brain received it (`items_from_synthesis` fills
            both); used by the leakage guard.
        brain: optional (S, S, S) brain mask; without it "brain" is any voxel > 0 in any channel.
        content_key: what the volume's content depends on, for run identities (a synthetic
            case's record hash, a cached case's `prep_hash` and the digest of its arrays); None
            when unknown.
    """

    image: np.ndarray
    group: str
    seg: np.ndarray | None = None
    label: int | None = None
    synthetic: bool = False
    source_groups: tuple[str, ...] = ()
    brain: np.ndarray | None = field(default=None, repr=False)
    content_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"CaseItem.group must be a non-empty patient/sample id, got {self.group!r}")
        shape = tuple(getattr(self.image, "shape", ()))
        if len(shape) != 4:
            raise ValueError(f"{self.group}: image must be (C, S, S, S), got shape {shape}")
        for name in ("seg", "brain"):
            arr = getattr(self, name)
            if arr is not None and tuple(arr.shape) != shape[1:]:
                raise ValueError(f"{self.group}: {name} shape {tuple(arr.shape)} != image grid {shape[1:]}")
        if self.label is not None and (isinstance(self.label, bool) or self.label not in (0, 1)):
            raise ValueError(f"{self.group}: label must be 0, 1 or None, got {self.label!r}")
        if not isinstance(self.synthetic, bool):
            raise ValueError(f"{self.group}: synthetic must be True/False, got {self.synthetic!r}")
        if isinstance(self.source_groups, str) or not all(
            isinstance(g, str) and g for g in self.source_groups
        ):
            raise ValueError(
                f"{self.group}: source_groups must be a tuple of patient ids, got {self.source_groups!r}"
            )
        object.__setattr__(self, "source_groups", tuple(self.source_groups))
        if self.source_groups and not self.synthetic:
            raise ValueError(f"{self.group}: source_groups is only meaningful for synthetic items")

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def brain_mask(self) -> np.ndarray:
        """The brain mask, or `image > 0` in any channel when none was given."""
        if self.brain is not None:
            return np.asarray(self.brain) > 0
        return np.asarray(self.image).max(axis=0) > 0


def encode_case_labels(
    values: Mapping[str, str | None], label_map: Mapping[str, int]
) -> dict[str, int]:
    """Map case-level label values to 0/1, e.g. {"HGG": 1, "LGG": 0}.

    Args:
        values: case id -> raw value (from `SiteManifest.label` or `CaseLabels.values_of`).
        label_map: raw value -> 0/1.

    Raises:
        ValueError: a case without a value, or a value the map does not know (all named).
    """
    codes = set(label_map.values())
    if not codes <= {0, 1} or not label_map:
        raise ValueError(f"label_map must map values to 0/1, got {dict(label_map)}")
    missing = [c for c, v in values.items() if v is None]
    unknown = {c: v for c, v in values.items() if v is not None and v not in label_map}
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no label for {sorted(missing)[:10]}")
        if unknown:
            parts.append(f"values not in label_map {sorted(label_map)}: "
                         f"{dict(sorted(unknown.items())[:10])}")
        raise ValueError("; ".join(parts))
    return {c: int(label_map[str(v)]) for c, v in values.items()}


def item_from_cached(case: Any, label: int | None = None, *, synthetic: bool = False) -> CaseItem:
    """A `CaseItem` from an `aldm_fed.data.cache.CachedCase` (arrays stay memory-mapped).

    Args:
        case: the cached case (anything with case_id, image, seg, brain).
        label: its case label as 0/1, if the task needs one.
        synthetic: whether the cached volume is a generated one.
    """
    prep = case.meta.get("prep_hash") if isinstance(getattr(case, "meta", None), dict) else None
    # Why the arrays' digest and not only the preprocessing hash: a cohort made again under the same
    # case ids (another phantom profile or seed, a corrected scan) must not read back runs trained
    # or tested on the old volumes. Hashing 64^3 x 4 floats takes milliseconds.
    digest = hashlib.sha256()
    for arr in (case.image, case.seg):
        if arr is not None:
            digest.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return CaseItem(image=case.image, seg=case.seg, brain=case.brain, label=label,
                    group=str(case.case_id), synthetic=synthetic,
                    content_key=f"prep:{prep}:sha256:{digest.hexdigest()[:16]}")


def items_from_cache(
    cache: Any, case_ids: Iterable[str], labels: Mapping[str, int] | None = None
) -> list[CaseItem]:
    """Real `CaseItem`s for `case_ids` from a `CaseCache`.

    Args:
        cache: an `aldm_fed.data.cache.CaseCache`.
        case_ids: the cases (e.g. `manifest.cases("target")`).
        labels: case id -> 0/1 (from `encode_case_labels`); None for the slice task.
    """
    out = []
    for case_id in case_ids:
        label = None if labels is None else labels.get(case_id)
        if labels is not None and label is None:
            raise ValueError(f"case {case_id!r} has no entry in labels")
        out.append(item_from_cached(cache.load(case_id), label))
    return out


def items_from_synthesis(
    out_dir: str | os.PathLike[str], *, label_map: Mapping[str, int] | None = None
) -> list[CaseItem]:
    """Synthetic `CaseItem`s from an `aldm-fed synthesize` output folder.

    Reads `synthesis.json` (modalities, sample order), each case's `record.json` and NIfTI files,
    and `labels.csv` (the case label). Each item's `source_groups` holds the mask's source case
    and the host case; its `content_key` is the hash of its record (settings hash, seed, mask
    transforms), so a re-synthesised case gets a new key.

    Args:
        out_dir: the synthesis output folder.
        label_map: raw case label (labels.csv) -> 0/1, for the volume task; None = no labels.

    Raises:
        ValueError: a missing or incomplete folder, or a label the map does not know.
    """
    import csv

    import nibabel as nib

    from aldm_fed.synthesis.writer import LABELS_NAME, MANIFEST_NAME, read_record

    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out}: no readable synthesis.json ({exc}); run `aldm-fed synthesize` first") from None
    if not manifest.get("complete"):
        raise ValueError(f"{out}: the synthesis run is not complete; rerun `aldm-fed synthesize` to finish it")
    modalities = list(manifest["model"]["modalities"])
    raw_labels: dict[str, str] = {}
    column = (manifest.get("settings") or {}).get("label_column", "grade")
    if (out / LABELS_NAME).is_file():
        with open(out / LABELS_NAME, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get(column):
                    raw_labels[row["case_id"]] = row[column]
    items = []
    for sample in manifest["samples"]:
        sid = str(sample["synth_id"])
        folder = out / sid
        record = read_record(folder, sid, modalities)
        if record is None:
            raise ValueError(f"{folder}: missing, incomplete or without a readable record.json")
        files = record["files"]
        image = np.stack([np.asarray(nib.load(str(folder / files[m])).dataobj, dtype=np.float32)
                          for m in modalities])
        seg = np.asarray(nib.load(str(folder / files["seg"])).dataobj, dtype=np.uint8)
        label = None
        if label_map is not None:
            raw = raw_labels.get(sid, record.get("label"))
            if raw is None or raw not in label_map:
                raise ValueError(
                    f"{sid}: label {raw!r} in {out / LABELS_NAME} is not in label_map {sorted(label_map)}"
                )
            label = int(label_map[raw])
        sources = tuple(dict.fromkeys(str(record[k]) for k in ("source_case", "host_case") if record.get(k)))
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        items.append(CaseItem(image=image, seg=seg, group=sid, label=label, synthetic=True,
                              source_groups=sources, content_key=f"record:{digest}"))
    return items


def _axis(axis: int) -> int:
    if axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"slice axis must index one of the 3 spatial axes, got {axis}")
    return axis % 3


def slice_labels(seg: np.ndarray, axis: int = -1) -> np.ndarray:
    """1 for each slice along `axis` that holds any tumour voxel (`seg > 0`), else 0.

    Args:
        seg: (S, S, S) label volume.
        axis: spatial axis the slices are cut along (-1: axial in the RAS cache).
    """
    a = _axis(axis)
    others = tuple(i for i in range(3) if i != a)
    return (np.asarray(seg) > 0).any(axis=others).astype(np.int64)


def _brain_fractions(item: CaseItem, axis: int) -> np.ndarray:
    a = _axis(axis)
    others = tuple(i for i in range(3) if i != a)
    return item.brain_mask().mean(axis=others)


@dataclass
class TaskData:
    """Samples of a task: references into volumes plus labels, patient ids and origin.

    Attributes:
        task: "slice" or "volume".
        items: the volumes.
        refs: (N, 2) int: item index and slice index (-1 for a volume sample).
        labels: (N,) int64 0/1.
        groups: (N,) patient id per sample (str objects): a real scan's patient (`data.patients`:
            BraTS 2023 follow-ups share one), a synthetic volume's own id. The bootstrap's unit.
        synthetic: (N,) bool, True for samples from synthetic volumes.
        axis: slice axis (slice task).
    """

    task: str
    items: list[CaseItem]
    refs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    synthetic: np.ndarray
    axis: int = -1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def spatial_dims(self) -> int:
        return 2 if self.task == "slice" else 3

    @property
    def in_channels(self) -> int:
        return self.items[0].channels

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, *spatial) of one sample."""
        c, *grid = self.items[0].image.shape
        if self.task == "slice":
            del grid[_axis(self.axis)]
        return (int(c), *(int(g) for g in grid))

    @property
    def n_groups(self) -> int:
        return len(set(self.groups.tolist()))

    def class_counts(self) -> tuple[int, int]:
        """(negatives, positives)."""
        pos = int(self.labels.sum())
        return len(self) - pos, pos

    def inputs(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (B, C, *spatial) for the samples at `indices`.

        Args:
            indices: sample indices into this task.
        """
        out = np.empty((len(indices), *self.sample_shape), dtype=np.float32)
        a = _axis(self.axis) + 1  # +1: channel axis first
        for j, i in enumerate(indices):
            item_idx, k = (int(v) for v in self.refs[int(i)])
            image = self.items[item_idx].image
            out[j] = image if k < 0 else np.take(image, k, axis=a)
        return out


def _check_items(items: Sequence[CaseItem]) -> None:
    if not items:
        raise ValueError("no items: a task needs at least one volume")
    for it in items:
        if not isinstance(it, CaseItem):
            raise ValueError(f"expected CaseItem objects, got {type(it).__name__}")
    shapes = {tuple(it.image.shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"all volumes must share one shape (C, S, S, S); got {sorted(shapes)}")


def slice_task(
    items: Sequence[CaseItem], *, min_brain_fraction: float = 0.0, axis: int = -1
) -> TaskData:
    """Axial-slice task: tumour slice (1) vs non-tumour slice (0), patient id kept per slice.

    Args:
        items: volumes with `seg`.
        min_brain_fraction: leave out slices whose brain area is below this fraction of the
            slice (0 keeps every slice).
        axis: spatial axis to slice along (-1: axial in the RAS cache).

    Raises:
        ValueError: no items, mixed shapes, or an item without `seg`.
    """
    _check_items(items)
    if not 0.0 <= min_brain_fraction < 1.0:
        raise ValueError(f"min_brain_fraction must be in [0, 1), got {min_brain_fraction}")
    refs, labels, groups, synthetic = [], [], [], []
    for i, it in enumerate(items):
        if it.seg is None:
            raise ValueError(f"{it.group}: the slice task needs a tumour mask (seg)")
        lab = slice_labels(it.seg, axis)
        keep = np.arange(lab.shape[0])
        if min_brain_fraction > 0:
            keep = keep[_brain_fractions(it, axis) >= min_brain_fraction]
        refs += [(i, int(k)) for k in keep]
        labels.append(lab[keep])
        groups += [_patient(it)] * len(keep)
        synthetic += [it.synthetic] * len(keep)
    return TaskData(
        task="slice",
        items=list(items),
        refs=np.asarray(refs, dtype=np.int64).reshape(-1, 2),
        labels=np.concatenate(labels).astype(np.int64),
        groups=np.asarray(groups, dtype=object),
        synthetic=np.asarray(synthetic, dtype=bool),
        axis=axis,
    )


def volume_task(items: Sequence[CaseItem]) -> TaskData:
    """Volume task: one sample per case, label = the case label (0/1).

    Args:
        items: volumes with `label` set.

    Raises:
        ValueError: no items, mixed shapes, or an item without a label.
    """
    _check_items(items)
    unlabelled = [it.group for it in items if it.label is None]
    if unlabelled:
        raise ValueError(f"the volume task needs a case label for every item; none for {unlabelled[:10]}")
    return TaskData(
        task="volume",
        items=list(items),
        refs=np.asarray([(i, -1) for i in range(len(items))], dtype=np.int64).reshape(-1, 2),
        labels=np.asarray([it.label for it in items], dtype=np.int64),
        groups=np.asarray([_patient(it) for it in items], dtype=object),
        synthetic=np.asarray([it.synthetic for it in items], dtype=bool),
    )


def _patient(item: CaseItem) -> str:
    return item.group if item.synthetic else patient_id(item.group)


def make_task(task: str, items: Sequence[CaseItem], *, min_brain_fraction: float = 0.0,
              axis: int = -1) -> TaskData:
    """`slice_task` or `volume_task` by name.

    Args:
        task: "slice" or "volume".
        items: the volumes.
        min_brain_fraction: slice task only (see `slice_task`).
        axis: slice task only.
    """
    if task == "slice":
        return slice_task(items, min_brain_fraction=min_brain_fraction, axis=axis)
    if task == "volume":
        return volume_task(items)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def training_groups(items: Iterable[CaseItem]) -> set[str]:
    """Patients a training set draws on: each item's group, plus the real patients behind each
    synthetic item (`source_groups`: mask source and host).

    Args:
        items: the training volumes.
    """
    out: set[str] = set()
    for it in items:
        out.add(it.group)
        out.update(it.source_groups)
    return out


def check_no_leakage(train_groups: Iterable[Any], test_groups: Iterable[Any]) -> None:
    """Raise if any patient is in both the training and the test side.

    Args:
        train_groups: patient ids of the training samples (repeats allowed, e.g. one per slice).
        test_groups: patient ids of the test samples.

    Raises:
        ValueError: naming the overlapping patient(s).
    """
    # By patient: a follow-up scan of a training patient in test is a leak too.
    both = sorted({patient_id(str(g)) for g in train_groups} & {patient_id(str(g)) for g in test_groups})
    if both:
        shown = ", ".join(both[:10]) + (f" and {len(both) - 10} more" if len(both) > 10 else "")
        raise ValueError(
            f"patient leakage: {len(both)} patient(s) in both train and test: {shown}. Slices or "
            "samples of one patient must stay on one side of the split."
        )


def check_real_test_items(items: Iterable[CaseItem]) -> None:
    """Raise if any test item is synthetic: every result is measured on real cases only.

    Args:
        items: the test volumes.

    Raises:
        ValueError: naming the synthetic item(s).
    """
    fake = [it.group for it in items if it.synthetic]
    if fake:
        raise ValueError(
            f"synthetic item(s) passed as test data: {fake[:10]}; test on held-out REAL cases only"
        )
