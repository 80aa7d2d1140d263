"""Noise schedulers: MONAI's DDPM and RFlow, and a DDIM whose sampling steps are consistent.

`build_scheduler(cfg)` returns a FRESH scheduler on every call: schedulers keep state
(`set_timesteps` rewrites `timesteps`/`num_inference_steps`), so two loops must never share one
(the diffusers bug reports #1606 and #5749 are this).

Three things differ from MONAI's defaults on purpose:
- `clip_sample=False`: MONAI's DDPM/DDIM clamp the predicted x0 to [-1, 1] by default, which
  is wrong for latents (scaled to unit std, so ~5% of values lie outside).
- DDIM: MONAI 1.6.1 `DDIMScheduler.set_timesteps` spaces timesteps with a linspace from T-1
  down to 0, but `step()` assumes the previous timestep is `t - T // N` (10 steps: it steps
  999 -> 899, then the UNet is evaluated at 888). The sampler then feeds the model a latent whose
  noise level is not the one its timestep says. `ConsistentDDIMScheduler` spaces timesteps
  "trailing" (Lin et al. 2024: T-1, ..., ending one stride above 0) and steps exactly to the
  next timestep it will evaluate, the last step to the clean sample.
- DDPM samples with every one of the T training timesteps: MONAI's `DDPMScheduler.step` always
  steps from t to t - 1, so strided DDPM sampling would be wrong; use DDIM for fewer steps.

Config group `scheduler` (configs/scheduler/{ddpm,ddim,rflow}.yaml):

| key | schedulers | meaning |
|---|---|---|
| `name` | all | `ddpm`, `ddim` or `rflow` |
| `num_train_timesteps` | all | T (1000) |
| `num_inference_steps` | all | default sampling steps (ddpm: must be T; ddim/rflow: 1..T, typically 10-50) |
| `schedule`, `beta_start`, `beta_end` | ddpm, ddim | noise schedule (`linear_beta`, 1e-4..2e-2 as ALDM); `cosine` takes no betas |
| `prediction_type` | all | `epsilon` or `v_prediction` (rflow: only `v_prediction`, the velocity) |
| `clip_sample` | ddpm, ddim | clamp predicted x0 to [-1, 1]; false for latents |
| `variance_type` | ddpm | `fixed_small` (default) or `fixed_large` |
| `eta` | ddim | 0 = deterministic DDIM, 1 = DDPM-like ancestral noise |
| `use_discrete_timesteps`, `sample_method`, `loc`, `scale`, `use_timestep_transform`, `base_img_size_numel` | rflow | see MONAI `RFlowScheduler`; `sample_method` is `uniform` or `logit-normal` |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

from aldm_fed.models._cfg import (
    as_plain_dict,
    check_keys,
    get_bool,
    get_float,
    get_int,
    get_str,
)

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULER_NAMES",
    "ConsistentDDIMScheduler",
    "SamplingPlan",
    "build_scheduler",
    "default_num_steps",
    "predicted_clean",
    "sample_training_timesteps",
    "sampling_plan",
    "scheduler_step",
    "training_target",
]

GROUP = "scheduler"
SCHEDULER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "rflow")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
_DEFAULT_STEPS = {"ddim": 50, "rflow": 30}

_COMMON: dict[str, Any] = {"num_train_timesteps": 1000, "num_inference_steps": None}
_DDPM_LIKE: dict[str, Any] = {
    "schedule": "linear_beta",
    "beta_start": 1e-4,
    "beta_end": 2e-2,
    "prediction_type": "epsilon",
    "clip_sample": False,
}
_OPTIONAL: dict[str, dict[str, Any]] = {
    "ddpm": {**_COMMON, **_DDPM_LIKE, "variance_type": "fixed_small"},
    "ddim": {**_COMMON, **_DDPM_LIKE, "eta": 0.0},
    "rflow": {
        **_COMMON,
        "prediction_type": "v_prediction",
        "use_discrete_timesteps": True,
        "sample_method": "uniform",
        "loc": 0.0,
        "scale": 1.0,
        "use_timestep_transform": False,
        "base_img_size_numel": 32 * 32 * 32,
    },
}


class ConsistentDDIMScheduler(DDIMScheduler):
    """MONAI's `DDIMScheduler` whose `step` lands exactly on the next timestep it evaluates.

    `set_timesteps(N)` uses trailing spacing: round(linspace(T, 0, N + 1)) - 1, i.e.
    T-1, ..., round(T/N) - 1 are evaluated and the final step goes to "-1" (the clean sample,
    alpha_bar = 1 with `set_alpha_to_one`). `step` takes the previous timestep from that table
    (or from `prev_timestep`), never from `t - T // N`.

    Args:
        eta: default DDIM stochasticity for `step` (0 = deterministic).
        *args, **kwargs: as MONAI's `DDIMScheduler` (`steps_offset` must be 0).
    """

    def __init__(self, *args: Any, eta: float = 0.0, **kwargs: Any) -> None:
        if kwargs.get("steps_offset", 0) != 0:
            raise ValueError("ConsistentDDIMScheduler: steps_offset is not supported (use 0)")
        self._prev_timesteps: torch.Tensor
        super().__init__(*args, **kwargs)  # calls set_timesteps(T), which fills _prev_timesteps
        self.eta = float(eta)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set N evaluated timesteps (trailing spacing) and the timestep each step lands on.

        Args:
            num_inference_steps: N, 1..num_train_timesteps.
            device: device of `self.timesteps`.
        """
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps: expected 1..{T}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        grid = torch.round(torch.linspace(T, 0, num_inference_steps + 1, dtype=torch.float64)).long() - 1
        self.timesteps = grid[:-1].to(device)
        self._prev_timesteps = grid[1:].to(device)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep `step(…, timestep, …)` lands on (-1 = the clean sample).

        Args:
            timestep: one of `self.timesteps`.
        """
        t = int(timestep)
        hits = (self.timesteps == t).nonzero()
        if hits.numel() != 1:
            raise ValueError(f"timestep {t} is not one of the scheduled timesteps; call set_timesteps")
        return int(self._prev_timesteps[int(hits[0, 0])])

    def reversed_step(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Not supported: MONAI's version steps by `T // N`, inconsistent with these timesteps."""
        raise NotImplementedError("ConsistentDDIMScheduler does not implement DDIM inversion")

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        prev_timestep: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_prev (formulas 12 and 16 of Song et al. 2021).

        Args:
            model_output: the network's prediction at `timestep` (epsilon or v).
            timestep: the current timestep t.
            sample: x_t.
            eta: stochasticity; None = `self.eta`.
            generator: random generator for the eta > 0 noise.
            prev_timestep: where to step to; None = the next scheduled timestep.

        Returns:
            (x_prev, predicted x0).
        """
        t = int(timestep)
        prev = self.previous_timestep(t) if prev_timestep is None else int(prev_timestep)
        eta = self.eta if eta is None else float(eta)
        acp = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else self.final_alpha_cumprod.to(sample.device, sample.dtype)
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
            eps = model_output
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
            eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
        else:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported here")
        if self.clip_sample:
            x0 = x0.clamp(self.clip_sample_values[0], self.clip_sample_values[1])
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance.clamp(min=0).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            noise = torch.randn(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
            )
            x_prev = x_prev + std * noise
        return x_prev, x0


class _RFlowScheduler(RFlowScheduler):
    """MONAI's `RFlowScheduler`, whose `__init__` (1.6.1) never calls `nn.Module.__init__`, so
    `repr()`, `.to()` or `state_dict()` on it raise AttributeError. Initialising the Module first
    fixes that and changes nothing else."""

    def __init__(self, **kwargs: Any) -> None:
        torch.nn.Module.__init__(self)
        super().__init__(**kwargs)


def _validated(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    raw = as_plain_dict(cfg, GROUP)
    if "name" not in raw:
        raise ValueError(f"{GROUP}.name: missing (required; one of {list(SCHEDULER_NAMES)})")
    name = get_str(raw, "name", GROUP, SCHEDULER_NAMES)
    c = {**_OPTIONAL[name], **raw}
    check_keys(c, GROUP, ("name",), _OPTIONAL[name])
    T = get_int(c, "num_train_timesteps", GROUP, minimum=2)
    out: dict[str, Any] = {"name": name, "num_train_timesteps": T}
    steps = c["num_inference_steps"]
    if steps is None:
        steps = T if name == "ddpm" else min(_DEFAULT_STEPS[name], T)
    else:
        steps = get_int(c, "num_inference_steps", GROUP)
        if steps > T:
            raise ValueError(f"{GROUP}.num_inference_steps: {steps} exceeds num_train_timesteps={T}")
        if name == "ddpm" and steps != T:
            raise ValueError(
                f"{GROUP}.num_inference_steps: DDPM samples with all {T} timesteps (MONAI's DDPM step "
                f"always goes t -> t-1); got {steps}. Use the ddim scheduler for fewer steps"
            )
    out["num_inference_steps"] = steps
    if name == "rflow":
        if c["prediction_type"] != "v_prediction":
            raise ValueError(
                f"{GROUP}.prediction_type: rflow predicts the velocity; only 'v_prediction' is valid, "
                f"got {c['prediction_type']!r}"
            )
        out.update(
            use_discrete_timesteps=get_bool(c, "use_discrete_timesteps", GROUP),
            sample_method=get_str(c, "sample_method", GROUP, ("uniform", "logit-normal")),
            loc=get_float(c, "loc", GROUP),
            scale=get_float(c, "scale", GROUP, minimum=0.0, inclusive_min=False),
            use_timestep_transform=get_bool(c, "use_timestep_transform", GROUP),
            base_img_size_numel=get_int(c, "base_img_size_numel", GROUP),
        )
        return out
    schedule = get_str(c, "schedule", GROUP, _SCHEDULES)
    out.update(
        schedule=schedule,
        prediction_type=get_str(c, "prediction_type", GROUP, PREDICTION_TYPES),
        clip_sample=get_bool(c, "clip_sample", GROUP),
    )
    if schedule != "cosine":
        beta_start = get_float(c, "beta_start", GROUP, minimum=0.0, maximum=1.0, inclusive_min=False)
        beta_end = get_float(c, "beta_end", GROUP, minimum=0.0, maximum=1.0, inclusive_min=False)
        if beta_end <= beta_start:
            raise ValueError(f"{GROUP}.beta_end: must exceed beta_start={beta_start}, got {beta_end}")
        out.update(beta_start=beta_start, beta_end=beta_end)
    if name == "ddpm":
        out["variance_type"] = get_str(c, "variance_type", GROUP, ("fixed_small", "fixed_large"))
    else:
        out["eta"] = get_float(c, "eta", GROUP, minimum=0.0, maximum=1.0)
    return out


def default_num_steps(cfg: Mapping[str, Any] | Any) -> int:
    """The scheduler config's `num_inference_steps` (ddpm: T, ddim: 50, rflow: 30 if unset).

    Args:
        cfg: the `scheduler` config group.
    """
    return int(_validated(cfg)["num_inference_steps"])


def build_scheduler(cfg: Mapping[str, Any] | Any) -> Scheduler:
    """A fresh scheduler for one training or sampling run.

    Args:
        cfg: the `scheduler` config group (keys in the module docstring).

    Returns:
        `DDPMScheduler`, `ConsistentDDIMScheduler` or `RFlowScheduler`.

    Raises:
        ValueError: a key is missing, unknown or invalid (the message names it).
    """
    c = _validated(cfg)
    name, T = c["name"], c["num_train_timesteps"]
    if name == "rflow":
        return _RFlowScheduler(
            num_train_timesteps=T,
            use_discrete_timesteps=c["use_discrete_timesteps"],
            sample_method=c["sample_method"],
            loc=c["loc"],
            scale=c["scale"],
            use_timestep_transform=c["use_timestep_transform"],
            base_img_size_numel=c["base_img_size_numel"],
            spatial_dim=3,
        )
    schedule_args = (
        {} if c["schedule"] == "cosine" else {"beta_start": c["beta_start"], "beta_end": c["beta_end"]}
    )
    common = dict(
        num_train_timesteps=T,
        schedule=c["schedule"],
        prediction_type=c["prediction_type"],
        clip_sample=c["clip_sample"],
        **schedule_args,
    )
    if name == "ddpm":
        return DDPMScheduler(variance_type=c["variance_type"], **common)
    return ConsistentDDIMScheduler(eta=c["eta"], **common)


def _is_rflow(scheduler: Scheduler) -> bool:
    return isinstance(scheduler, RFlowScheduler)


def sample_training_timesteps(
    scheduler: Scheduler, z0: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one training timestep per sample of `z0`, reproducibly from `generator`.

    DDPM/DDIM: uniform integers in [0, T). RFlow: MONAI's `sample_timesteps` (uniform or
    logit-normal, optional resolution shift) re-expressed with an explicit generator.

    Args:
        scheduler: from `build_scheduler`.
        z0: (B, C, *spatial) clean latents (batch size, device and grid size are read).
        generator: random generator on `z0`'s device; None = torch's global RNG.
    """
    B, device = z0.shape[0], z0.device
    T = scheduler.num_train_timesteps
    if not _is_rflow(scheduler):
        return torch.randint(0, T, (B,), generator=generator, device=device, dtype=torch.long)
    rf: RFlowScheduler = scheduler  # type: ignore[assignment]
    if rf.sample_method == "uniform":
        u = torch.rand((B,), generator=generator, device=device)
    else:  # logit-normal: LogisticNormal(loc, scale) first coordinate = sigmoid(N(loc, scale))
        loc, scale = rf.distribution.loc.item(), rf.distribution.scale.item()  # type: ignore[attr-defined]
        u = torch.sigmoid(loc + scale * torch.randn((B,), generator=generator, device=device))
    t = u * T
    if rf.use_discrete_timesteps:
        t = t.long()
    if rf.use_timestep_transform:
        t = timestep_transform(
            t,
            input_img_size_numel=torch.prod(torch.tensor(z0.shape[2:])),
            base_img_size_numel=rf.base_img_size_numel,
            num_train_timesteps=T,
            spatial_dim=z0.ndim - 2,
        )
    return t


def training_target(
    scheduler: Scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network learns to predict for `add_noise(z0, noise, timesteps)`.

    Args:
        scheduler: from `build_scheduler`.
        z0: clean latents.
        noise: the Gaussian noise that was added.
        timesteps: (B,) training timesteps.

    Returns:
        epsilon: `noise`; v_prediction (DDPM/DDIM): sqrt(a) noise - sqrt(1-a) z0;
        rflow: the velocity z0 - noise (x_t = (1 - t/T) z0 + (t/T) noise, integrated from T to 0).
    """
    if _is_rflow(scheduler):
        return z0 - noise
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    raise ValueError(f"prediction_type {scheduler.prediction_type!r} is not supported")


def predicted_clean(
    scheduler: Scheduler, prediction: torch.Tensor, z_t: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent a network prediction implies: the inverse of `training_target`.

    Why it matters: sampling commits to the global layout at the noisiest timesteps, where an
    epsilon prediction is divided by sqrt(alpha_bar) (~0.007 at t = 990 of ALDM's schedule), so a
    small error in epsilon becomes a large error in the brain it implies; v and velocity targets do
    not divide. `benchmarks/denoising.py` measures this per timestep for a trained backbone.

    Args:
        scheduler: from `build_scheduler`.
        prediction: the network output for `z_t` (epsilon, v or velocity, as trained).
        z_t: the noisy latents the network saw.
        timesteps: (B,) their timesteps.

    Returns:
        The implied z0, shaped like `z_t`.
    """
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    if _is_rflow(scheduler):  # z_t = (1 - s) z0 + s noise, v = z0 - noise  =>  z0 = z_t + s v
        s = (timesteps.to(z_t.device, torch.float32) / scheduler.num_train_timesteps).view(shape)
        return z_t + s * prediction
    a = scheduler.alphas_cumprod.to(z_t.device)[timesteps.to(z_t.device).long()].view(shape)
    if scheduler.prediction_type == "epsilon":
        return (z_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if scheduler.prediction_type == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * prediction
    raise ValueError(f"prediction_type {scheduler.prediction_type!r} is not supported")


@dataclass(frozen=True)
class SamplingPlan:
    """The timesteps a sampler evaluates, and where each step lands.

    Args:
        timesteps: (N,) timesteps the network is evaluated at, noisiest first.
        next_timesteps: (N,) the timestep each step produces; `next_timesteps[i] ==
            timesteps[i + 1]`, and the last is the clean sample (-1 for DDPM/DDIM, 0 for RFlow).
    """

    timesteps: torch.Tensor
    next_timesteps: torch.Tensor

    def __len__(self) -> int:
        return int(self.timesteps.numel())


def sampling_plan(
    scheduler: Scheduler, num_steps: int, latent_spatial_shape: Sequence[int] | None = None
) -> SamplingPlan:
    """Call `set_timesteps` on `scheduler` and return the (t, next t) pairs it will step through.

    Args:
        scheduler: from `build_scheduler` (its timesteps are reset).
        num_steps: sampling steps; DDPM requires all T.
        latent_spatial_shape: latent grid, for RFlow's resolution-dependent timestep shift.

    Raises:
        ValueError: invalid `num_steps` for this scheduler.
    """
    T = scheduler.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps: expected an integer in 1..{T}, got {num_steps!r}")
    if _is_rflow(scheduler):
        numel = None
        if latent_spatial_shape is not None:
            numel = int(torch.prod(torch.tensor(list(latent_spatial_shape))))
        if scheduler.use_timestep_transform and numel is None:  # type: ignore[attr-defined]
            raise ValueError("latent_spatial_shape is required with use_timestep_transform")
        scheduler.set_timesteps(num_steps, input_img_size_numel=numel)  # type: ignore[call-arg]
        ts = scheduler.timesteps.cpu()
        nxt = torch.cat([ts[1:], torch.zeros(1, dtype=ts.dtype)])
        return SamplingPlan(ts, nxt)
    if isinstance(scheduler, ConsistentDDIMScheduler):
        scheduler.set_timesteps(num_steps)
        ts = scheduler.timesteps.cpu()
        return SamplingPlan(ts, scheduler._prev_timesteps.cpu().clone())
    if isinstance(scheduler, DDIMScheduler):
        raise ValueError("use ConsistentDDIMScheduler (build_scheduler) rather than MONAI's DDIMScheduler")
    if num_steps != T:
        raise ValueError(
            f"num_steps: DDPM samples with all {T} timesteps (MONAI's DDPM step goes t -> t-1), "
            f"got {num_steps}; use the ddim scheduler for fewer steps"
        )
    scheduler.set_timesteps(T)
    ts = scheduler.timesteps.cpu()
    return SamplingPlan(ts, ts - 1)


def scheduler_step(
    scheduler: Scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    next_timestep: torch.Tensor | int,
    sample: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Advance `sample` from `timestep` to `next_timestep` (one entry of a `SamplingPlan`).

    Args:
        scheduler: the scheduler the plan was made with.
        model_output: the (guided) network prediction at `timestep`.
        timestep: current timestep.
        next_timestep: the plan's next timestep.
        sample: current latent.
        generator: random generator (DDPM noise, DDIM with eta > 0).

    Returns:
        The latent at `next_timestep`, in fp32.
    """
    # Always fp32, whatever autocast the caller runs under: the step mixes the sample and the
    # prediction with coefficients near 0 and 1, where bf16's 8-bit mantissa would be the error.
    dtype = torch.promote_types(sample.dtype, torch.float32)
    model_output, sample = model_output.to(dtype), sample.to(dtype)
    with torch.autocast(sample.device.type, enabled=False):
        if _is_rflow(scheduler):
            rf: RFlowScheduler = scheduler  # type: ignore[assignment]
            return rf.step(model_output, timestep, sample, next_timestep=next_timestep)[0]
        if isinstance(scheduler, ConsistentDDIMScheduler):
            return scheduler.step(
                model_output, timestep, sample, generator=generator, prev_timestep=int(next_timestep)
            )[0]
        if int(next_timestep) != int(timestep) - 1:
            raise ValueError(f"DDPM steps t -> t-1 only; got {int(timestep)} -> {int(next_timestep)}")
        ddpm: DDPMScheduler = scheduler  # type: ignore[assignment]
        return ddpm.step(model_output, int(timestep), sample, generator=generator)[0]
