"""The diffusion step with each case's mask encoded once (`diffusion_step_fn(cache_masks=True)`,
the ControlNet stage's) equals the step that encodes the batch's masks every step, bit for bit:
same losses, gradient norms and weights after a few steps (tiny networks, CPU fp32, seconds)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from aldm_fed.config import compose
from aldm_fed.diffusion.conditioning import conditioning_config, encode_mask
from aldm_fed.diffusion.schedulers import build_scheduler
from aldm_fed.models import build_controlnet, build_unet, controlnet_conditioning_scale
from aldm_fed.training.backbone import diffusion_step_fn, encode_masks
from aldm_fed.training.common import OptimSettings, device_setup, loop_config
from aldm_fed.training.controlnet import controlnet_section, freeze
from aldm_fed.training.device import make_grad_scaler
from aldm_fed.training.latents import LatentSet


def _latents(n: int = 3, size: int = 32, factor: int = 4) -> LatentSet:
    rng = np.random.default_rng(0)
    segs = [rng.integers(0, 4, (size,) * 3, dtype=np.uint8) for _ in range(n)]
    for seg in segs:
        seg.setflags(write=False)  # as cached label maps may be
    z = torch.from_numpy(rng.standard_normal((n, 4, *(size // factor,) * 3), dtype=np.float32))
    return LatentSet([f"C{i}" for i in range(n)], z, segs, ["C"] * n)


def test_cached_masks_are_encode_mask_of_each_case() -> None:
    lat = _latents()
    masks = encode_masks(lat, "regions")
    assert [m.dtype for m in masks] == [torch.uint8] * len(lat)
    for seg, m in zip(lat.segs, masks, strict=True):
        want = encode_mask(torch.from_numpy(np.array(seg))[None], "regions")
        assert torch.equal(m.to(torch.float32), want)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_cached_masks_step_equals_the_encoding_step(batch_size: int) -> None:
    cfg = compose(["experiment=tiny", "device=cpu", f"train.controlnet.batch_size={batch_size}"])
    lat = _latents()
    section = controlnet_section(cfg)
    optim, loop = OptimSettings.from_section(section), loop_config(section, 0, False)
    setup = device_setup(cfg)
    cond = conditioning_config(cfg.model.conditioning)
    assert cond.tumour_weight != 1.0  # the mask shapes the loss, so a wrong mask would show
    cond = dataclasses.replace(cond, drop_prob=0.0)  # as the ControlNet stage trains
    torch.manual_seed(0)
    unet = freeze(build_unet(cfg.model.unet, 4, cond.unet_mask_channels))
    with torch.no_grad():  # MONAI zero-initialises the UNet's output conv: no gradient would flow
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = build_controlnet(cfg.model.unet, cfg.model.controlnet, 4, 4, mask_channels=cond.mask_channels,
                            unet_mask_channels=cond.unet_mask_channels)

    def run(cache_masks: bool) -> tuple[list[dict[str, float]], torch.nn.Module]:
        cn = copy.deepcopy(base)
        params = list(cn.parameters())
        opt = optim.adamw(params)
        step_fn = diffusion_step_fn(
            unet=unet, controlnet=cn, scheduler=build_scheduler(cfg.scheduler), latents=lat, cond=cond,
            scale_factor=0.8, conditioning_scale=controlnet_conditioning_scale(cfg.model.controlnet),
            loop=loop, optim=optim, optimizer=opt, params=params, setup=setup,
            scaler=make_grad_scaler(setup), cache_masks=cache_masks,
        )
        out = [step_fn(i, torch.Generator().manual_seed(100 + i)) for i in range(3)]
        return out, cn

    ours, cn_ours = run(cache_masks=True)
    ref, cn_ref = run(cache_masks=False)
    assert ours == ref
    assert all(m["grad_norm"] > 0 for m in ours)  # the ControlNet did learn
    for (name, a), (_, b) in zip(cn_ours.state_dict().items(), cn_ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
