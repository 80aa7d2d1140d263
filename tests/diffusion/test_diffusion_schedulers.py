"""Schedulers: fresh instances, ALDM's schedule, and the timesteps a sampler really evaluates.

The central check is an oracle: a "perfect" network that returns the exact epsilon / v / velocity
of a known x0 and a fixed noise. With consistent steps, deterministic DDIM and RFlow land exactly
on x0, and at every step the oracle's noise estimate is the one noise we started from. If a step
landed on a timestep other than the next one evaluated (MONAI 1.6.1 DDIM), this fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from omegaconf import OmegaConf

from aldm_fed.diffusion import (
    ConsistentDDIMScheduler,
    build_scheduler,
    default_num_steps,
    predicted_clean,
    sample,
    sample_training_timesteps,
    sampling_plan,
    scheduler_step,
    training_target,
)

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "scheduler"


def cfg(name: str, **overrides: object) -> dict:
    c = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert isinstance(c, dict)
    return {**c, **overrides}


def test_configs_build_the_aldm_schedule() -> None:
    ddpm = build_scheduler(cfg("ddpm"))
    assert isinstance(ddpm, DDPMScheduler) and ddpm.num_train_timesteps == 1000
    assert ddpm.clip_sample is False  # MONAI's default (True) clamps latents to [-1, 1]
    torch.testing.assert_close(ddpm.betas, torch.linspace(1e-4, 2e-2, 1000))
    ddim = build_scheduler(cfg("ddim"))
    assert isinstance(ddim, ConsistentDDIMScheduler) and ddim.clip_sample is False
    torch.testing.assert_close(ddim.alphas_cumprod, ddpm.alphas_cumprod)  # same training schedule
    rflow = build_scheduler(cfg("rflow"))
    assert isinstance(rflow, RFlowScheduler)
    assert "RFlowScheduler" in repr(rflow)  # MONAI's own instance raises in repr()
    assert build_scheduler(cfg("ddim", prediction_type="v_prediction")).prediction_type == "v_prediction"
    assert [default_num_steps(cfg(n)) for n in ("ddpm", "ddim", "rflow")] == [1000, 50, 30]


def test_build_scheduler_returns_a_fresh_instance_each_call() -> None:
    a, b = build_scheduler(cfg("ddim")), build_scheduler(cfg("ddim"))
    assert a is not b
    a.set_timesteps(10)
    assert len(b.timesteps) == 1000  # b is untouched by a's state


@pytest.mark.parametrize(
    ("c", "key"),
    [
        ({"num_train_timesteps": 1000}, "scheduler.name"),
        ({"name": "pndm"}, "scheduler.name"),
        (cfg("ddim", beta_strat=1e-4), "scheduler.beta_strat"),
        (cfg("ddpm", eta=0.0), "scheduler.eta"),
        (cfg("ddpm", num_inference_steps=50), "scheduler.num_inference_steps"),
        (cfg("ddim", num_inference_steps=2000), "scheduler.num_inference_steps"),
        (cfg("ddim", prediction_type="sample"), "scheduler.prediction_type"),
        (cfg("ddim", beta_end=1e-5), "scheduler.beta_end"),
        (cfg("rflow", prediction_type="epsilon"), "scheduler.prediction_type"),
        (cfg("rflow", sample_method="normal"), "scheduler.sample_method"),
        (cfg("rflow", schedule="linear_beta"), "scheduler.schedule"),
    ],
)
def test_bad_scheduler_configs_name_the_key(c: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_scheduler(c)


@pytest.mark.parametrize("n", [1, 10, 20, 30, 50, 1000])
def test_ddim_plan_steps_onto_the_next_evaluated_timestep(n: int) -> None:
    sch = build_scheduler(cfg("ddim"))
    plan = sampling_plan(sch, n)
    ts, nxt = plan.timesteps.tolist(), plan.next_timesteps.tolist()
    assert len(plan) == n and ts[0] == 999  # starts at pure noise
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert nxt[:-1] == ts[1:] and nxt[-1] == -1  # the last step goes to the clean sample
    assert [sch.previous_timestep(t) for t in ts] == nxt  # what step() uses when not told


def test_ddpm_plan_is_every_timestep_and_refuses_strides() -> None:
    sch = build_scheduler(cfg("ddpm"))
    plan = sampling_plan(sch, 1000)
    assert plan.timesteps.tolist() == list(range(999, -1, -1))
    assert plan.next_timesteps.tolist() == list(range(998, -2, -1))
    with pytest.raises(ValueError, match="ddim"):
        sampling_plan(sch, 50)


@pytest.mark.parametrize("n", [10, 20, 50])
def test_rflow_plan(n: int) -> None:
    plan = sampling_plan(build_scheduler(cfg("rflow")), n, (8, 8, 8))
    ts, nxt = plan.timesteps.tolist(), plan.next_timesteps.tolist()
    assert len(plan) == n and ts[0] == 1000 and nxt[-1] == 0 and nxt[:-1] == ts[1:]


def _run_oracle(sch, plan, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run `plan` with a perfect network for the trajectory of (x0, eps), from the exact x_T.

    The network returns the target that is correct IF the sample is at the noise level of the
    timestep it is told (epsilon: eps; v: sqrt(a) eps - sqrt(1-a) x0; rflow: x0 - eps). Returns the
    final sample and the worst drift of the sample's actual noise from `eps`: both are ~0 only when
    every step lands on the timestep of the next evaluation."""
    rflow = isinstance(sch, RFlowScheduler)
    x = None
    drift = 0.0
    for t, t_next in zip(plan.timesteps.tolist(), plan.next_timesteps.tolist()):
        if rflow:
            if x is None:
                x = (1 - t / 1000) * x0 + (t / 1000) * eps
            implied = (x - (1 - t / 1000) * x0) / (t / 1000)
            out = x0 - eps
        else:
            a = sch.alphas_cumprod[t]
            if x is None:
                x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            implied = (x - a.sqrt() * x0) / (1 - a).sqrt()
            out = eps if sch.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        drift = max(drift, float((implied - eps).abs().max()))
        x = scheduler_step(sch, out, t, t_next, x)
    assert x is not None
    return x, drift


@pytest.mark.parametrize(
    ("name", "n", "pred"),
    [("ddim", 7, "epsilon"), ("ddim", 20, "epsilon"), ("ddim", 30, "v_prediction"), ("rflow", 20, None)],
)
def test_oracle_sampler_recovers_x0_exactly(name: str, n: int, pred: str | None) -> None:
    sch = build_scheduler(cfg(name, **({"prediction_type": pred} if pred else {})))
    if not isinstance(sch, RFlowScheduler):  # float64 so "exactly" means 1e-9
        sch.alphas_cumprod = sch.alphas_cumprod.double()
        sch.final_alpha_cumprod = sch.final_alpha_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 2, 4, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    x, drift = _run_oracle(sch, sampling_plan(sch, n, (4, 4, 4)), x0, eps)
    assert drift < 1e-9
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-9)


def test_monai_native_ddim_is_inconsistent() -> None:
    """Pins the MONAI 1.6.1 pitfall we work around: its `set_timesteps` and `step` disagree, so
    the oracle does not land on x0. If MONAI fixes it, this fails: ConsistentDDIMScheduler could
    then go."""
    sch = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sch.set_timesteps(10)
    assert sch.timesteps.tolist()[:2] == [999, 888]  # but step(999) lands on 999 - 1000 // 10 = 899
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    acp = sch.alphas_cumprod.double()
    x = acp[999].sqrt() * x0 + (1 - acp[999]).sqrt() * eps
    for t in sch.timesteps.tolist():
        x, _ = sch.step(eps, t, x)  # the network is right about the noise: it is always eps
    assert (x - x0).abs().max() > 1e-3


class _RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: records the timesteps it is called with, predicts zeros."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.calls: list[list[float]] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append(timesteps.tolist())
        return torch.zeros_like(x)


@pytest.mark.parametrize(("name", "n"), [("ddpm", 1000), ("ddim", 20), ("ddim", 30), ("rflow", 20)])
def test_sample_evaluates_exactly_the_planned_timesteps(name: str, n: int) -> None:
    sch = build_scheduler(cfg(name))
    unet = _RecordingUNet()
    noise = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(unet, None, sch, None, num_steps=n, noise=noise, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    expected = sampling_plan(build_scheduler(cfg(name)), n, (4, 4, 4)).timesteps.tolist()
    assert len(unet.calls) == n
    assert [c[0] for c in unet.calls] == expected
    assert all(len(set(c)) == 1 and len(c) == 2 for c in unet.calls)  # one t for the whole batch


def test_training_targets() -> None:
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 2, 3, 4, 4, 4, generator=g).unbind(0)
    t = torch.tensor([10, 900])
    eps_s = build_scheduler(cfg("ddpm"))
    assert torch.equal(training_target(eps_s, z0, noise, t), noise)
    v_s = build_scheduler(cfg("ddim", prediction_type="v_prediction"))
    a = v_s.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(training_target(v_s, z0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * z0)
    rf = build_scheduler(cfg("rflow"))
    torch.testing.assert_close(training_target(rf, z0, noise, t), z0 - noise)
    # and rflow's add_noise moves from z0 (t=0) toward noise (t=T) along that velocity
    torch.testing.assert_close(rf.add_noise(z0, noise, torch.tensor([0, 0])), z0)


@pytest.mark.parametrize(
    "c", [cfg("ddpm"), cfg("ddim", prediction_type="v_prediction"), cfg("rflow"),
          cfg("ddim", schedule="cosine")],
)
def test_predicted_clean_inverts_the_training_target(c: dict) -> None:
    """The exact target at a noisy latent implies exactly the clean latent, at every noise level."""
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 4, 3, 4, 4, 4, generator=g).unbind(0)
    t = torch.tensor([0, 250, 700, 999])
    sch = build_scheduler(c)
    z_t = sch.add_noise(original_samples=z0, noise=noise, timesteps=t)
    got = predicted_clean(sch, training_target(sch, z0, noise, t), z_t, t)
    torch.testing.assert_close(got, z0, atol=2e-3, rtol=1e-3)  # epsilon at t=999 divides by ~0.006
    # a prediction of the wrong kind does not: the check can fail
    wrong = predicted_clean(sch, torch.zeros_like(noise), z_t, t)
    assert float((wrong - z0).abs().max()) > 0.1


@pytest.mark.parametrize(
    "c", [cfg("ddpm"), cfg("rflow"), cfg("rflow", sample_method="logit-normal", use_timestep_transform=True)]
)
def test_training_timesteps_are_reproducible_and_in_range(c: dict) -> None:
    sch = build_scheduler(c)
    z0 = torch.zeros(64, 2, 8, 8, 8)
    a = sample_training_timesteps(sch, z0, torch.Generator().manual_seed(5))
    b = sample_training_timesteps(sch, z0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (64,)
    assert float(a.min()) >= 0 and float(a.max()) < 1000
    assert len(set(a.tolist())) > 32  # actually random

