"""Site manifests: which cases of a site are source, few-shot target, validation, test and oracle.

One JSON file per site. Splits are deterministic from a seed and stratified by a case-level label
when one is given, so the K few-shot cases of a site are as balanced as its cohort allows.

| split | role |
|---|---|
| `source` | source-domain cases: pre-train the shared VAE and backbone |
| `target` | the K few-shot cases: adapt the site's ControlNet, train its classifiers |
| `val` | validation cases: every setting is chosen on them (`aldm-fed evaluate --split val`) |
| `test` | held-out test cases: the reported results, and nothing else |
| `oracle` | more real cases, used only by the `oracle` regime (an upper bound at a site with no source cases) |

```json
{"version": 2, "site": "A", "data_root": "../A", "seed": 0, "k": 16,
 "label_column": "grade",
 "splits": {"source": [...], "target": [...], "val": [...], "test": [...], "oracle": [...]},
 "labels": {"PH-A-0000": {"grade": "HGG"}}}
```
A relative `data_root` is resolved against the folder that holds the manifest file. Version 1 files
(no `val`, no `oracle`) are read as they are, with those two splits empty.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aldm_fed.data.patients import patients_of
from aldm_fed.io import atomic_write_json

__all__ = [
    "MANIFEST_VERSION",
    "SPLITS",
    "ManifestError",
    "SiteManifest",
    "make_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1: the same fields, without the val and oracle splits
SPLITS: tuple[str, ...] = ("source", "target", "val", "test", "oracle")
# The order `make_manifest` fills them: test last, so "the rest" can be the test cases; with n_val and
# n_oracle 0 this draws exactly the splits version 1 drew.
SPLITS_ORDER: tuple[str, ...] = ("target", "source", "val", "oracle", "test")


class ManifestError(ValueError):
    """A manifest file is unreadable or inconsistent; the message names the file."""


@dataclass
class SiteManifest:
    """The cases of one site and their roles.

    Args:
        site: site name (used in paths and logs; no case data).
        data_root: folder holding the site's case folders; relative to the manifest's folder.
        splits: split name -> case ids; a case is in at most one split.
        labels: case id -> {column: value} case-level labels (e.g. grade).
        seed: seed the splits were drawn with.
        k: the few-shot budget the target split was drawn for.
        label_column: the column splits were stratified by, if any.
    """

    site: str
    data_root: str
    splits: dict[str, list[str]]
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    seed: int = 0
    k: int = 16
    label_column: str | None = None
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        for name in SPLITS:
            self.splits.setdefault(name, [])
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"site {self.site!r}: unknown split(s) {sorted(unknown)}; expected {SPLITS}")
        seen: dict[str, str] = {}
        for name, ids in self.splits.items():
            for case_id in ids:
                if seen.get(case_id) == name:
                    raise ValueError(f"site {self.site!r}: case {case_id!r} is listed twice in split {name!r}")
                if case_id in seen:
                    raise ValueError(
                        f"site {self.site!r}: case {case_id!r} is in both {seen[case_id]!r} and {name!r}"
                        " (a patient in two splits leaks test data into training)"
                    )
                seen[case_id] = name

    def cases(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self.splits[split])

    @property
    def all_cases(self) -> list[str]:
        return [c for name in SPLITS for c in self.splits[name]]

    def label(self, case_id: str, column: str | None = None) -> str | None:
        column = column or self.label_column
        if column is None:
            return None
        return self.labels.get(case_id, {}).get(column)

    def resolve_root(self, manifest_path: str | Path) -> Path:
        root = Path(self.data_root)
        return root if root.is_absolute() else (Path(manifest_path).parent / root).resolve()

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "site": self.site,
            "data_root": self.data_root,
            "seed": self.seed,
            "k": self.k,
            "label_column": self.label_column,
            "splits": {name: list(self.splits[name]) for name in SPLITS},
            "labels": self.labels,
        }


def make_manifest(
    site: str,
    case_ids: Sequence[str],
    *,
    k: int = 16,
    n_source: int = 0,
    n_test: int | None = None,
    n_val: int = 0,
    n_oracle: int = 0,
    labels: Mapping[str, Mapping[str, str]] | None = None,
    label_column: str | None = None,
    seed: int = 0,
    data_root: str = ".",
) -> SiteManifest:
    """Draw deterministic, label-stratified splits for one site.

    Target (the K few-shot cases) is drawn first, then source, validation, oracle and test (all
    remaining cases when `n_test` is None). Every scan of one patient (BraTS 2023 follow-ups,
    `data.patients`) lands in the same split.

    Args:
        site: site name.
        case_ids: every usable case of the site.
        k: number of few-shot target cases.
        n_source: number of source-domain cases kept at this site (0: none).
        n_test: number of held-out test cases; None takes the rest.
        n_val: number of validation cases (settings are chosen on them, never on test cases).
        n_oracle: number of extra real cases for the `oracle` regime only (its larger real pool).
        labels: case id -> {column: value}.
        label_column: stratify by this column of `labels` (cases without it form their own stratum).
        seed: split seed; the site name is mixed in so sites with equal ids still differ.
        data_root: stored as given (relative to the manifest file's folder).
    """
    if not _is_plain_name(site):
        raise ValueError(f"site name {site!r} cannot name a folder (empty, '.', '..', a path separator or a"
                         " control character)")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError(f"site {site!r}: duplicate case ids in input")
    need = k + n_source + n_val + n_oracle + (n_test or 0)
    if min(k, n_source, n_val, n_oracle) < 0 or (n_test is not None and n_test < 0):
        raise ValueError(f"site {site!r}: k, n_source, n_val, n_oracle and n_test must be >= 0")
    if need > len(ids):
        raise ValueError(
            f"site {site!r}: {len(ids)} cases cannot fill k={k} target + {n_source} source"
            f" + {n_val} val + {n_oracle} oracle + {n_test or 0} test"
        )
    labels = {c: dict(v) for c, v in (labels or {}).items()}
    if label_column is not None:
        missing = [c for c in ids if label_column not in labels.get(c, {})]
        if len(missing) == len(ids):
            raise ValueError(f"site {site!r}: no case has label column {label_column!r}")
    order = _stratified_order(ids, labels, label_column, seed=seed ^ zlib.crc32(site.encode()))
    quotas = {"target": k, "source": n_source, "val": n_val, "oracle": n_oracle, "test": n_test}
    filled = dict(zip(SPLITS_ORDER, _fill_by_patient(order, [quotas[n] for n in SPLITS_ORDER], site), strict=True))
    return SiteManifest(
        site=site,
        data_root=data_root,
        splits={name: sorted(filled[name]) for name in SPLITS},
        labels={c: labels[c] for c in ids if c in labels},
        seed=seed,
        k=k,
        label_column=label_column,
    )


def _fill_by_patient(order: list[str], quotas: list[int | None], site: str) -> list[list[str]]:
    """Fill the splits in turn (`SPLITS_ORDER`) with whole patients, in the order of their
    first case: all scans of a patient (BraTS 2023 follow-ups) land in one split, so none leaks from
    training into test. With one scan per patient this is `order` cut at the quotas. A quota of
    None takes every patient left; a patient too large for what is left of a split goes to the next.
    """
    splits: list[list[str]] = [[] for _ in quotas]
    pending = list(patients_of(order).values())
    for i, quota in enumerate(quotas):
        left: list[list[str]] = []
        for scans in pending:
            if quota is None or len(splits[i]) + len(scans) <= quota:
                splits[i].extend(scans)
            else:
                left.append(scans)
        pending = left
        if quota is not None and len(splits[i]) < quota:
            raise ValueError(f"site {site!r}: cannot fill split {SPLITS_ORDER[i]!r} with exactly {quota} cases of "
                             "whole patients (a patient's scans stay in one split); change its size by one")
    return splits


def _stratified_order(
    ids: list[str], labels: Mapping[str, Mapping[str, str]], column: str | None, *, seed: int
) -> list[str]:
    """Order cases so that every prefix holds the strata in proportion (why: any K is balanced)."""
    rng = np.random.default_rng(seed)
    strata: dict[str, list[str]] = {}
    for case_id in ids:
        key = labels.get(case_id, {}).get(column, "") if column else ""
        strata.setdefault(key, []).append(case_id)
    keyed: list[tuple[float, float, str]] = []
    for members in strata.values():
        perm = rng.permutation(len(members))
        for rank, idx in enumerate(perm):
            keyed.append(((rank + 0.5) / len(members), float(rng.random()), members[idx]))
    keyed.sort()
    return [case_id for _, _, case_id in keyed]


def _is_plain_name(name: str) -> bool:
    """A usable site or case name: one non-empty path component without control characters."""
    return (bool(name.strip()) and name not in (".", "..") and "/" not in name and "\\" not in name
            and name.isprintable())


def write_manifest(manifest: SiteManifest, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, manifest.to_dict())
    return path


def read_manifest(path: str | Path) -> SiteManifest:
    """Read and check a manifest; every problem raises ManifestError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: manifest must be a JSON object, got {type(raw).__name__}")
    version = raw.get("version", MANIFEST_VERSION)
    if version not in _READABLE_VERSIONS or isinstance(version, bool):
        raise ManifestError(f"{path}: manifest version {version!r} is not supported (expected one of "
                            f"{list(_READABLE_VERSIONS)})")
    for key, kind in (("site", str), ("data_root", str), ("splits", dict)):
        if not isinstance(raw.get(key), kind):
            raise ManifestError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if not _is_plain_name(raw["site"]):  # site names become folder names (runs/.../sites/<site>)
        raise ManifestError(f"{path}: field 'site' {raw['site']!r} cannot name a site "
                            "(empty, '.', '..', a path separator or a control character)")
    for key in ("seed", "k"):  # bool is an int subclass; true/false here is a mistake
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ManifestError(f"{path}: field {key!r} must be an integer >= 0, got {value!r}")
    if not isinstance(raw.get("label_column"), str | None):
        raise ManifestError(f"{path}: field 'label_column' must be a string or null, got {raw['label_column']!r}")
    splits = raw["splits"]
    for name, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            raise ManifestError(f"{path}: split {name!r} must be a list of case id strings")
        bad = [c for c in ids if not _is_plain_name(c)]
        if bad:  # case ids become cache folder names
            raise ManifestError(f"{path}: split {name!r} holds case id(s) {bad[:5]} that cannot name a case "
                                "folder (empty, '.', '..', a path separator or a control character)")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, dict) for v in labels.values()):
        raise ManifestError(f"{path}: field 'labels' must map case ids to objects")
    for case_id, row in labels.items():
        odd = {k: v for k, v in row.items() if not isinstance(v, str | int | float)}
        if odd:
            raise ManifestError(f"{path}: field 'labels' of case {case_id!r}: values must be strings or numbers, "
                                f"got {odd}")
    try:
        return SiteManifest(
            site=raw["site"],
            data_root=raw["data_root"],
            splits={name: list(ids) for name, ids in splits.items()},
            labels={c: {str(k): str(v) for k, v in row.items()} for c, row in labels.items()},
            seed=int(raw.get("seed", 0)),
            k=int(raw.get("k", 16)),
            label_column=raw.get("label_column"),
        )
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
