"""Checkpoints: safetensors weights + JSON metadata. Loading one never runs pickle code.

A checkpoint is a directory, published by `aldm_fed.io.atomic_dir` (built under a temporary name,
renamed when complete), so a reader sees either the old checkpoint or the whole new one:

    NAME/
      tensors.safetensors   every tensor; keys are namespaced by group: "vae.encoder.conv.weight",
                            "ema.unet.out.2.conv.bias", "optim.unet.state.0.exp_avg", "rng.torch"
      meta.json             format + version, created time, library versions, the group names,
                            size + sha256 of tensors.safetensors, and the caller's metadata
                            (config as a plain dict, step, scale_factor, data_hash, ...)

Why a directory rather than NAME.safetensors + NAME.json: two files cannot be replaced together
atomically, and meta.json holds the checksum of its weights, so they must appear as one unit.

Groups are what later decides sharing: the federation allow-list names groups ("unet",
"controlnet"), and `load_checkpoint(path, groups=[...])` reads only those tensors. Non-weight state
that a resume needs (optimizer state, RNG state) is flattened into tensors + a JSON structure by
`optimizer_state_to_tensors` / `rng_state_to_tensors`, so it too avoids pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import aldm_fed
from aldm_fed.io import atomic_dir, atomic_write_text

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CheckpointError",
    "PickleCheckpointError",
    "library_versions",
    "load_checkpoint",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "plain_config",
    "restore_rng_state",
    "rng_state_to_tensors",
    "save_checkpoint",
    "sha256_file",
]

FORMAT = "aldm-fed-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
# Keys that save_checkpoint writes itself; the caller's meta may not use them.
_RESERVED_META = frozenset({"format", "format_version", "created", "versions", "groups", "weights"})
# Formats that torch.load would unpickle (arbitrary code on load); never opened.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged, or not in aldm-fed's format."""


class PickleCheckpointError(CheckpointError):
    """A pickle-based file (torch.save, .pt/.pth/.ckpt/.pkl) was offered; it is never opened."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the checkpoint directory.
        tensors: group name -> {key within the group -> tensor}; e.g. tensors["unet"] loads with
            `unet.load_state_dict(ckpt.tensors["unet"])`.
        meta: the parsed meta.json (format fields + the caller's metadata).
    """

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any]

    @property
    def step(self) -> int | None:
        """The training step recorded at save time, if any."""
        return self.meta.get("step")

    @property
    def config(self) -> dict[str, Any]:
        """The run config recorded at save time (a plain dict; empty if none was given)."""
        return self.meta.get("config") or {}

    @property
    def scale_factor(self) -> float | None:
        """The latent scale factor, for checkpoints of the diffusion stages."""
        return self.meta.get("scale_factor")

    @property
    def groups(self) -> list[str]:
        """All group names stored in the file (not only the loaded ones)."""
        return list(self.meta.get("groups", []))


# --------------------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors_by_group: Mapping[str, Mapping[str, torch.Tensor] | nn.Module],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at `path` atomically and return `path`.

    Args:
        path: the checkpoint directory to create or replace, e.g. ``run/checkpoints/step_00000100``.
        tensors_by_group: group name -> module (its `state_dict()` is saved) or flat dict of
            tensors. Names may contain dots ("ema.unet", "optim.unet") but no group may be the
            dotted prefix of another ("ema" beside "ema.unet"), so every key maps back to one group.
        meta: JSON-serialisable metadata: conventionally `config` (DictConfig, dataclass or dict;
            stored as a plain dict), `step`, `scale_factor`, `data_hash`; any other keys too.

    Raises:
        ValueError: bad group names, a reserved meta key, a non-tensor value, a pickle suffix.
        TypeError: metadata that JSON cannot hold.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: checkpoints are directories; {path.suffix} suggests pickle")
    user_meta = plain_config(dict(meta or {}))
    clash = _RESERVED_META & set(user_meta)
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved for the checkpoint format")
    groups = {name: _group_tensors(name, obj) for name, obj in tensors_by_group.items()}
    _check_group_names(list(groups))
    flat = _savable({f"{g}.{k}": t for g, ts in groups.items() for k, t in ts.items()})
    # Serialise the metadata before writing any tensor: a bad value fails fast and leaves nothing.
    json.dumps(user_meta)

    with atomic_dir(path) as tmp:
        weights = tmp / WEIGHTS_FILE
        # One key only: safetensors writes its metadata map in hash order, which varies between
        # processes, and the file's sha256 must depend on the tensors alone (a site re-saving the
        # server's global weights must get the server's hash).
        header = {"format": f"{FORMAT}/{FORMAT_VERSION}"}
        save_file(flat, str(weights), metadata=header)
        _fsync(weights)  # atomic_dir renames; the data must be on disk before that rename
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            **user_meta,
            "groups": list(groups),
            "weights": {
                "file": WEIGHTS_FILE,
                "bytes": weights.stat().st_size,
                "sha256": sha256_file(weights),
            },
        }
        atomic_write_text(tmp / META_FILE, json.dumps(doc, indent=2) + "\n")
    return path


def _group_tensors(
    name: str, obj: Mapping[str, torch.Tensor] | nn.Module
) -> dict[str, torch.Tensor]:
    items = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(items, Mapping):
        raise ValueError(
            f"group {name!r}: expected an nn.Module or a dict of tensors, got {type(obj).__name__}"
        )
    for key, value in items.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"group {name!r}, key {key!r}: {type(value).__name__} is not a tensor")
    return dict(items)


def _check_group_names(names: Sequence[str]) -> None:
    for name in names:
        if not _GROUP_RE.match(name):
            raise ValueError(f"bad group name {name!r}: use letters, digits, _ and - between dots")
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise ValueError(f"group {a!r} is a prefix of group {b!r}: keys would be ambiguous")


def _savable(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage (tied weights do): clone
    # the second and later users of a storage.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in flat.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


# --------------------------------------------------------------------------------------- load


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    groups: Sequence[str] | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Verify and load a checkpoint directory written by `save_checkpoint`.

    Args:
        path: the checkpoint directory (or its meta.json / tensors.safetensors).
        groups: groups to load (e.g. ``["unet"]``); None loads all. Unknown names raise.
        map_location: device the tensors are moved to.

    Raises:
        PickleCheckpointError: `path` is a pickle-based file (by suffix or by its first bytes).
        CheckpointError: missing, truncated or tampered files, or not aldm-fed's format.
    """
    path = Path(path)
    if path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
        if path.name in (WEIGHTS_FILE, META_FILE):
            path = path.parent
        else:
            raise CheckpointError(
                f"{path} is a single file; an aldm-fed checkpoint is a directory holding "
                f"{WEIGHTS_FILE} and {META_FILE}"
            )
    if not path.is_dir():
        old = path.with_name(f".{path.name}.old")
        hint = f" (an interrupted save left the previous version at {old})" if old.is_dir() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")

    meta = _read_meta(path / META_FILE)
    weights = path / WEIGHTS_FILE
    _verify_weights(weights, meta["weights"])
    stored = list(meta["groups"])
    wanted = stored if groups is None else list(groups)
    unknown = [g for g in wanted if g not in stored]
    if unknown:
        raise CheckpointError(f"{path}: no group(s) {unknown}; it holds {stored}")

    tensors: dict[str, dict[str, torch.Tensor]] = {g: {} for g in wanted}
    by_length = sorted(stored, key=len, reverse=True)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                group = next((g for g in by_length if key.startswith(g + ".")), None)
                if group is None:
                    raise CheckpointError(f"{weights}: key {key!r} belongs to no group {stored}")
                if group in tensors:
                    tensors[group][key[len(group) + 1 :]] = f.get_tensor(key).to(map_location)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from exc
    return Checkpoint(path=path, tensors=tensors, meta=meta)


def _refuse_pickle(path: Path) -> None:
    reason = ""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        reason = f"its suffix {path.suffix!r} is a pickle format (torch.save)"
    elif path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head.startswith(b"PK\x03\x04"):
            reason = "it is a zip archive, the container torch.save uses for pickled tensors"
        elif len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode + version
            if not _looks_like_safetensors(path, head):
                reason = "it starts with a pickle header"
    if reason:
        raise PickleCheckpointError(
            f"refusing to load {path}: {reason}, and unpickling runs arbitrary code. aldm-fed "
            f"checkpoints are safetensors + JSON directories (see aldm_fed.checkpoints); convert "
            f"trusted weights with save_checkpoint."
        )


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length, then "{". A header of
    # 640 bytes begins 0x80 0x02, like pickle protocol 2, so the magic alone cannot decide.
    n = int.from_bytes(head[:8], "little")
    return len(head) > 8 and head[8:9] == b"{" and 8 + n <= path.stat().st_size


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint metadata {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc}): damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not an {FORMAT} metadata file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {version!r} is newer than this aldm-fed reads "
            f"({FORMAT_VERSION}); upgrade aldm-fed"
        )
    weights = meta.get("weights")
    if not (isinstance(weights, dict) and {"bytes", "sha256"} <= weights.keys() and "groups" in meta):
        raise CheckpointError(f"{meta_path} lacks the weights checksum or the group list")
    return meta


def _verify_weights(weights: Path, expected: Mapping[str, Any]) -> None:
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} are missing")
    _refuse_pickle(weights)  # someone may have dropped a torch.save file in under our name
    size = weights.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{weights} is {size} bytes but its metadata says {expected['bytes']}: the file is "
            f"{'truncated' if size < expected['bytes'] else 'damaged'}"
        )
    digest = sha256_file(weights)
    if digest != expected["sha256"]:
        raise CheckpointError(
            f"checksum mismatch for {weights}: sha256 {digest} != {expected['sha256']} in "
            f"{META_FILE}; the file is damaged or was modified"
        )


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: file to hash.
        chunk: bytes per read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# ----------------------------------------------------------------- metadata and plain configs


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint: aldm_fed, torch, monai, safetensors, numpy, python."""
    from importlib.metadata import PackageNotFoundError, version  # light; avoids importing monai

    out = {"aldm_fed": aldm_fed.__version__, "torch": torch.__version__}
    for pkg in ("monai", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    return out


def plain_config(obj: Any) -> Any:
    """Turn OmegaConf containers, dataclasses, Paths and numpy scalars into plain JSON types.

    Args:
        obj: a config (DictConfig, dataclass, mapping, list) or any nested mix of them.
    """
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return plain_config(OmegaConf.to_container(obj, resolve=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_config(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------- optimizer / RNG state as tensors + JSON (no pickle)


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's `state_dict()` into tensors + a JSON structure.

    Works for any state dict made of tensors, numbers, strings, None, lists, tuples and dicts
    (also LR schedulers and GradScalers). Tensors keep dtype and values bit-exactly (the Adam
    `step` counter is a float32 tensor in torch 2.x); int keys and tuples (Adam's `betas`) are
    tagged in the JSON so `optimizer_state_from_tensors` rebuilds an equal state dict.

    Args:
        optimizer: the optimizer (or anything with `state_dict()`), or a state dict.

    Returns:
        (tensors keyed like "state.0.exp_avg", JSON-serialisable structure referring to them).
    """
    state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    return tensors, structure


def optimizer_state_from_tensors(
    tensors: Mapping[str, torch.Tensor], structure: Any
) -> dict[str, Any]:
    """Rebuild the state dict flattened by `optimizer_state_to_tensors`.

    Args:
        tensors: the tensors (e.g. `ckpt.tensors["optim.unet"]`).
        structure: the JSON structure saved beside them.

    Returns:
        A state dict for `optimizer.load_state_dict(...)`.
    """
    return _decode(structure, tensors)


def rng_state_to_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture the global RNGs (torch CPU, CUDA when initialised, numpy, Python) without pickle.

    torch states are uint8 tensors; numpy's MT19937 key and Python's state go into the JSON.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(state, "", tensors)


def restore_rng_state(tensors: Mapping[str, torch.Tensor], structure: Any) -> None:
    """Restore the global RNGs captured by `rng_state_to_tensors`.

    Args:
        tensors: the tensors (e.g. `ckpt.tensors["rng"]`).
        structure: the JSON structure saved beside them.
    """
    state = _decode(structure, tensors)
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to("cpu", torch.uint8) for t in state["cuda"]])


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    # JSON types pass through; the rest are tagged dicts ("__tensor__", "__tuple__", ...).
    if isinstance(obj, torch.Tensor):
        name = path or "value"
        if name in tensors:
            raise ValueError(f"two state entries flatten to the same tensor name {name!r}")
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.ravel().tolist(), "dtype": str(obj.dtype), "shape": [*obj.shape]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        # Non-string keys (optimizer state is keyed by parameter index) keep their type.
        items = [[_encode(k, "", {}), _encode(v, _join(path, k), tensors)] for k, v in obj.items()]
        return {"__items__": items}
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '<root>'!r} without pickle")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {"__tensor__"}:
        name = obj["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"state refers to tensor {name!r}, which the checkpoint lacks")
        return tensors[name]
    if obj.keys() == {"__ndarray__", "dtype", "shape"}:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if obj.keys() == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if obj.keys() == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}
