"""The tumour segmenter of the faithfulness metric: a MONAI 3D `UNet` (whole tumour, one logit
per voxel). Settings and training live in `aldm_fed.evaluation.faithfulness`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["NORMS", "SegmenterNetwork", "build_segmenter"]

NORMS: tuple[str, ...] = ("instance", "batch")


@dataclass(frozen=True)
class SegmenterNetwork:
    """The segmenter's MONAI `UNet` (`faithfulness.network`).

    Attributes:
        channels: feature channels per level (>= 2 levels); stride 2 between levels.
        num_res_units: residual units per block (0 = plain convolutions).
        norm: "instance" or "batch".
        dropout: dropout probability.
    """

    channels: tuple[int, ...]
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0

    @property
    def divisor(self) -> int:
        """What every side of a network input must be divisible by (2 per downsampling)."""
        return 2 ** (len(self.channels) - 1)


def build_segmenter(network: SegmenterNetwork, in_channels: int) -> nn.Module:
    """A MONAI 3D `UNet` giving one whole-tumour logit per voxel, (B, 1, S, S, S).

    Args:
        network: the settings.
        in_channels: image channels (modalities).
    """
    from monai.networks.nets import UNet

    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    return UNet(
        spatial_dims=3,
        in_channels=int(in_channels),
        out_channels=1,
        channels=network.channels,
        strides=(2,) * (len(network.channels) - 1),
        num_res_units=network.num_res_units,
        norm=network.norm.upper(),
        dropout=network.dropout,
    )
