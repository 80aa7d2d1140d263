"""The latent denoiser (backbone): a factory over MONAI's `DiffusionModelUNet`.

Config group `model.unet` (configs/model/unet/*.yaml). The ControlNet copies the same encoder
architecture, so `build_controlnet` reads this group too.

| key | meaning |
|---|---|
| `channels` | channels per level; the latent is downsampled 2x between levels, so every latent side must be divisible by 2^(len(channels) - 1) |
| `attention_levels` | one true/false per level (self-attention; ALDM: at 14^3 and 7^3 of a 28^3 latent) |
| `num_res_blocks` | int, or one per level |
| `num_head_channels` | channels per attention head: int or one per level; must divide the channels of every attention level |
| `norm_num_groups` | GroupNorm groups; every entry of `channels` must be divisible by it |
| `norm_eps` | optional, default 1e-6 |
| `resblock_updown` | optional, residual blocks for down/upsampling instead of (strided) convs, default false |
| `use_flash_attention` | optional, PyTorch SDPA attention, default false (no gain on CPU) |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from aldm_fed.models._cfg import (
    as_plain_dict,
    check_keys,
    get_bool,
    get_bool_list,
    get_float,
    get_int,
    get_int_list,
    get_int_or_list,
)

__all__ = ["UNET_KEYS", "build_unet", "unet_arch_kwargs", "unet_downsample_factor"]

GROUP = "model.unet"
_REQUIRED = ("channels", "attention_levels", "num_res_blocks", "num_head_channels", "norm_num_groups")
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "norm_eps": 1e-6,
    "resblock_updown": False,
    "use_flash_attention": False,
}
UNET_KEYS: tuple[str, ...] = _REQUIRED + tuple(_OPTIONAL_DEFAULTS)


def unet_arch_kwargs(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Validate `model.unet` and return the architecture kwargs shared by UNet and ControlNet.

    Args:
        cfg: the `model.unet` config group.

    Raises:
        ValueError: a key is missing, unknown or invalid (the message names it).
    """
    c = {**_OPTIONAL_DEFAULTS, **as_plain_dict(cfg, GROUP)}
    check_keys(c, GROUP, _REQUIRED, _OPTIONAL_DEFAULTS)
    channels = get_int_list(c, "channels", GROUP)
    n = len(channels)
    groups = get_int(c, "norm_num_groups", GROUP)
    if any(ch % groups for ch in channels):
        raise ValueError(
            f"{GROUP}.channels: every entry must be divisible by {GROUP}.norm_num_groups={groups}, "
            f"got {channels}"
        )
    attention = get_bool_list(c, "attention_levels", GROUP, n)
    heads = get_int_or_list(c, "num_head_channels", GROUP, n)
    for ch, attn, hc in zip(channels, attention, heads):
        if attn and ch % hc:
            raise ValueError(
                f"{GROUP}.num_head_channels: {hc} does not divide the {ch} channels of an attention "
                f"level (channels={channels}, attention_levels={attention})"
            )
    return {
        "channels": channels,
        "attention_levels": attention,
        "num_res_blocks": get_int_or_list(c, "num_res_blocks", GROUP, n),
        "num_head_channels": heads,
        "norm_num_groups": groups,
        "norm_eps": get_float(c, "norm_eps", GROUP, minimum=0.0, inclusive_min=False),
        "resblock_updown": get_bool(c, "resblock_updown", GROUP),
        "use_flash_attention": get_bool(c, "use_flash_attention", GROUP),
    }


def unet_downsample_factor(cfg: Mapping[str, Any] | Any) -> int:
    """Every latent side must be divisible by this: 2^(len(channels) - 1).

    Args:
        cfg: the `model.unet` config group.
    """
    return 2 ** (len(unet_arch_kwargs(cfg)["channels"]) - 1)


def build_unet(
    cfg: Mapping[str, Any] | Any, latent_channels: int, mask_channels: int = 0
) -> DiffusionModelUNet:
    """Build the 3D latent denoiser.

    The UNet predicts `latent_channels` outputs from `latent_channels + mask_channels` inputs:
    with `mask_channels > 0` the tumour mask, pooled to the latent grid, is concatenated to the
    noisy latent (ALDM's "mask input" conditioning, and the Med-DDPM-style baseline).

    Args:
        cfg: the `model.unet` config group.
        latent_channels: channels of the VAE latent.
        mask_channels: channels of the concatenated mask condition; 0 = no concatenation.

    Raises:
        ValueError: a key is missing, unknown or invalid, or a channel count is not a valid int.
    """
    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"latent_channels: expected an integer >= 1, got {latent_channels!r}")
    if isinstance(mask_channels, bool) or not isinstance(mask_channels, int) or mask_channels < 0:
        raise ValueError(f"mask_channels: expected an integer >= 0, got {mask_channels!r}")
    arch = unet_arch_kwargs(cfg)
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels + mask_channels,
        out_channels=latent_channels,
        **arch,
    )
