"""The 3D VAE (first stage): a factory over MONAI's `AutoencoderKL`.

Config group `model.vae` (configs/model/vae/*.yaml):

| key | meaning |
|---|---|
| `latent_channels` | channels of the latent (ALDM: 8) |
| `channels` | channels per level; the image is downsampled 2x between levels, so the latent grid is the image / 2^(len(channels) - 1) |
| `num_res_blocks` | int, or one per level |
| `attention_levels` | one true/false per level (self-attention inside that level) |
| `norm_num_groups` | GroupNorm groups; every entry of `channels` must be divisible by it |
| `norm_eps` | optional, default 1e-6 |
| `with_encoder_nonlocal_attn`, `with_decoder_nonlocal_attn` | optional, default **false** here. MONAI defaults both to true, which adds a full self-attention block at the lowest level even when `attention_levels` is all false; at a 28^3 grid that is a 22k-token attention, so we make it opt-in |
| `use_checkpoint` | optional, activation checkpointing (memory for compute), default false |
| `use_flash_attention` | optional, PyTorch SDPA attention, default false (no gain on CPU) |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.networks.nets import AutoencoderKL

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

__all__ = ["VAE_KEYS", "build_vae", "vae_downsample_factor"]

GROUP = "model.vae"
_REQUIRED = ("latent_channels", "channels", "num_res_blocks", "attention_levels", "norm_num_groups")
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "norm_eps": 1e-6,
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_checkpoint": False,
    "use_flash_attention": False,
}
VAE_KEYS: tuple[str, ...] = _REQUIRED + tuple(_OPTIONAL_DEFAULTS)


def _validated(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    c = {**_OPTIONAL_DEFAULTS, **as_plain_dict(cfg, GROUP)}
    check_keys(c, GROUP, _REQUIRED, _OPTIONAL_DEFAULTS)
    channels = get_int_list(c, "channels", GROUP)
    groups = get_int(c, "norm_num_groups", GROUP)
    if any(ch % groups for ch in channels):
        raise ValueError(
            f"{GROUP}.channels: every entry must be divisible by {GROUP}.norm_num_groups={groups}, "
            f"got {channels}"
        )
    n = len(channels)
    return {
        "latent_channels": get_int(c, "latent_channels", GROUP),
        "channels": channels,
        "num_res_blocks": get_int_or_list(c, "num_res_blocks", GROUP, n),
        "attention_levels": get_bool_list(c, "attention_levels", GROUP, n),
        "norm_num_groups": groups,
        "norm_eps": get_float(c, "norm_eps", GROUP, minimum=0.0, inclusive_min=False),
        "with_encoder_nonlocal_attn": get_bool(c, "with_encoder_nonlocal_attn", GROUP),
        "with_decoder_nonlocal_attn": get_bool(c, "with_decoder_nonlocal_attn", GROUP),
        "use_checkpoint": get_bool(c, "use_checkpoint", GROUP),
        "use_flash_attention": get_bool(c, "use_flash_attention", GROUP),
    }


def vae_downsample_factor(cfg: Mapping[str, Any] | Any) -> int:
    """Per-axis downsampling of the VAE: image size / latent size = 2^(len(channels) - 1).

    Args:
        cfg: the `model.vae` config (only `channels` is read, but the whole group is validated).
    """
    return 2 ** (len(_validated(cfg)["channels"]) - 1)


def build_vae(cfg: Mapping[str, Any] | Any, in_channels: int) -> AutoencoderKL:
    """Build the 3D `AutoencoderKL` described by `cfg`.

    Args:
        cfg: the `model.vae` config group (keys in the module docstring).
        in_channels: number of image channels (= number of modalities); the VAE reconstructs the
            same channels.

    Raises:
        ValueError: a key is missing, unknown or invalid (the message names it).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: expected an integer >= 1, got {in_channels!r}")
    c = _validated(cfg)
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=in_channels,
        num_res_blocks=c["num_res_blocks"],
        channels=c["channels"],
        attention_levels=c["attention_levels"],
        latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        with_encoder_nonlocal_attn=c["with_encoder_nonlocal_attn"],
        with_decoder_nonlocal_attn=c["with_decoder_nonlocal_attn"],
        use_checkpoint=c["use_checkpoint"],
        use_flash_attention=c["use_flash_attention"],
    )
