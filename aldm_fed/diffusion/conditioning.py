"""The tumour-mask condition: encoding labels into channels, classifier-free dropout, and the
tumour-weighted loss map.

Canonical labels (docs/contracts.md): 0 background, 1 NCR, 2 ED, 3 ET.

Mask encodings (`encoding`):
- `regions` (default): 3 nested binary channels WT = {1,2,3}, TC = {1,3}, ET = {3}, the BraTS
  evaluation regions. Chosen because each channel is a whole anatomical region (the ControlNet
  and the latent-grid pooling see smooth, nested shapes rather than thin shells of one label),
  WT alone gives the tumour extent for the loss weight, and the encoding is invertible
  (`decode_mask`).
- `onehot`: 3 mutually exclusive channels NCR, ED, ET (also invertible).
- `whole`: 1 channel, WT (what ALDM's released code feeds; sub-regions are lost).

Condition dropout (classifier-free guidance training, ALDM p = 0.1): a dropped sample gets no
ControlNet residuals and, where the UNet concatenates the mask, `NULL_MASK_VALUE` (-1) in place of
the mask. -1 is outside every valid mask value in [0, 1], so "no condition" is never confused with
"a tumour-free mask" (all zeros).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_str

__all__ = [
    "LABELS",
    "MASK_ENCODINGS",
    "NULL_MASK_VALUE",
    "ConditioningConfig",
    "conditioning_config",
    "decode_mask",
    "encode_mask",
    "keep_condition",
    "mask_channels",
    "mask_to_latent_grid",
    "null_condition",
    "tumour_weight_map",
]

LABELS: dict[str, int] = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
# channel name -> label values that switch it on
MASK_ENCODINGS: dict[str, dict[str, tuple[int, ...]]] = {
    "regions": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "onehot": {"NCR": (1,), "ED": (2,), "ET": (3,)},
    "whole": {"WT": (1, 2, 3)},
}
NULL_MASK_VALUE = -1.0
WEIGHT_POOLS = ("max", "avg")

GROUP = "model.conditioning"
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "encoding": "regions",
    "concat": True,
    "drop_prob": 0.1,
    "tumour_weight": 2.0,
    "weight_pool": "max",
    "guidance_scale": 3.0,
    "residual_drop_prob": 0.0,
}


@dataclass(frozen=True)
class ConditioningConfig:
    """How the tumour mask conditions the diffusion model.

    Args:
        encoding: mask encoding (`regions`, `onehot`, `whole`).
        concat: concatenate the mask (average-pooled to the latent grid) to the UNet input.
        drop_prob: probability of dropping a sample's condition during training (ALDM 0.1).
        tumour_weight: loss weight of latent voxels covering tumour (ALDM 2.0; 1.0 = off).
        weight_pool: `max` (a latent voxel touching any tumour voxel gets the full weight) or
            `avg` (weight grows with the tumour fraction of the latent voxel).
        guidance_scale: default classifier-free guidance scale at sampling (ALDM 3.0).
        residual_drop_prob: probability that a conditioned backbone training sample keeps its
            concatenated mask but loses the ControlNet residuals (ALDM 0.0). Why: the `concat`
            baseline samples the backbone exactly so; with 0 it never trained in that mode, and
            "ControlNet vs concatenation" would compare against an untrained mode.
    """

    encoding: str = "regions"
    concat: bool = True
    drop_prob: float = 0.1
    tumour_weight: float = 2.0
    weight_pool: str = "max"
    guidance_scale: float = 3.0
    residual_drop_prob: float = 0.0

    @property
    def mask_channels(self) -> int:
        """Channels of the encoded mask."""
        return mask_channels(self.encoding)

    @property
    def unet_mask_channels(self) -> int:
        """Channels the UNet concatenates to its input (0 without concatenation)."""
        return self.mask_channels if self.concat else 0


def conditioning_config(cfg: Mapping[str, Any] | Any) -> ConditioningConfig:
    """Validate a `model.conditioning` config group (all keys optional, ALDM defaults).

    Args:
        cfg: mapping with any of `encoding`, `concat`, `drop_prob`, `tumour_weight`,
            `weight_pool`, `guidance_scale`, `residual_drop_prob`.

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    c = {**_OPTIONAL_DEFAULTS, **as_plain_dict(cfg, GROUP)}
    check_keys(c, GROUP, (), _OPTIONAL_DEFAULTS)
    return ConditioningConfig(
        encoding=get_str(c, "encoding", GROUP, tuple(MASK_ENCODINGS)),
        concat=get_bool(c, "concat", GROUP),
        drop_prob=get_float(c, "drop_prob", GROUP, minimum=0.0, maximum=1.0),
        tumour_weight=get_float(c, "tumour_weight", GROUP, minimum=0.0, inclusive_min=False),
        weight_pool=get_str(c, "weight_pool", GROUP, WEIGHT_POOLS),
        guidance_scale=get_float(c, "guidance_scale", GROUP, minimum=0.0),
        residual_drop_prob=get_float(c, "residual_drop_prob", GROUP, minimum=0.0, maximum=1.0),
    )


def mask_channels(encoding: str = "regions") -> int:
    """Number of channels of an encoded mask.

    Args:
        encoding: `regions`, `onehot` or `whole`.
    """
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"encoding: expected one of {list(MASK_ENCODINGS)}, got {encoding!r}")
    return len(MASK_ENCODINGS[encoding])


def encode_mask(
    labels: torch.Tensor, encoding: str = "regions", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Canonical label map -> multi-channel binary mask condition.

    Args:
        labels: (B, 1, D, H, W) or (B, D, H, W) integer labels in {0, 1, 2, 3}.
        encoding: `regions` (WT, TC, ET), `onehot` (NCR, ED, ET) or `whole` (WT).
        dtype: output dtype.

    Returns:
        (B, mask_channels(encoding), D, H, W) tensor of 0/1.

    Raises:
        ValueError: unknown encoding, wrong rank, or a label outside 0..3.
    """
    channels = MASK_ENCODINGS.get(encoding)
    if channels is None:
        raise ValueError(f"encoding: expected one of {list(MASK_ENCODINGS)}, got {encoding!r}")
    if labels.ndim == 5:
        if labels.shape[1] != 1:
            raise ValueError(f"labels: expected one channel, got shape {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.ndim != 4:
        raise ValueError(f"labels: expected (B, [1,] D, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("labels: expected integer label values, got fractional values")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 3):
        raise ValueError(
            f"labels: expected canonical labels 0..3 (map legacy 4 -> 3 first), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    out = [torch.isin(labels, torch.tensor(v, device=labels.device)) for v in channels.values()]
    return torch.stack(out, dim=1).to(dtype)


def decode_mask(mask: torch.Tensor, encoding: str = "regions") -> torch.Tensor:
    """Encoded mask (thresholded at 0.5) -> (B, 1, D, H, W) canonical labels (uint8).

    Args:
        mask: (B, C, D, H, W) output of `encode_mask` (or a soft version of it).
        encoding: the encoding `mask` uses.
    """
    if mask.shape[1] != mask_channels(encoding):
        raise ValueError(
            f"mask: {encoding!r} has {mask_channels(encoding)} channels, got shape {tuple(mask.shape)}"
        )
    on = mask > 0.5
    labels = torch.zeros((mask.shape[0], 1, *mask.shape[2:]), dtype=torch.uint8, device=mask.device)
    if encoding == "whole":
        labels[on[:, :1]] = 1  # only the extent is known; report it as label 1
    elif encoding == "onehot":
        for c, value in enumerate((1, 2, 3)):
            labels[on[:, c : c + 1]] = value
    else:  # regions: WT -> ED unless inside TC -> NCR unless ET
        labels[on[:, 0:1]] = 2
        labels[on[:, 1:2]] = 1
        labels[on[:, 2:3]] = 3
    return labels


def _check_factor(mask: torch.Tensor, factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
    if mask.ndim != 5 or any(s % factor for s in mask.shape[2:]):
        raise ValueError(
            f"mask: expected (B, C, D, H, W) with sides divisible by {factor}, got {tuple(mask.shape)}"
        )


def mask_to_latent_grid(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a full-resolution mask to the latent grid (fraction of each latent voxel).

    Used for the concatenated-mask input: a soft occupancy keeps sub-latent-voxel tumour extent
    that nearest-neighbour resizing (MONAI's ControlNet inferer) would drop.

    Args:
        mask: (B, C, D, H, W) encoded mask.
        factor: VAE downsampling factor per axis.
    """
    _check_factor(mask, factor)
    return mask if factor == 1 else F.avg_pool3d(mask, kernel_size=factor, stride=factor)


def tumour_weight_map(
    mask: torch.Tensor, factor: int, tumour_weight: float = 2.0, pool: str = "max"
) -> torch.Tensor:
    """Per-latent-voxel loss weight: 1 outside the tumour, `tumour_weight` inside (ALDM: 2).

    Args:
        mask: (B, C, D, H, W) encoded mask at image resolution (any channel > 0 is tumour).
        factor: VAE downsampling factor per axis.
        tumour_weight: weight of tumour latent voxels.
        pool: `max`: a latent voxel with any tumour voxel gets `tumour_weight`; `avg`: the weight
            is 1 + (tumour_weight - 1) x the tumour fraction of the latent voxel.

    Returns:
        (B, 1, D/factor, H/factor, W/factor) float weights.
    """
    if pool not in WEIGHT_POOLS:
        raise ValueError(f"pool: expected one of {list(WEIGHT_POOLS)}, got {pool!r}")
    _check_factor(mask, factor)
    tumour = (mask.amax(dim=1, keepdim=True) > 0).float()
    if factor > 1:
        pool_fn = F.max_pool3d if pool == "max" else F.avg_pool3d
        tumour = pool_fn(tumour, kernel_size=factor, stride=factor)
    return 1.0 + (float(tumour_weight) - 1.0) * tumour


def keep_condition(
    batch_size: int,
    drop_prob: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which samples keep their condition this step (classifier-free dropout).

    Args:
        batch_size: B.
        drop_prob: probability of dropping each sample's condition.
        device: device of the result (and of `generator`).
        generator: random generator; None = torch's global RNG.

    Returns:
        (B,) bool, True = conditioned.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob}")
    if drop_prob == 0.0:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    return torch.rand(batch_size, generator=generator, device=device) >= drop_prob


def null_condition(latent_mask: torch.Tensor) -> torch.Tensor:
    """The "no condition" stand-in for a concatenated mask: `NULL_MASK_VALUE` everywhere.

    Args:
        latent_mask: the mask on the latent grid (shape/dtype/device are copied).
    """
    return torch.full_like(latent_mask, NULL_MASK_VALUE)
