"""Network factories: shapes, ControlNet zero-init and weight copy, the cached mask encoder,
config validation. Tiny sizes (32^3 images, 8^3 latents): each test takes well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.models import (
    build_controlnet,
    build_unet,
    build_vae,
    bypass_mask_embedding,
    controlnet_downsample_factor,
    controlnet_from_unet,
    mask_embedding,
    unet_downsample_factor,
    vae_downsample_factor,
)

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAE = {
    "latent_channels": 4,
    "channels": [8, 16, 16],
    "num_res_blocks": 1,
    "attention_levels": [False, False, False],
    "norm_num_groups": 4,
}
UNET = {
    "channels": [8, 16, 16],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
}
CONTROLNET = {"conditioning_embedding_num_channels": [4, 8, 16]}
LATENT, MASK_CH = 4, 3


def _perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter, so zero-initialised layers stop being zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _randomise_unet_output_(unet: torch.nn.Module) -> None:
    # A fresh MONAI UNet has a zero-initialised output conv and predicts exactly 0.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(b: int = 1, concat: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, LATENT + concat, 8, 8, 8, generator=g)
    t = torch.tensor([500] * b)
    mask = (torch.rand(b, MASK_CH, 32, 32, 32, generator=g) > 0.7).float()
    return z, t, mask


def test_shapes_through_vae_unet_controlnet() -> None:
    vae = build_vae(VAE, in_channels=3)
    x = torch.rand(2, 3, 32, 32, 32)
    z_mu, z_sigma = vae.encode(x)
    assert z_mu.shape == z_sigma.shape == (2, LATENT, 8, 8, 8)
    assert vae.decode(z_mu).shape == x.shape
    assert vae_downsample_factor(VAE) == 4

    unet = build_unet(UNET, LATENT, mask_channels=MASK_CH)
    assert (unet.in_channels, unet.out_channels) == (LATENT + MASK_CH, LATENT)
    assert unet_downsample_factor(UNET) == 4
    cn = build_controlnet(UNET, CONTROLNET, LATENT, 4, mask_channels=MASK_CH, unet_mask_channels=MASK_CH)
    assert controlnet_downsample_factor(cn) == 4
    z, t, mask = _inputs(2, concat=MASK_CH)
    down, mid = cn(z, t, controlnet_cond=mask)
    assert mid.shape == (2, 16, 2, 2, 2)
    assert [tuple(d.shape[2:]) for d in down] == [(8,) * 3] * 2 + [(4,) * 3] * 2 + [(2,) * 3] * 2
    out = unet(z, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert out.shape == (2, LATENT, 8, 8, 8)


def test_vae_nonlocal_attention_is_opt_in() -> None:
    from monai.networks.blocks import SpatialAttentionBlock

    def n_attention(m: torch.nn.Module) -> int:
        return sum(isinstance(x, SpatialAttentionBlock) for x in m.modules())

    assert n_attention(build_vae(VAE, 3)) == 0  # MONAI's defaults would add 2
    with_attn = {**VAE, "with_encoder_nonlocal_attn": True, "with_decoder_nonlocal_attn": True}
    assert n_attention(build_vae(with_attn, 3)) > 0


def test_controlnet_at_init_leaves_backbone_prediction_unchanged() -> None:
    torch.manual_seed(0)
    unet = build_unet(UNET, LATENT)
    _randomise_unet_output_(unet)
    cn = build_controlnet(UNET, CONTROLNET, LATENT, 4, mask_channels=MASK_CH)
    controlnet_from_unet(cn, unet)
    z, t, mask = _inputs()
    with torch.no_grad():
        plain = unet(z, t)
        down, mid = cn(z, t, controlnet_cond=mask)
        with_cn = unet(z, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        assert plain.abs().max() > 1e-3  # the test can fail: the UNet output is not trivially zero
        torch.testing.assert_close(with_cn, plain, rtol=0, atol=0)
        # and once the zero convolutions are trained (perturbed), the ControlNet does change it
        _perturb_(cn)
        down, mid = cn(z, t, controlnet_cond=mask)
        changed = unet(z, t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert (changed - plain).abs().max() > 1e-4


def test_controlnet_from_unet_copies_encoder_weights() -> None:
    unet = build_unet(UNET, LATENT, mask_channels=MASK_CH)
    _perturb_(unet, seed=3)
    cn = build_controlnet(UNET, CONTROLNET, LATENT, 4, mask_channels=MASK_CH, unet_mask_channels=MASK_CH)
    key = "down_blocks.1.resnets.0.conv1.conv.weight"
    assert not torch.equal(cn.state_dict()[key], unet.state_dict()[key])
    report = controlnet_from_unet(cn, unet)
    for k in (key, "conv_in.conv.weight", "time_embed.0.weight", "middle_block.attention.attn.to_q.weight"):
        assert k in report.copied
        torch.testing.assert_close(cn.state_dict()[k], unet.state_dict()[k], rtol=0, atol=0)
    assert report.shape_mismatch == ()
    assert any(k.startswith("controlnet_cond_embedding.") for k in report.controlnet_only)
    assert any(k.startswith("controlnet_down_blocks.") for k in report.controlnet_only)
    assert any(k.startswith("up_blocks.") for k in report.unet_only)
    # the zero convolutions are untouched, so the pair still starts as "no change"
    assert all(cn.state_dict()[k].abs().max() == 0 for k in report.controlnet_only if "controlnet_mid" in k)
    assert "copied" in str(report)


def test_controlnet_from_unet_reports_mismatched_input_conv() -> None:
    unet = build_unet(UNET, LATENT, mask_channels=MASK_CH)
    cn = build_controlnet(UNET, CONTROLNET, LATENT, 4, mask_channels=MASK_CH)  # latent-only input
    report = controlnet_from_unet(cn, unet)
    assert report.shape_mismatch == ("conv_in.conv.weight",)
    other_arch = {**UNET, "channels": [4, 4, 4], "attention_levels": [False] * 3, "num_head_channels": 4}
    with pytest.raises(ValueError, match="same model.unet"):
        controlnet_from_unet(cn, build_unet(other_arch, LATENT))


def test_cached_mask_embedding_gives_identical_residuals() -> None:
    cn = build_controlnet(UNET, CONTROLNET, LATENT, 4, mask_channels=MASK_CH)
    _perturb_(cn)  # non-zero mask encoder output and zero convs, else both sides are 0
    z, t, mask = _inputs(2)
    with torch.no_grad():
        down_ref, mid_ref = cn(z, t, controlnet_cond=mask)
        emb = mask_embedding(cn, mask)
        assert emb.shape == (2, UNET["channels"][0], 8, 8, 8)
        with bypass_mask_embedding(cn):
            down, mid = cn(z, t, controlnet_cond=emb)
    assert mid_ref.abs().max() > 1e-4
    torch.testing.assert_close(mid, mid_ref, rtol=0, atol=0)
    for a, b in zip(down, down_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # restored afterwards, also when the block raises
    with pytest.raises(RuntimeError), bypass_mask_embedding(cn):
        raise RuntimeError("boom")
    assert not isinstance(cn.controlnet_cond_embedding, torch.nn.Identity)


@pytest.mark.parametrize(
    ("builder", "cfg", "key"),
    [
        ("vae", {k: v for k, v in VAE.items() if k != "latent_channels"}, "model.vae.latent_channels"),
        ("vae", {**VAE, "latent_channel": 4}, "model.vae.latent_channel"),
        ("vae", {**VAE, "channels": [8, 6, 16]}, "model.vae.channels"),
        ("vae", {**VAE, "attention_levels": [False, False]}, "model.vae.attention_levels"),
        ("vae", {**VAE, "num_res_blocks": [1, 1]}, "model.vae.num_res_blocks"),
        ("vae", {**VAE, "latent_channels": 0}, "model.vae.latent_channels"),
        ("vae", {**VAE, "with_encoder_nonlocal_attn": "yes"}, "model.vae.with_encoder_nonlocal_attn"),
        ("unet", {**UNET, "num_head_channels": 3}, "model.unet.num_head_channels"),
        ("unet", {**UNET, "norm_num_groups": 3}, "model.unet.channels"),
        ("unet", {**UNET, "channels": []}, "model.unet.channels"),
        ("unet", {**UNET, "use_flash_attention": 1}, "model.unet.use_flash_attention"),
        (
            "controlnet",
            {"conditioning_embedding_num_channels": [4, 8]},
            "model.controlnet.conditioning_embedding_num_channels",
        ),
        ("controlnet", {**CONTROLNET, "scale": 1.0}, "model.controlnet.scale"),
        ("controlnet", {**CONTROLNET, "conditioning_scale": -1.0}, "model.controlnet.conditioning_scale"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_key(builder: str, cfg: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        if builder == "vae":
            build_vae(cfg, 3)
        elif builder == "unet":
            build_unet(cfg, LATENT)
        else:
            build_controlnet(UNET, cfg, LATENT, 4)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_vae(VAE, 0)
    with pytest.raises(ValueError, match="mask_channels"):
        build_unet(UNET, LATENT, mask_channels=-1)
    with pytest.raises(ValueError, match="vae_downsample"):
        build_controlnet(UNET, CONTROLNET, LATENT, 3)
    with pytest.raises(ValueError, match="downsamples by 8"):
        build_controlnet(UNET, CONTROLNET, LATENT, 8)


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_presets_build_and_agree(preset: str) -> None:
    vae_cfg = OmegaConf.load(CONFIGS / "model" / "vae" / f"{preset}.yaml")
    unet_cfg = OmegaConf.load(CONFIGS / "model" / "unet" / f"{preset}.yaml")
    cn_cfg = OmegaConf.load(CONFIGS / "model" / "controlnet" / f"{preset}.yaml")
    image = {"tiny": 32, "demo": 64, "paper": 112}[preset]
    factor = vae_downsample_factor(vae_cfg)
    latent_side = image // factor
    assert image % factor == 0 and latent_side % unet_downsample_factor(unet_cfg) == 0
    assert latent_side == {"tiny": 8, "demo": 16, "paper": 28}[preset]
    if preset == "paper":  # build the big one on the meta device: checks arguments, allocates nothing
        with torch.device("meta"):
            vae = build_vae(vae_cfg, 3)
    else:
        vae = build_vae(vae_cfg, 3)
    with torch.device("meta"):
        unet = build_unet(unet_cfg, vae.latent_channels, mask_channels=3)
        cn = build_controlnet(unet_cfg, cn_cfg, vae.latent_channels, factor, unet_mask_channels=3)
    assert controlnet_downsample_factor(cn) == factor
    assert unet.block_out_channels == cn.block_out_channels
    if preset == "paper":
        assert vae.latent_channels == 8 and list(unet.block_out_channels) == [64, 128, 256]
        assert list(unet.attention_levels) == [False, True, True]
