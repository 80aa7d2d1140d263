"""Classifiers for the downstream evaluation: one factory, three families.

Config group `classifier.network` (configs/classifier/{slice,volume}.yaml). Every network returns
**one logit per input** (shape (B,)); the positive class is "tumour slice" (slice task) or the
case label mapped to 1 (volume task, e.g. HGG).

| `name` | dims | what |
|---|---|---|
| `alexlite` | 2 | ALDM's "AlexLite-DG" slice classifier written out in plain torch (MONAI has no AlexNet): 4 conv blocks with BatchNorm, 3 max-pools, global average pool, dropout, a hidden FC layer. Their model read 224 px slices with an 11x11 stride-4 stem; `stem_kernel`/`stem_stride` scale it down for 32-112 px slices |
| `densenet` | 2 or 3 | MONAI `DenseNet` with small `init_features` / `growth_rate` / `block_config` |
| `resnet` | 2 or 3 | MONAI `ResNet` with basic blocks; `layers` [1, 1, 1, 1] is ResNet-10 |

The group holds `name`, `spatial_dims` and one block of settings per family, so switching family
is one override (`classifier.network.name=densenet`); only the chosen block is read and checked:

```yaml
network:
  name: alexlite
  spatial_dims: 2
  alexlite: {channels: [64, 192, 384, 256], hidden: 256, dropout: 0.5, stem_kernel: 5, stem_stride: 2}
  densenet: {init_features: 16, growth_rate: 16, block_config: [4, 4, 4]}
```

Keys per family block (all others are an error):

- `alexlite`: `channels` (4 ints; ALDM [64, 192, 384, 256]), `hidden` (ALDM 256), `dropout`
  (ALDM 0.5), `stem_kernel` (ALDM 11), `stem_stride` (ALDM 4).
- `densenet`: `init_features`, `growth_rate`, `block_config`, optional `bn_size` (4), `dropout` (0).
- `resnet`: `layers` (4 ints), `block_inplanes` (4 ints), optional `conv1_kernel` (7),
  `conv1_stride` (2), `no_max_pool` (false).

Deviations from ALDM's code, on purpose: one logit + BCE instead of two logits + softmax CE (the
same model for a binary task, and the score is directly a probability); the max-pools are padded
by 1 so slices as small as 32 px pass through all three (unpadded, a 32 px slice is 1 px before the
last pool, which then fails).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from aldm_fed.models._cfg import (
    as_plain_dict,
    check_keys,
    get_bool,
    get_float,
    get_int,
    get_int_list,
)

__all__ = ["CLASSIFIER_NAMES", "AlexLite2d", "build_classifier", "classifier_spatial_dims"]

GROUP = "classifier.network"
CLASSIFIER_NAMES: tuple[str, ...] = ("alexlite", "densenet", "resnet")

_KEYS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # name -> (required keys besides name/spatial_dims, optional keys with defaults)
    "alexlite": (("channels", "hidden", "dropout", "stem_kernel", "stem_stride"), {}),
    "densenet": (("init_features", "growth_rate", "block_config"), {"bn_size": 4, "dropout": 0.0}),
    "resnet": (
        ("layers", "block_inplanes"),
        {"conv1_kernel": 7, "conv1_stride": 2, "no_max_pool": False},
    ),
}


class AlexLite2d(nn.Module):
    """ALDM's AlexNet-like 2D slice classifier ("AlexLite-DG"), one logit out.

    Args:
        in_channels: input channels (modalities; ALDM: T1, T2, FLAIR).
        channels: output channels of the four conv layers (ALDM: 64, 192, 384, 256).
        hidden: width of the hidden fully connected layer (ALDM: 256).
        dropout: dropout before both fully connected layers (ALDM: 0.5).
        stem_kernel: kernel of the first conv (ALDM: 11, for 224 px inputs).
        stem_stride: stride of the first conv (ALDM: 4).
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, int, int, int] | list[int] = (64, 192, 384, 256),
        hidden: int = 256,
        dropout: float = 0.5,
        stem_kernel: int = 11,
        stem_stride: int = 4,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"AlexLite2d needs 4 conv channel counts, got {list(channels)}")
        c1, c2, c3, c4 = (int(c) for c in channels)

        def block(cin: int, cout: int, k: int, s: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, stride=s, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def pool() -> nn.Module:
            # padding=1: any input size >= 1 survives the pool (see the module docstring)
            return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.features = nn.Sequential(
            *block(in_channels, c1, stem_kernel, stem_stride), pool(),
            *block(c1, c2, 5), pool(),
            *block(c2, c3, 3),
            *block(c3, c4, 3), pool(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


class _SqueezeLogit(nn.Module):
    """Wrap a MONAI network with one output channel so it returns shape (B,), like AlexLite2d."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def _validated(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    top = as_plain_dict(cfg, GROUP)
    if "name" not in top:
        raise ValueError(f"{GROUP}.name: missing (required; one of {list(CLASSIFIER_NAMES)})")
    if top["name"] not in CLASSIFIER_NAMES:
        raise ValueError(f"{GROUP}.name: expected one of {list(CLASSIFIER_NAMES)}, got {top['name']!r}")
    name = str(top["name"])
    # The blocks of the families not chosen may stay in the file, so one override switches family.
    check_keys(top, GROUP, ("name", "spatial_dims", name), CLASSIFIER_NAMES)
    dims = get_int(top, "spatial_dims", GROUP)
    if dims not in (2, 3) or (name == "alexlite" and dims != 2):
        allowed = "2" if name == "alexlite" else "2 or 3"
        raise ValueError(f"{GROUP}.spatial_dims: {name} takes {allowed}, got {dims}")
    group = f"{GROUP}.{name}"
    required, optional = _KEYS[name]
    c = {**optional, **as_plain_dict(top[name], group)}
    check_keys(c, group, required, optional)
    out: dict[str, Any] = {"name": name, "spatial_dims": dims}
    if name == "alexlite":
        channels = get_int_list(c, "channels", group)
        if len(channels) != 4:
            raise ValueError(f"{group}.channels: expected 4 conv channel counts, got {channels}")
        out |= {
            "channels": channels,
            "hidden": get_int(c, "hidden", group),
            "dropout": get_float(c, "dropout", group, minimum=0.0, maximum=0.99),
            "stem_kernel": get_int(c, "stem_kernel", group),
            "stem_stride": get_int(c, "stem_stride", group),
        }
    elif name == "densenet":
        out |= {
            "init_features": get_int(c, "init_features", group),
            "growth_rate": get_int(c, "growth_rate", group),
            "block_config": get_int_list(c, "block_config", group),
            "bn_size": get_int(c, "bn_size", group),
            "dropout": get_float(c, "dropout", group, minimum=0.0, maximum=0.99),
        }
    else:
        for key in ("layers", "block_inplanes"):
            values = get_int_list(c, key, group)
            if len(values) != 4:
                raise ValueError(f"{group}.{key}: MONAI ResNet takes 4 stages, got {values}")
            out[key] = values
        out |= {
            "conv1_kernel": get_int(c, "conv1_kernel", group),
            "conv1_stride": get_int(c, "conv1_stride", group),
            "no_max_pool": get_bool(c, "no_max_pool", group),
        }
    return out


def classifier_spatial_dims(cfg: Mapping[str, Any] | Any) -> int:
    """2 for slice classifiers, 3 for volume classifiers (validates the whole group).

    Args:
        cfg: the `classifier.network` config.
    """
    return int(_validated(cfg)["spatial_dims"])


def build_classifier(cfg: Mapping[str, Any] | Any, in_channels: int) -> nn.Module:
    """Build a binary classifier returning one logit per input, shape (B,).

    Args:
        cfg: the `classifier.network` config: `name`, `spatial_dims` and a block named like
            `name` with that family's settings (see the module docstring).
        in_channels: input channels (number of modalities).

    Raises:
        ValueError: unknown name, missing/unknown/invalid key (named as
            `classifier.network.<family>.<key>`).
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    c = _validated(cfg)
    if c["name"] == "alexlite":
        return AlexLite2d(
            in_channels,
            channels=c["channels"],
            hidden=c["hidden"],
            dropout=c["dropout"],
            stem_kernel=c["stem_kernel"],
            stem_stride=c["stem_stride"],
        )
    if c["name"] == "densenet":
        return _SqueezeLogit(
            DenseNet(
                spatial_dims=c["spatial_dims"],
                in_channels=in_channels,
                out_channels=1,
                init_features=c["init_features"],
                growth_rate=c["growth_rate"],
                block_config=tuple(c["block_config"]),
                bn_size=c["bn_size"],
                dropout_prob=c["dropout"],
            )
        )
    return _SqueezeLogit(
        ResNet(
            block="basic",
            layers=c["layers"],
            block_inplanes=c["block_inplanes"],
            spatial_dims=c["spatial_dims"],
            n_input_channels=in_channels,
            conv1_t_size=c["conv1_kernel"],
            conv1_t_stride=c["conv1_stride"],
            no_max_pool=c["no_max_pool"],
            num_classes=1,
        )
    )
