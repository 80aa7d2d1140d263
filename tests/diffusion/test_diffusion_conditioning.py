"""The mask condition: encodings, latent-grid pooling, tumour weights, dropout, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.diffusion import (
    NULL_MASK_VALUE,
    conditioning_config,
    decode_mask,
    encode_mask,
    keep_condition,
    mask_channels,
    mask_to_latent_grid,
    tumour_weight_map,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model" / "conditioning"


def _labels() -> torch.Tensor:
    lab = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    lab[0, 0, 2:6, 2:6, 2:6] = 2  # ED
    lab[0, 0, 3:5, 3:5, 3:5] = 1  # NCR
    lab[0, 0, 4, 4, 3:5] = 3  # ET
    return lab


def test_regions_encoding_is_nested_wt_tc_et() -> None:
    lab = _labels()
    m = encode_mask(lab, "regions")
    assert m.shape == (1, 3, 8, 8, 8) and m.dtype == torch.float32
    wt, tc, et = m[0]
    assert torch.equal(wt.bool(), lab[0, 0] > 0)
    assert torch.equal(tc.bool(), (lab[0, 0] == 1) | (lab[0, 0] == 3))
    assert torch.equal(et.bool(), lab[0, 0] == 3)
    assert bool((et <= tc).all() and (tc <= wt).all())


@pytest.mark.parametrize("encoding", ["regions", "onehot"])
def test_encodings_round_trip(encoding: str) -> None:
    lab = _labels()
    m = encode_mask(lab[:, 0], encoding)  # (B, D, H, W) accepted too
    assert m.shape[1] == mask_channels(encoding) == 3
    assert torch.equal(decode_mask(m, encoding).long(), lab)


def test_whole_encoding_and_bad_labels() -> None:
    assert encode_mask(_labels(), "whole").shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="0..3"):
        encode_mask(torch.full((1, 4, 4, 4), 4), "regions")
    with pytest.raises(ValueError, match="encoding"):
        encode_mask(_labels(), "wt-tc")
    with pytest.raises(ValueError, match="labels"):
        encode_mask(torch.zeros(4, 4, 4, dtype=torch.long))


def test_mask_to_latent_grid_is_the_voxel_fraction() -> None:
    m = torch.zeros(1, 1, 8, 8, 8)
    m[0, 0, :2, :2, :1] = 1  # 4 of the 64 voxels of the first 4^3 block
    lm = mask_to_latent_grid(m, 4)
    assert lm.shape == (1, 1, 2, 2, 2)
    assert lm[0, 0, 0, 0, 0] == pytest.approx(4 / 64) and lm.sum() == pytest.approx(4 / 64)
    with pytest.raises(ValueError, match="divisible"):
        mask_to_latent_grid(m, 3)


def test_tumour_weight_map_is_one_outside_and_two_inside() -> None:
    m = encode_mask(_labels())  # tumour in [2, 6)^3 of an 8^3 image
    w = tumour_weight_map(m, 2, tumour_weight=2.0, pool="max")
    assert w.shape == (1, 1, 4, 4, 4)
    inside = torch.zeros(4, 4, 4, dtype=torch.bool)
    inside[1:3, 1:3, 1:3] = True
    assert bool((w[0, 0][inside] == 2.0).all()) and bool((w[0, 0][~inside] == 1.0).all())
    # a latent voxel touching one tumour voxel: max-pool gives the full weight, avg its fraction
    one = torch.zeros(1, 3, 8, 8, 8)
    one[0, 0, 0, 0, 0] = 1
    assert tumour_weight_map(one, 2)[0, 0, 0, 0, 0] == 2.0
    assert tumour_weight_map(one, 2, pool="avg")[0, 0, 0, 0, 0] == pytest.approx(1 + 1 / 8)
    assert torch.equal(tumour_weight_map(torch.zeros(1, 3, 8, 8, 8), 4), torch.ones(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="pool"):
        tumour_weight_map(m, 2, pool="median")


def test_keep_condition() -> None:
    assert keep_condition(5, 0.0).all()
    assert not keep_condition(5, 1.0).any()
    a = keep_condition(1000, 0.1, generator=torch.Generator().manual_seed(0))
    b = keep_condition(1000, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and 0.05 < 1 - a.float().mean() < 0.15
    with pytest.raises(ValueError, match="drop_prob"):
        keep_condition(2, 1.5)
    assert NULL_MASK_VALUE < 0  # outside every valid mask value


def test_conditioning_configs() -> None:
    aldm = conditioning_config(OmegaConf.load(CONFIGS / "aldm.yaml"))
    assert (aldm.concat, aldm.drop_prob, aldm.tumour_weight, aldm.guidance_scale) == (True, 0.1, 2.0, 3.0)
    assert aldm.mask_channels == 3 and aldm.unet_mask_channels == 3
    only = conditioning_config(OmegaConf.load(CONFIGS / "controlnet_only.yaml"))
    assert only.unet_mask_channels == 0
    assert conditioning_config({}) == aldm  # defaults are ALDM's
    for bad, key in [
        ({"drop": 0.1}, "model.conditioning.drop"),
        ({"drop_prob": 2.0}, "model.conditioning.drop_prob"),
        ({"encoding": "binary"}, "model.conditioning.encoding"),
        ({"tumour_weight": 0}, "model.conditioning.tumour_weight"),
    ]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            conditioning_config(bad)
