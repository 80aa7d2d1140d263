"""The composition: latent scaling, the training loss, guidance and the sampler, on tiny networks
(32^3 images, 4 x 8^3 latents)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.diffusion import (
    NULL_MASK_VALUE,
    build_scheduler,
    conditioning_config,
    compute_scale_factor,
    decode,
    denoise,
    diffusion_loss,
    encode,
    encode_mask,
    guided_denoise,
    prepare_mask,
    sample,
    sampling_plan,
    scheduler_step,
)
from aldm_fed.models import build_controlnet, build_unet, build_vae, controlnet_from_unet

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(path: str, **overrides: object) -> dict:
    c = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{path}.yaml"))
    assert isinstance(c, dict)
    return {**c, **overrides}


def _perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Make zero-initialised layers (UNet output, ControlNet zero convs) non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _nets(concat: bool = True, perturb: bool = True):
    torch.manual_seed(0)
    unet_cfg = _cfg("model/unet/tiny")
    m = 3 if concat else 0
    unet = build_unet(unet_cfg, 4, mask_channels=m)
    cn_cfg = _cfg("model/controlnet/tiny")
    cn = build_controlnet(unet_cfg, cn_cfg, 4, 4, mask_channels=3, unet_mask_channels=m)
    controlnet_from_unet(cn, unet)
    if perturb:
        _perturb_(unet, seed=1)
        _perturb_(cn, seed=2)
    return unet, cn


def _batch(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(b, 4, 8, 8, 8, generator=g)
    lab = torch.zeros(b, 1, 32, 32, 32, dtype=torch.long)
    lab[:, :, 8:20, 10:22, 6:18] = 2
    lab[:, :, 11:16, 13:18, 9:14] = 1
    lab[:, :, 12:14, 14:16, 10:13] = 3
    return z0, encode_mask(lab)


# --- latent scaling ----------------------------------------------------------------------------


def test_encode_decode_apply_the_scale_factor_consistently() -> None:
    vae = build_vae(_cfg("model/vae/tiny"), 3).eval()
    _perturb_(vae)
    x = torch.rand(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, _ = vae.encode(x)
        s = compute_scale_factor(mu)
        z = encode(vae, x, s)
        torch.testing.assert_close(z, mu * s)
        torch.testing.assert_close(z.std().item(), 1.0, rtol=1e-4, atol=1e-4)  # unit-variance latents
        # the round trip decodes the raw mean (GenerativeModels #212 got this wrong)
        torch.testing.assert_close(decode(vae, z, s), vae.decode(mu), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(vae.decode(z), vae.decode(mu), atol=1e-3)  # s is not ~1 here
        z1 = encode(vae, x, s, sample=True, generator=torch.Generator().manual_seed(1))
        z2 = encode(vae, x, s, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    assert compute_scale_factor([mu, mu]) == pytest.approx(s, rel=1e-3)
    with pytest.raises(ValueError, match="std"):
        compute_scale_factor(torch.ones(10))


# --- training loss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sched",
    [{"path": "ddpm"}, {"path": "ddim", "prediction_type": "v_prediction"}, {"path": "rflow"}],
    ids=["ddpm-eps", "ddim-v", "rflow"],
)
def test_loss_is_finite_and_decreases_on_a_fixed_batch(sched: dict) -> None:
    unet, cn = _nets(perturb=False)
    scheduler = build_scheduler(_cfg(f"scheduler/{sched.pop('path')}", **sched))
    z0, mask = _batch()
    opt = torch.optim.Adam([*unet.parameters(), *cn.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        # the same noise, timesteps and dropout every step: a pure fit of one fixed batch
        loss = diffusion_loss(unet, cn, scheduler, z0, mask, generator=torch.Generator().manual_seed(7))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_dropped_condition_gets_no_controlnet_and_the_null_mask() -> None:
    unet, cn = _nets()
    sch = build_scheduler(_cfg("scheduler/ddpm"))
    z0, mask = _batch()
    g0 = torch.Generator().manual_seed(0)
    loss = diffusion_loss(unet, cn, sch, z0, mask, cond_drop_prob=1.0, generator=g0)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in cn.parameters())
    # the same pass by hand: UNet only, with the null mask concatenated
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    z_t = sch.add_noise(z0, noise, t)
    with torch.no_grad():
        pred = unet(torch.cat([z_t, torch.full((2, 3, 8, 8, 8), NULL_MASK_VALUE)], 1), t)
        w = torch.ones(2, 1, 8, 8, 8)
        w[:, :, 2:5, 2:6, 1:5] = 2.0  # latent voxels touched by the tumour box [8,20)x[10,22)x[6,18)
        expected = (w * (pred - noise) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # kept: the ControlNet learns
    cn.zero_grad()
    g0 = torch.Generator().manual_seed(0)
    diffusion_loss(unet, cn, sch, z0, mask, cond_drop_prob=0.0, generator=g0).backward()
    assert max(float(p.grad.abs().max()) for p in cn.parameters() if p.grad is not None) > 0


def test_residual_drop_keeps_the_mask_but_not_the_controlnet() -> None:
    """residual_drop_prob: the backbone also trains the mode the `concat` baseline samples (the
    concatenated mask, no ControlNet residuals)."""
    unet, cn = _nets()
    sch = build_scheduler(_cfg("scheduler/ddpm"))
    z0, mask = _batch()
    # All residuals dropped: the loss of the backbone alone, with the real mask concatenated ...
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    dropped = diffusion_loss(unet, cn, sch, z0, mask, cond_drop_prob=0.0, residual_drop_prob=1.0, generator=g())
    alone = diffusion_loss(unet, None, sch, z0, mask, cond_drop_prob=0.0, generator=g())
    torch.testing.assert_close(dropped.detach(), alone.detach())
    dropped.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in cn.parameters())  # the ControlNet learns nothing
    # ... which differs from the full condition, and from the null mask (the mask still steers).
    with torch.no_grad():
        full = float(diffusion_loss(unet, cn, sch, z0, mask, cond_drop_prob=0.0, generator=g()))
        null = float(diffusion_loss(unet, cn, sch, z0, mask, cond_drop_prob=1.0, generator=g()))
        assert abs(full - float(alone)) > 1e-4 and abs(null - float(alone)) > 1e-4
        # 0 (ALDM) draws nothing extra: bit-identical to a call without the argument.
        assert float(diffusion_loss(unet, cn, sch, z0, mask, residual_drop_prob=0.0, generator=g())) == float(
            diffusion_loss(unet, cn, sch, z0, mask, generator=g()))
    # Per sample: denoise with residuals kept for one sample and dropped for the other.
    t = torch.tensor([500, 500])
    prepared = prepare_mask(unet, cn, mask, 4)
    with torch.no_grad():
        mixed = denoise(unet, cn, z0, t, prepared, keep_residuals=torch.tensor([True, False]))
        with_cn = denoise(unet, cn, z0, t, prepared)
        without = denoise(unet, None, z0, t, prepare_mask(unet, None, mask, 4))
    torch.testing.assert_close(mixed[0], with_cn[0])
    torch.testing.assert_close(mixed[1], without[1])
    with pytest.raises(ValueError, match="residual_drop_prob"):
        conditioning_config({"residual_drop_prob": 1.5})
    assert conditioning_config({}).residual_drop_prob == 0.0


def test_tumour_weight_enters_the_loss_linearly() -> None:
    unet, cn = _nets()
    sch = build_scheduler(_cfg("scheduler/ddpm"))
    z0, mask = _batch()
    with torch.no_grad():
        loss = {
            w: diffusion_loss(
                unet, cn, sch, z0, mask, tumour_weight=w, generator=torch.Generator().manual_seed(3)
            ).item()
            for w in (1.0, 2.0, 3.0)
        }
    assert loss[2.0] > loss[1.0]
    assert loss[3.0] - loss[2.0] == pytest.approx(loss[2.0] - loss[1.0], rel=1e-4)


def test_loss_rejects_mismatched_masks() -> None:
    unet, cn = _nets()
    sch = build_scheduler(_cfg("scheduler/ddpm"))
    z0, mask = _batch()
    with pytest.raises(ValueError, match="mask channels"):
        diffusion_loss(unet, cn, sch, z0, mask[:, :1])
    with pytest.raises(ValueError, match="integer multiple"):
        diffusion_loss(unet, cn, sch, z0, mask[..., :30])
    with pytest.raises(ValueError, match="downsamples by 4"):
        diffusion_loss(unet, cn, sch, z0[..., ::2, ::2, ::2], mask)  # an 8x grid
    with pytest.raises(ValueError, match="mask: required"):
        diffusion_loss(unet, None, sch, z0, None)


# --- guidance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("concat", [True, False])
def test_classifier_free_guidance(concat: bool) -> None:
    unet, cn = _nets(concat=concat)
    z0, mask = _batch()
    t = torch.tensor([600, 600])
    prepared = prepare_mask(unet, cn, mask, 4)
    with torch.no_grad():
        cond = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=None)
        uncond = denoise(unet, cn, z0, t, prepared, keep=torch.tensor([False, False]))
        assert (cond - uncond).abs().max() > 1e-4  # the condition matters
        # the unconditional pass is the backbone alone (+ null mask when concatenating)
        x_unc = torch.cat([z0, torch.full((2, 3, 8, 8, 8), NULL_MASK_VALUE)], 1) if concat else z0
        torch.testing.assert_close(uncond, unet(x_unc, t))
        s1 = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=1.0)
        s0 = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=0.0)
        torch.testing.assert_close(s1, cond, rtol=1e-5, atol=1e-5)  # s = 1: the conditional one
        torch.testing.assert_close(s0, uncond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            guided_denoise(unet, cn, z0, t, prepared, guidance_scale=3.0),
            uncond + 3.0 * (cond - uncond),
            rtol=1e-4,
            atol=1e-5,
        )
        # per-sample dropping: sample 0 conditioned, sample 1 not
        mixed = denoise(unet, cn, z0, t, prepared, keep=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], cond[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], uncond[1], rtol=1e-5, atol=1e-5)


# --- sampling ----------------------------------------------------------------------------------


def test_sample_shapes_determinism_and_cached_mask_encoder() -> None:
    unet, cn = _nets()
    _, mask = _batch(1)
    sch = build_scheduler(_cfg("scheduler/ddim"))
    kw = dict(num_steps=4, guidance_scale=3.0)
    a = sample(unet, cn, sch, mask, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(unet, cn, sch, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (1, 4, 8, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not isinstance(cn.controlnet_cond_embedding, torch.nn.Identity)  # restored
    # the same loop, running the mask encoder at every step, gives the same latent
    x = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    prepared = prepare_mask(unet, cn, mask, 4, precompute_embedding=False)
    plan = sampling_plan(sch, 4)
    with torch.no_grad():
        for t, t_next in zip(plan.timesteps.tolist(), plan.next_timesteps.tolist()):
            out = guided_denoise(unet, cn, x, torch.tensor(t), prepared, guidance_scale=3.0)
            x = scheduler_step(sch, out, t, t_next, x)
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)


def test_sample_with_concat_only_and_rflow() -> None:
    unet, _ = _nets()
    _, mask = _batch(1)
    out = sample(unet, None, build_scheduler(_cfg("scheduler/rflow")), mask, num_steps=3, vae_downsample=4)
    assert out.shape == (1, 4, 8, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="vae_downsample"):
        sample(unet, None, build_scheduler(_cfg("scheduler/rflow")), mask, num_steps=3)


def test_the_guidance_combination_is_fp32_under_bf16_autocast() -> None:
    """uncond + s (cond - uncond) amplifies the predictions' rounding by s: it is done in fp32 from
    the bf16 network outputs, not in bf16."""
    unet, cn = _nets()
    z0, mask = _batch()
    prepared = prepare_mask(unet, cn, mask, 4, precompute_embedding=True)
    t = torch.tensor(900)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=3.0)
        cond = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=1.0)
        uncond = guided_denoise(unet, cn, z0, t, prepared, guidance_scale=0.0)
    assert guided.dtype == torch.float32
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
