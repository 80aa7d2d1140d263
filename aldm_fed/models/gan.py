"""The mask-conditioned 3D GAN baseline (pix2pix-style): generator and patch discriminator.

ALDM is compared against GANs; this is the one the evaluation trains on the same K cases of a site.
Both networks are MONAI's:

- Generator: MONAI `UNet` (skip connections, instance norm, dropout as pix2pix) with a sigmoid
  output, mapping the condition to the modalities in [0, 1].
- Discriminator: MONAI `PatchDiscriminator` on (condition, image), as pix2pix's conditional
  PatchGAN; it judges whether the image fits the mask, not only whether it looks real.

The condition is what ALDM's sampler is conditioned on: the tumour mask, encoded as in
`aldm_fed.diffusion.conditioning.encode_mask` (`regions`: WT, TC, ET by default). ALDM does not
see the host's anatomy (it draws a whole brain from the mask, then voxels outside the host brain
are zeroed), so by default neither does the GAN; `brain_channel: true` adds the brain mask as one
more input channel (a stronger, less comparable baseline). `noise_channels` Gaussian channels give
the generator a random input as well (pix2pix's generators learn to mostly ignore it; their dropout
is the other source of variety during training).

Config group `model.gan` (configs/model/gan/*.yaml):

| key | meaning |
|---|---|
| `channels` | generator UNet channels per level; 2x down-sampling between levels, so the volume edge must be divisible by 2^(len - 1) |
| `num_res_units` | residual units per UNet block (0 = plain convolutions) |
| `dropout` | generator dropout (pix2pix: 0.5 in the decoder; MONAI's UNet applies it in every block) |
| `norm` | generator normalisation: `instance` (pix2pix with batch 1) or `batch` |
| `noise_channels` | Gaussian noise channels added to the generator input (0 = none) |
| `brain_channel` | add the (host) brain mask as an input channel; default false, as ALDM |
| `mask_encoding` | `regions` (WT, TC, ET) \\| `onehot` (NCR, ED, ET) \\| `whole` (WT) |
| `disc_channels` | discriminator channels of its first layer (doubling per layer) |
| `disc_layers` | discriminator stride-2 layers; the volume edge must allow 2^disc_layers |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.nets import PatchDiscriminator, UNet
from torch import nn

from aldm_fed.diffusion.conditioning import MASK_ENCODINGS, encode_mask, mask_channels
from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_int, get_int_list, get_str

__all__ = ["GAN_KEYS", "GanConfig", "GanGenerator", "build_gan", "gan_config"]

GROUP = "model.gan"
NORMS = ("instance", "batch")
_DEFAULTS: dict[str, Any] = {
    "channels": [16, 32, 64, 128],
    "num_res_units": 1,
    "dropout": 0.1,
    "norm": "instance",
    "noise_channels": 1,
    "brain_channel": False,
    "mask_encoding": "regions",
    "disc_channels": 16,
    "disc_layers": 3,
}
GAN_KEYS: tuple[str, ...] = tuple(_DEFAULTS)


@dataclass(frozen=True)
class GanConfig:
    """The validated `model.gan` group (keys in the module docstring)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    dropout: float = 0.1
    norm: str = "instance"
    noise_channels: int = 1
    brain_channel: bool = False
    mask_encoding: str = "regions"
    disc_channels: int = 16
    disc_layers: int = 3

    @property
    def condition_channels(self) -> int:
        """Channels of the condition (mask encoding + brain); what the discriminator sees with the image."""
        return mask_channels(self.mask_encoding) + int(self.brain_channel)

    @property
    def generator_in_channels(self) -> int:
        """Condition channels + noise channels."""
        return self.condition_channels + self.noise_channels

    @property
    def downsample(self) -> int:
        """Largest down-sampling of either network: the volume edge must be divisible by it."""
        return max(2 ** (len(self.channels) - 1), 2**self.disc_layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def gan_config(cfg: Mapping[str, Any] | GanConfig | Any = None) -> GanConfig:
    """Validate a `model.gan` group (every key optional; defaults as `GanConfig`).

    Args:
        cfg: mapping, DictConfig, a `GanConfig` (returned as is) or None (defaults).

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    if isinstance(cfg, GanConfig):
        return cfg
    c = {**_DEFAULTS, **(as_plain_dict(cfg, GROUP) if cfg is not None else {})}
    check_keys(c, GROUP, (), _DEFAULTS)
    channels = get_int_list(c, "channels", GROUP)
    if len(channels) < 2:
        raise ValueError(f"{GROUP}.channels: expected at least 2 levels, got {channels}")
    return GanConfig(
        channels=tuple(channels),
        num_res_units=get_int(c, "num_res_units", GROUP, minimum=0),
        dropout=get_float(c, "dropout", GROUP, minimum=0.0, maximum=0.9),
        norm=get_str(c, "norm", GROUP, NORMS),
        noise_channels=get_int(c, "noise_channels", GROUP, minimum=0),
        brain_channel=get_bool(c, "brain_channel", GROUP),
        mask_encoding=get_str(c, "mask_encoding", GROUP, tuple(MASK_ENCODINGS)),
        disc_channels=get_int(c, "disc_channels", GROUP),
        disc_layers=get_int(c, "disc_layers", GROUP),
    )


class GanGenerator(nn.Module):
    """pix2pix generator: (tumour mask [+ brain] + noise) -> modalities in [0, 1].

    The one place that composes the condition: training and synthesis both call `condition` and
    `forward` (or `generate`), so they cannot feed the networks differently.

    Args:
        cfg: the validated model settings.
        out_channels: number of modalities.
    """

    def __init__(self, cfg: GanConfig, out_channels: int) -> None:
        super().__init__()
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels: expected an integer >= 1, got {out_channels!r}")
        self.cfg = cfg
        self.out_channels = out_channels
        self.net = UNet(
            spatial_dims=3,
            in_channels=cfg.generator_in_channels,
            out_channels=out_channels,
            channels=cfg.channels,
            strides=(2,) * (len(cfg.channels) - 1),
            num_res_units=cfg.num_res_units,
            norm=cfg.norm.upper(),
            dropout=cfg.dropout,
        )

    def condition(self, seg: torch.Tensor, brain: torch.Tensor | None = None) -> torch.Tensor:
        """The condition both networks see: the encoded tumour mask (+ the brain mask).

        Args:
            seg: (B, [1,] D, H, W) canonical labels 0..3.
            brain: (B, [1,] D, H, W) brain mask (> 0 = brain); required when `brain_channel`.

        Returns:
            (B, condition_channels, D, H, W) float32 of 0/1.
        """
        cond = encode_mask(seg, self.cfg.mask_encoding)
        if self.cfg.brain_channel:
            if brain is None:
                raise ValueError("model.gan.brain_channel is true: the generator needs the brain mask")
            b = brain if brain.ndim == 5 else brain[:, None]
            cond = torch.cat([cond, (b > 0).to(cond.dtype)], dim=1)
        return cond

    def forward(self, cond: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] for a condition.

        Args:
            cond: (B, condition_channels, D, H, W) from `condition`.
            noise: (B, noise_channels, D, H, W) standard normal; required when `noise_channels` > 0.
        """
        if self.cfg.noise_channels:
            expected = (cond.shape[0], self.cfg.noise_channels, *cond.shape[2:])
            if noise is None or tuple(noise.shape) != expected:
                got = None if noise is None else tuple(noise.shape)
                raise ValueError(f"noise: expected shape {expected} (model.gan.noise_channels), got {got}")
            cond = torch.cat([cond, noise.to(cond)], dim=1)
        return torch.sigmoid(self.net(cond))


def build_gan(
    cfg: Mapping[str, Any] | GanConfig | Any, image_channels: int
) -> tuple[GanGenerator, PatchDiscriminator]:
    """The generator and the conditional patch discriminator described by `cfg`.

    Args:
        cfg: the `model.gan` group (or a `GanConfig`).
        image_channels: number of modalities (generator outputs; discriminator inputs besides
            the condition).

    Raises:
        ValueError: a bad key in `cfg` or a bad channel count.
    """
    c = gan_config(cfg)
    generator = GanGenerator(c, image_channels)
    disc = PatchDiscriminator(
        spatial_dims=3,
        channels=c.disc_channels,
        in_channels=c.condition_channels + image_channels,
        out_channels=1,
        num_layers_d=c.disc_layers,
        norm="INSTANCE",  # batch 1: instance norm, as MONAI's 3D LDM tutorial and our VAE stage
    )
    return generator, disc
