"""The tumour-mask ControlNet: a factory over MONAI's `ControlNet`, weight copying from the UNet,
and a way to run the mask encoder once per sample instead of once per sampling step.

The ControlNet repeats the UNet's encoder (same `model.unet` architecture) and adds
zero-initialised 1x1 convolutions on every skip and on the middle block, so at initialisation the
backbone's prediction is unchanged. Its conditioning embedding takes the FULL-resolution mask and
downsamples it with stride-2 convolutions to the latent grid: `len(conditioning_embedding_num_channels)
- 1` stride-2 stages must equal log2 of the VAE factor. (MONAI's
`ControlNetLatentDiffusionInferer` instead nearest-resizes the mask to the latent grid first,
throwing away sub-latent-voxel tumour detail; we do not use it.)

Config group `model.controlnet` (configs/model/controlnet/*.yaml):

| key | meaning |
|---|---|
| `conditioning_embedding_num_channels` | channels of the mask encoder, full resolution first; one stride-2 stage between consecutive entries |
| `conditioning_scale` | optional, multiplier on all residuals (1.0); read by the diffusion composition |
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

from aldm_fed.models._cfg import as_plain_dict, check_keys, get_float, get_int_list
from aldm_fed.models.unet import unet_arch_kwargs

__all__ = [
    "CONTROLNET_KEYS",
    "WeightCopyReport",
    "bypass_mask_embedding",
    "build_controlnet",
    "controlnet_conditioning_scale",
    "controlnet_downsample_factor",
    "controlnet_from_unet",
    "mask_embedding",
]

GROUP = "model.controlnet"
_REQUIRED = ("conditioning_embedding_num_channels",)
_OPTIONAL_DEFAULTS: dict[str, Any] = {"conditioning_scale": 1.0}
CONTROLNET_KEYS: tuple[str, ...] = _REQUIRED + tuple(_OPTIONAL_DEFAULTS)


def _validated(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    c = {**_OPTIONAL_DEFAULTS, **as_plain_dict(cfg, GROUP)}
    check_keys(c, GROUP, _REQUIRED, _OPTIONAL_DEFAULTS)
    return {
        "conditioning_embedding_num_channels": get_int_list(
            c, "conditioning_embedding_num_channels", GROUP
        ),
        "conditioning_scale": get_float(c, "conditioning_scale", GROUP, minimum=0.0),
    }


def controlnet_conditioning_scale(cfg: Mapping[str, Any] | Any) -> float:
    """The residual multiplier of a `model.controlnet` config (default 1.0).

    Args:
        cfg: the `model.controlnet` config group.
    """
    return float(_validated(cfg)["conditioning_scale"])


def build_controlnet(
    unet_cfg: Mapping[str, Any] | Any,
    controlnet_cfg: Mapping[str, Any] | Any,
    latent_channels: int,
    vae_downsample: int,
    *,
    mask_channels: int = 3,
    unet_mask_channels: int = 0,
) -> ControlNet:
    """Build a ControlNet matching the UNet of `unet_cfg`, taking a full-resolution mask.

    Args:
        unet_cfg: the `model.unet` group (the ControlNet copies the UNet's encoder architecture).
        controlnet_cfg: the `model.controlnet` group.
        latent_channels: channels of the VAE latent.
        vae_downsample: per-axis VAE factor (`vae_downsample_factor(vae_cfg)`), a power of 2.
        mask_channels: channels of the full-resolution mask condition
            (`aldm_fed.diffusion.conditioning.mask_channels(encoding)`; 3 for the default
            WT/TC/ET encoding).
        unet_mask_channels: channels the UNet concatenates to its latent input (its
            `mask_channels`). The ControlNet sees the same input as the UNet, so that
            `controlnet_from_unet` can copy `conv_in` too.

    Raises:
        ValueError: invalid config, or the mask encoder does not downsample by exactly
            `vae_downsample`.
    """
    for name, value, minimum in (
        ("latent_channels", latent_channels, 1),
        ("vae_downsample", vae_downsample, 1),
        ("mask_channels", mask_channels, 1),
        ("unet_mask_channels", unet_mask_channels, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if vae_downsample & (vae_downsample - 1):
        raise ValueError(f"vae_downsample: expected a power of 2, got {vae_downsample}")
    arch = unet_arch_kwargs(unet_cfg)
    c = _validated(controlnet_cfg)
    emb = c["conditioning_embedding_num_channels"]
    stages = int(math.log2(vae_downsample))
    if len(emb) - 1 != stages:
        raise ValueError(
            f"{GROUP}.conditioning_embedding_num_channels: {emb} has {len(emb) - 1} stride-2 stages, "
            f"but the VAE downsamples by {vae_downsample} = 2^{stages}; give {stages + 1} entries so the "
            "full-resolution mask lands exactly on the latent grid"
        )
    return ControlNet(
        spatial_dims=3,
        in_channels=latent_channels + unet_mask_channels,
        conditioning_embedding_in_channels=mask_channels,
        conditioning_embedding_num_channels=emb,
        **arch,
    )


def controlnet_downsample_factor(controlnet: ControlNet) -> int:
    """The factor by which `controlnet`'s mask encoder downsamples (= the VAE factor it expects).

    Args:
        controlnet: a MONAI ControlNet.
    """
    # MONAI's ControlNetConditioningEmbedding holds two convs per stage (stride 1, then stride 2).
    return 2 ** (len(controlnet.controlnet_cond_embedding.blocks) // 2)


@dataclass(frozen=True)
class WeightCopyReport:
    """What `controlnet_from_unet` copied.

    Args:
        copied: ControlNet parameter/buffer names loaded from the UNet.
        shape_mismatch: names in both models whose shapes differ (left at their init).
        controlnet_only: ControlNet names the UNet does not have (mask encoder, zero convs).
        unet_only: UNet names the ControlNet does not have (decoder, output head).
    """

    copied: tuple[str, ...]
    shape_mismatch: tuple[str, ...]
    controlnet_only: tuple[str, ...]
    unet_only: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"copied {len(self.copied)} tensors from the UNet; "
            f"{len(self.shape_mismatch)} shape mismatches {list(self.shape_mismatch)}; "
            f"{len(self.controlnet_only)} ControlNet-only tensors kept at init"
        )


def controlnet_from_unet(controlnet: ControlNet, unet: DiffusionModelUNet) -> WeightCopyReport:
    """Initialise the ControlNet's encoder from the UNet's (diffusers' `ControlNetModel.from_unet`).

    Copies every tensor whose name and shape match (time embedding, `conv_in`, down blocks,
    middle block); the mask encoder and the zero convolutions keep their initialisation, so the
    pair still starts as "ControlNet adds nothing".

    Args:
        controlnet: the ControlNet to initialise (modified in place).
        unet: the trained backbone.

    Returns:
        What was copied and what was not.

    Raises:
        ValueError: nothing matched (the two networks were built from different UNet configs).
    """
    src = unet.state_dict()
    dst = controlnet.state_dict()
    copied = sorted(k for k in dst if k in src and src[k].shape == dst[k].shape)
    mismatch = sorted(k for k in dst if k in src and src[k].shape != dst[k].shape)
    if not copied:
        raise ValueError(
            "controlnet_from_unet: no tensor of the UNet matches the ControlNet; build both from "
            "the same model.unet config"
        )
    # strict=False: the ControlNet-only tensors (mask encoder, zero convs) are absent from the
    # subset; shape-mismatched tensors are left out because load_state_dict raises on them.
    result = controlnet.load_state_dict({k: src[k] for k in copied}, strict=False)
    assert not result.unexpected_keys
    return WeightCopyReport(
        copied=tuple(copied),
        shape_mismatch=tuple(mismatch),
        controlnet_only=tuple(sorted(k for k in dst if k not in src)),
        unet_only=tuple(sorted(k for k in src if k not in dst)),
    )


def mask_embedding(controlnet: ControlNet, mask: torch.Tensor) -> torch.Tensor:
    """Run only the ControlNet's mask encoder: full-resolution mask -> latent-grid features.

    The result does not depend on the timestep or the noisy latent, so a sampler computes it once
    and feeds it under `bypass_mask_embedding` at every step.

    Args:
        controlnet: a MONAI ControlNet.
        mask: (B, mask_channels, D, H, W) mask condition at image resolution.
    """
    return controlnet.controlnet_cond_embedding(mask)


@contextlib.contextmanager
def bypass_mask_embedding(controlnet: ControlNet) -> Iterator[ControlNet]:
    """Within the block, `controlnet(x, t, controlnet_cond=emb)` takes a precomputed `emb`.

    MONAI's `ControlNet.forward` applies `controlnet_cond_embedding` to `controlnet_cond` and adds
    the result to the input features; swapping the embedding module for `nn.Identity` makes it
    add `emb` itself. The rest of MONAI's forward runs unchanged, so the residuals are identical
    to a normal call with the mask (tested). The module is restored on exit, also on error.

    Args:
        controlnet: a MONAI ControlNet (temporarily modified).
    """
    original = controlnet.controlnet_cond_embedding
    controlnet.controlnet_cond_embedding = nn.Identity()  # type: ignore[assignment]
    try:
        yield controlnet
    finally:
        controlnet.controlnet_cond_embedding = original
