"""The preprocessed cache that training reads (layout in docs/contracts.md).

```
CACHE/index.json                 # prep settings, prep_hash, modalities, size, case ids
CACHE/<case_id>/image.npy        # float32 (C, S, S, S) in [0, 1]
CACHE/<case_id>/seg.npy          # uint8 (S, S, S), labels 0..3
CACHE/<case_id>/brain.npy        # uint8 (S, S, S)
CACHE/<case_id>/meta.json        # affine of the cube grid (RAS), source files, crop box, prep_hash
```

`aldm_fed.data.preprocess.prepare_dataset` writes it; `CaseCache` reads it:

```python
cache = CaseCache("CACHE")
case = cache.load(cache.ids[0])        # memory-mapped arrays by default
case.image.shape, case.affine
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aldm_fed.io import atomic_dir, atomic_write_json

__all__ = [
    "CACHE_VERSION",
    "INDEX_NAME",
    "META_NAME",
    "CacheError",
    "CachedCase",
    "CaseCache",
    "load_cached_case",
    "read_index",
    "read_meta",
    "write_cached_case",
    "write_index",
]

CACHE_VERSION = 1
INDEX_NAME = "index.json"
META_NAME = "meta.json"


class CacheError(ValueError):
    """The cache is missing, corrupt or inconsistent; the message names the folder or file."""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_cached_case(
    cache_root: str | os.PathLike[str],
    case_id: str,
    image: np.ndarray,
    seg: np.ndarray,
    brain: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write one case folder atomically (built under a temporary name, then renamed)."""
    if not case_id or case_id.startswith(".") or "/" in case_id or "\\" in case_id:
        raise ValueError(f"case id {case_id!r} cannot be a cache folder name")
    folder = Path(cache_root) / case_id
    with atomic_dir(folder) as tmp:
        np.save(tmp / "image.npy", np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
        np.save(tmp / "seg.npy", np.ascontiguousarray(seg, dtype=np.uint8), allow_pickle=False)
        np.save(tmp / "brain.npy", np.ascontiguousarray(brain, dtype=np.uint8), allow_pickle=False)
        atomic_write_json(tmp / META_NAME, {"case_id": case_id, **meta})
    return folder


def write_index(cache_root: str | os.PathLike[str], index: dict[str, Any]) -> Path:
    """Write `index.json` (atomically); `index` needs prep_hash, modalities, size and cases."""
    path = Path(cache_root) / INDEX_NAME
    atomic_write_json(path, {"version": CACHE_VERSION, **index})
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: {what} is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CacheError(f"{path}: {what} must be a JSON object")
    return raw


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """`meta.json` of one cached case folder."""
    return _read_json(Path(folder) / META_NAME, "case metadata")


def read_index(cache_root: str | os.PathLike[str]) -> dict[str, Any]:
    """`index.json` of a cache, checked for the fields readers need."""
    root = Path(cache_root)
    if not root.is_dir():
        raise CacheError(f"{root}: cache folder not found (run `aldm-fed data prepare ROOT --out {root}`)")
    index = _read_json(root / INDEX_NAME, "cache index (run `aldm-fed data prepare` to write it)")
    version = index.get("version", CACHE_VERSION)
    if version != CACHE_VERSION:
        raise CacheError(f"{root / INDEX_NAME}: cache version {version!r} not supported (expected {CACHE_VERSION})")
    for key, kind in (("prep_hash", str), ("modalities", list), ("size", int), ("cases", list)):
        if not isinstance(index.get(key), kind):
            raise CacheError(f"{root / INDEX_NAME}: field {key!r} missing or not a {kind.__name__}")
    return index


@dataclass
class CachedCase:
    """One case from the cache.

    Args:
        case_id: the case.
        image: float32 (C, S, S, S) in [0, 1] (memory-mapped, read-only, when loaded with mmap).
        seg: uint8 (S, S, S) canonical labels 0..3.
        brain: uint8 (S, S, S), 1 inside the brain.
        meta: the case's meta.json.
        affine: 4x4 cube voxel -> RAS world (mm) of the source scans.
    """

    case_id: str
    image: np.ndarray
    seg: np.ndarray
    brain: np.ndarray
    meta: dict[str, Any]
    affine: np.ndarray


class CaseCache:
    """Read side of the preprocessed cache.

    Args:
        cache_root: the folder `prepare_dataset` wrote.

    Raises:
        CacheError: no cache there, or an unreadable/incomplete `index.json`.
    """

    def __init__(self, cache_root: str | os.PathLike[str]) -> None:
        self.root = Path(cache_root)
        self.index = read_index(self.root)
        self.prep_hash: str = self.index["prep_hash"]
        self.modalities: tuple[str, ...] = tuple(self.index["modalities"])
        self.size: int = int(self.index["size"])
        self.ids: list[str] = [str(c) for c in self.index["cases"]]

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.ids

    def __repr__(self) -> str:
        return f"CaseCache({str(self.root)!r}, {len(self)} cases, size={self.size}, modalities={self.modalities})"

    def load(self, case_id: str, mmap: bool = True) -> CachedCase:
        """Load one case (memory-mapped read-only arrays by default).

        Raises:
            CacheError: unknown case id, missing or corrupt file, or a case folder written with
                other settings than the index says (mismatched `prep_hash`).
        """
        if case_id not in self.ids:
            raise CacheError(f"{self.root / INDEX_NAME}: case {case_id!r} is not in the index "
                             f"({len(self.ids)} cases, e.g. {self.ids[:3]})")
        folder = self.root / case_id
        if not folder.is_dir():
            raise CacheError(f"{folder}: case folder missing though listed in {INDEX_NAME}; re-run prepare")
        return load_cached_case(folder, self.modalities, self.size, prep_hash=self.prep_hash, mmap=mmap)


def _array(path: Path, mmap: bool, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if not path.is_file():
        raise CacheError(f"{path.parent}: {path.name} missing (re-run `aldm-fed data prepare` to rebuild the case)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CacheError(f"{path}: corrupt array file ({exc}); delete the case folder and re-run prepare") from None
    if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != np.dtype(dtype):
        got = f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
        raise CacheError(f"{path}: holds {got}, expected {np.dtype(dtype)} {shape}")
    return arr


def load_cached_case(
    folder: str | os.PathLike[str],
    modalities: tuple[str, ...] | list[str],
    size: int,
    *,
    prep_hash: str | None = None,
    mmap: bool = True,
) -> CachedCase:
    """Load and check one cached case folder (memory-mapped: only headers are read).

    Raises:
        CacheError: missing or corrupt file, wrong shape or dtype, other modalities, or a
            `prep_hash` other than the given one; the message names the folder or file.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if prep_hash is not None and meta.get("prep_hash") != prep_hash:
        raise CacheError(f"{folder / META_NAME}: prep_hash {meta.get('prep_hash')!r} does not match {INDEX_NAME} "
                         f"({prep_hash!r}); the index is stale, re-run prepare")
    if list(meta.get("modalities", [])) != list(modalities):
        raise CacheError(f"{folder / META_NAME}: modalities {meta.get('modalities')} differ from the index "
                         f"{list(modalities)}")
    try:
        affine = np.asarray(meta["affine"], dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"shape {affine.shape}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{folder / META_NAME}: no valid 4x4 'affine' ({exc})") from None
    S, C = int(size), len(modalities)
    return CachedCase(
        case_id=str(meta.get("case_id", folder.name)),
        image=_array(folder / "image.npy", mmap, (C, S, S, S), np.float32),
        seg=_array(folder / "seg.npy", mmap, (S, S, S), np.uint8),
        brain=_array(folder / "brain.npy", mmap, (S, S, S), np.uint8),
        meta=meta,
        affine=affine,
    )
