"""Can this site serve this run? Checked in the hello phase, before any training.

The server's hello carries its protocol version, its phases and the shapes of the shared networks
it will send (`model_shapes`, built on PyTorch's "meta" device: no memory, no initialisation,
~0.05 s) with their fingerprint (`shapes_fingerprint`). The site builds the same shapes from the
run config with ITS installed code (another aldm-fed or MONAI version can build other networks
from the same config), compares, and checks that its own data holds every case of its manifest
with the run's modalities (`data_problems`). Any mismatch stops the run at connection time with an
error that names the site and the first differing key, instead of a crash in round 1.

The preprocessed cache needs no check: its folder is named for `data.size` and a cache written with
other data settings is re-prepared (`data.volumes.load_volumes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "data_problems",
    "decode_shapes",
    "encode_shapes",
    "model_shapes",
    "shape_mismatches",
    "shapes_fingerprint",
]

Shapes = dict[str, tuple[int, ...]]


def model_shapes(cfg: Any) -> Shapes:
    """Flat "<group>.<key>" -> shape of every network the run shares (vae, unet, controlnet).

    Args:
        cfg: the composed config (`model`, `data.modalities`, `diffusion`, ...).
    """
    from aldm_fed.federation.global_models import initial_weights

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        groups = {**initial_weights(cfg, "vae"), **initial_weights(cfg, "backbone")}
    return {f"{group}.{key}": tuple(int(d) for d in t.shape) for group, state in groups.items()
            for key, t in state.items()}


def encode_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """`shapes` as compact JSON (sorted keys), for a ConfigRecord string."""
    return json.dumps({k: list(shapes[k]) for k in sorted(shapes)}, separators=(",", ":"))


def decode_shapes(text: str) -> Shapes:
    """The inverse of `encode_shapes`.

    Raises:
        ValueError: not a JSON object of integer lists.
    """
    try:
        raw = json.loads(text)
        return {str(k): tuple(int(d) for d in v) for k, v in raw.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"the server's model shapes are not a JSON object of integer lists ({exc})") from None


def shapes_fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """SHA-256 of `encode_shapes(shapes)`: equal fingerprints, equal keys and shapes."""
    return hashlib.sha256(encode_shapes(shapes).encode()).hexdigest()


def shape_mismatches(server: Mapping[str, tuple[int, ...]], site: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every difference between the server's and the site's shapes, one line each, sorted by key."""
    out = []
    for key in sorted(set(server) | set(site)):
        if key not in site:
            out.append(f"{key}: {tuple(server[key])} at the server, absent here")
        elif key not in server:
            out.append(f"{key}: {tuple(site[key])} here, absent at the server")
        elif tuple(server[key]) != tuple(site[key]):
            out.append(f"{key}: {tuple(site[key])} here, {tuple(server[key])} at the server")
    return out


def data_problems(cohort: str | Path, site: str, modalities: list[str] | tuple[str, ...]) -> list[str]:
    """What the site's data lacks for this run: manifest cases without a folder, or without one of
    the run's modalities or the tumour mask. File names only, no file is read.

    Args:
        cohort: the site's cohort folder (holds `manifests/<site>.json`).
        site: the site.
        modalities: the run's `data.modalities`.
    """
    from aldm_fed.data.brats import find_cases, resolve_modalities
    from aldm_fed.data.volumes import site_manifests

    path, manifest = site_manifests(cohort, [site])[site]
    root = manifest.resolve_root(path)
    wanted = resolve_modalities(modalities)
    found = {c.case_id: c for c in find_cases(root)} if root.is_dir() else {}
    problems = []
    for case_id in manifest.all_cases:
        case = found.get(case_id)
        if case is None:
            problems.append(f"case {case_id}: no case folder below {root}")
            continue
        missing = [m for m in wanted if m not in case.images] + (["seg"] if case.seg is None else [])
        if missing:
            problems.append(f"case {case_id}: no {'/'.join(missing)} file in {case.folder}")
    return problems
