"""Encode volumes once with a trained VAE and keep the latents on disk.

Diffusion training never runs the VAE encoder per step: every case is encoded once (posterior
mean, UNSCALED) and saved as `<case_id>.npy` under `runs/<name>/latents/<key>/`, where the key
names the VAE checkpoint (first 16 hex of its weights' sha256), which of its weights encoded
(`ema` | `raw`), the encoder's precision (`fp32` | `bf16` | `fp16`) and the preprocessing
(`prep_hash`). A retrained VAE, other weights, another precision or other preprocessing gets a new
folder, and a folder whose `index.json` disagrees with what is asked for is re-encoded, so stale
latents are never reused. The
scale factor is applied when a batch is drawn (`LatentSet.batch`), so the same files serve the
scale statistics, the backbone and every site's ControlNet.

Why the posterior mean: a deterministic target (ALDM's default, `use_posterior_noise=False`), and
with the small KL weight the posterior std is tiny next to the latent spread anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL

from aldm_fed.data.volumes import VolumeSet
from aldm_fed.diffusion.ldm import encode
from aldm_fed.io import atomic_save_npy, atomic_write_json
from aldm_fed.training.device import DeviceSetup, autocast_context

__all__ = ["LatentSet", "encode_volumes", "latent_cache_key"]

log = logging.getLogger(__name__)

INDEX = "index.json"


# index.json fields that must match for cached latents to be reused.
_INDEX_CHECKED = ("precision", "prep_hash", "vae.sha256", "vae.weights")


def latent_cache_key(vae_sha256: str, prep_hash: str, *, weights: str, precision: str) -> str:
    """Folder name of the latents of one (VAE checkpoint, weights, precision, preprocessing).

    Args:
        vae_sha256: sha256 of the VAE checkpoint's weights.
        prep_hash: the cache's preprocessing hash.
        weights: which of the checkpoint's weights encode: "ema" or "raw".
        precision: the encoder's resolved precision ("fp32", "bf16", "fp16").
    """
    return f"{vae_sha256[:16]}-{weights}-{precision}-{prep_hash}"


def _index_fields(doc: dict[str, Any]) -> dict[str, Any]:
    vae = doc.get("vae") if isinstance(doc.get("vae"), dict) else {}
    return {"precision": doc.get("precision"), "prep_hash": doc.get("prep_hash"),
            "vae.sha256": vae.get("sha256"), "vae.weights": vae.get("weights")}


def _open_cache(folder: Path, index: dict[str, Any]) -> None:
    """Create `folder`'s index.json, or check it: on any mismatch the old latents are deleted."""
    path = folder / INDEX
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        want, have = _index_fields(index), _index_fields(stored if isinstance(stored, dict) else {})
        # Only fields this call knows about are compared (cache_info may leave the VAE out).
        differs = [k for k in _INDEX_CHECKED if want[k] is not None and have[k] != want[k]]
        if not differs:
            return
        log.warning("latent cache %s was encoded with other %s (%s != %s); encoding again", folder,
                    differs, [have[k] for k in differs], [want[k] for k in differs])
        for npy in folder.glob("*.npy"):
            npy.unlink()
    atomic_write_json(path, index)


@dataclass
class LatentSet:
    """Unscaled latents of some cases and their label maps, in a fixed order.

    Args:
        case_ids: the cases.
        latents: (N, latent_channels, d, h, w) float32 posterior means (unscaled).
        segs: per case, uint8 (S, S, S) label maps at image resolution (for the mask condition).
        sites: per case, its site.
        key: the latent cache key (VAE checkpoint + preprocessing), or "" when not cached.
    """

    case_ids: list[str]
    latents: torch.Tensor
    segs: list[np.ndarray]
    sites: list[str]
    key: str = ""

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return int(self.latents.shape[1])

    def batch(
        self, indices: Sequence[int], scale_factor: float, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents and label maps of the cases at `indices`.

        Args:
            indices: positions in this set (e.g. from `batch_indices`).
            scale_factor: multiplies the latents (as `aldm_fed.diffusion.ldm.encode` does).
            device: where the tensors go.

        Returns:
            (z0 (B, C, d, h, w) float32, labels (B, S, S, S) uint8).
        """
        idx = list(indices)
        z0 = self.latents[idx].to(device) * scale_factor
        labels = torch.from_numpy(np.stack([np.asarray(self.segs[i]) for i in idx])).to(device)
        return z0, labels

    def subset(self, indices: Sequence[int]) -> LatentSet:
        """The cases at `indices`.

        Args:
            indices: positions in this set.
        """
        idx = list(indices)
        return LatentSet(
            case_ids=[self.case_ids[i] for i in idx],
            latents=self.latents[idx],
            segs=[self.segs[i] for i in idx],
            sites=[self.sites[i] for i in idx],
            key=self.key,
        )

    def identity(self) -> dict[str, Any]:
        """Case ids (hashed) and the cache key: what a run trained on these latents depends on."""
        digest = hashlib.sha256(json.dumps(self.case_ids).encode()).hexdigest()[:16]
        return {"n_cases": len(self), "case_ids_sha256": digest, "latent_key": self.key}


@torch.no_grad()
def encode_volumes(
    vae: AutoencoderKL,
    volumes: VolumeSet,
    *,
    setup: DeviceSetup | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_info: dict[str, Any] | None = None,
    progress: bool = False,
) -> LatentSet:
    """Unscaled posterior-mean latents of every case, read from or written to `cache_dir`.

    Args:
        vae: the trained VAE (put in eval mode; moved to nothing: it must be on `setup.device`).
        volumes: the cases.
        setup: device and autocast for the encoder (default: CPU fp32).
        cache_dir: folder of `<case_id>.npy` files (see the module docstring); None = no cache.
        cache_info: recorded in the cache's index.json (`{"vae": {"sha256", "weights"}}`); an
            existing index.json that disagrees with it, the precision or the preprocessing makes
            the folder's latents be encoded again.
        progress: show a progress bar over the cases to encode.

    Returns:
        The latents, in the order of `volumes`.
    """
    from tqdm.auto import tqdm

    device = setup.device if setup is not None else torch.device("cpu")
    folder = Path(cache_dir) if cache_dir is not None else None
    if folder is not None:
        precision = setup.precision if setup is not None else "fp32"
        _open_cache(folder, {**(cache_info or {}), "precision": precision,
                             "prep_hash": volumes.prep_hash, "scaled": False})
    vae.eval()
    out: list[torch.Tensor] = []
    todo = 0
    shape: tuple[int, ...] | None = None
    for i in tqdm(range(len(volumes)), desc="encode", disable=not progress, leave=False):
        case_id = volumes.case_ids[i]
        path = folder / f"{case_id}.npy" if folder is not None else None
        z = None
        if path is not None and path.is_file():
            try:
                z = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):
                z = None  # torn or damaged file: encode again
            if z is not None and shape is not None and tuple(z.shape) != shape:
                z = None
        if z is None:
            x = volumes.images_batch([i], device)
            with autocast_context(setup):
                z = encode(vae, x, 1.0)[0]
            z = z.float().cpu()
            todo += 1
            if path is not None:
                atomic_save_npy(path, z.numpy())
        shape = tuple(z.shape)
        out.append(z)
    if todo:
        log.info("encoded %d of %d case(s) with the VAE%s", todo, len(volumes),
                 f" into {folder}" if folder is not None else "")
    return LatentSet(
        case_ids=list(volumes.case_ids),
        latents=torch.stack(out),
        segs=list(volumes.segs),
        sites=list(volumes.sites),
        key=folder.name if folder is not None else "",
    )
