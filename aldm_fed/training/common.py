"""Plumbing shared by the generative training stages (VAE, backbone, ControlNet).

- Each stage has its own config section `cfg.train.<stage>` (configs/train/<stage>.yaml, which
  extends configs/train/base.yaml). Sections are separate packages, so one stage's `lr` can never
  overwrite another's; `stage_section` reads one and checks its keys.
- `run_config` is what identifies a stage's run to `run_loop`: only the config that stage depends
  on (its own train section at key `train`, so the loop's resumable keys `train.max_steps`, ... stay
  resumable; its model groups; its inputs' checkpoint hashes), never the whole composed config
  (else changing the backbone's lr would make a finished VAE run "different"). Inputs enter by
  the sha256 of their weights only (`artifacts.checkpoint_identity`), never a path, and the
  scheduler without its sampling-only keys (`scheduler_identity`).
- `optimizer_step`: backward (through a GradScaler only for fp16 on CUDA), optional gradient
  clipping, step; a non-finite loss or gradient raises `NonFiniteError` before the step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aldm_fed.checkpoints import plain_config
from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_int
from aldm_fed.training.device import DeviceSetup, resolve_device
from aldm_fed.training.loop import LoopConfig
from aldm_fed.training.numerics import NonFiniteError, check_gradients, check_loss
from aldm_fed.training.optim import adam_optimizer

__all__ = [
    "LOOP_KEYS",
    "OptimSettings",
    "device_setup",
    "init_from_state",
    "loop_config",
    "optimizer_step",
    "run_config",
    "scheduler_identity",
    "stage_section",
    "state_sha256",
]

# Keys every stage section inherits from configs/train/base.yaml.
LOOP_KEYS: dict[str, Any] = {
    "max_steps": 1000,
    "ckpt_every": 100,
    "keep_last": 2,
    "log_every": 1,
    "progress": True,
    "ema_decay": None,
    "lr": 1e-4,
    "batch_size": 1,
}
# Optimizer keys every stage understands (AdamW).
OPTIM_KEYS: dict[str, Any] = {"weight_decay": 0.0, "grad_clip": None}


def stage_section(cfg: Any, stage: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg.train.<stage>` as a checked plain dict.

    Every key must be present (configs/train/<stage>.yaml sets them all, so the YAML is the one
    place defaults live, never silently this code); unknown keys are an error.

    Args:
        cfg: the composed config.
        stage: `vae`, `backbone` or `controlnet`.
        defaults: the stage's own keys (beyond `LOOP_KEYS` and `OPTIM_KEYS`); their values here
            only document the YAML's.

    Raises:
        ValueError: the section is missing or incomplete (configs/config.yaml lacks the stage's
            train entry), or has an unknown or invalid key.
    """
    group = f"train.{stage}"
    hint = (
        f"configs/config.yaml needs `- train@train.{stage}: {stage}` in its defaults (it composes "
        f"configs/train/{stage}.yaml, which extends base.yaml)"
    )
    train = cfg.get("train") if hasattr(cfg, "get") else None
    section = train.get(stage) if train is not None and hasattr(train, "get") else None
    if section is None:
        raise ValueError(f"config has no `{group}` section: {hint}")
    known = {**LOOP_KEYS, **OPTIM_KEYS, **defaults}
    merged = as_plain_dict(section, group)
    missing = sorted(set(known) - set(merged))
    if missing:
        raise ValueError(f"`{group}` lacks {missing}: {hint}")
    check_keys(merged, group, (), known)
    get_float(merged, "lr", group, minimum=0.0, inclusive_min=False)
    get_int(merged, "batch_size", group)
    get_float(merged, "weight_decay", group, minimum=0.0)
    get_bool(merged, "progress", group)
    if merged["grad_clip"] is not None:
        get_float(merged, "grad_clip", group, minimum=0.0, inclusive_min=False)
    return merged


@dataclass(frozen=True)
class OptimSettings:
    """AdamW settings of a stage.

    Args:
        lr: learning rate.
        batch_size: volumes per step.
        weight_decay: AdamW weight decay.
        grad_clip: max global gradient norm; None = no clipping.
    """

    lr: float
    batch_size: int
    weight_decay: float = 0.0
    grad_clip: float | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> OptimSettings:
        """From a checked stage section (`stage_section`).

        Args:
            section: the stage's train section.
        """
        clip = section.get("grad_clip")
        return cls(
            lr=float(section["lr"]),
            batch_size=int(section["batch_size"]),
            weight_decay=float(section.get("weight_decay", 0.0)),
            grad_clip=None if clip is None else float(clip),
        )

    def adamw(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh AdamW over `params` (`adam_optimizer`: fused where the device has the kernel).

        Args:
            params: the trained parameters.
            lr: overrides `self.lr` (e.g. the discriminator's).
        """
        return adam_optimizer(params, lr=self.lr if lr is None else lr, weight_decay=self.weight_decay)


def loop_config(section: Mapping[str, Any], seed: int, progress: bool = True) -> LoopConfig:
    """The run_loop settings of a stage section.

    Args:
        section: the stage's train section.
        seed: the run seed (`cfg.seed`).
        progress: False hides the bar whatever the section says.
    """
    return LoopConfig.from_mapping(
        section, seed=int(seed), progress=bool(section.get("progress", True)) and progress
    )


def device_setup(cfg: Any) -> DeviceSetup:
    """`resolve_device(cfg.device.spec, cfg.device.precision, cfg.device.channels_last)` (auto when absent).

    Args:
        cfg: the composed config.
    """
    dev = cfg.get("device") if hasattr(cfg, "get") else None
    spec = str(dev.get("spec", "auto")) if dev is not None else "auto"
    precision = str(dev.get("precision", "auto")) if dev is not None else "auto"
    channels_last = str(dev.get("channels_last", "auto")) if dev is not None else "auto"
    return resolve_device(spec, precision, channels_last)


def run_config(cfg: Any, stage: str, section: Mapping[str, Any], **parts: Any) -> dict[str, Any]:
    """The config that identifies one stage's run (see the module docstring).

    Args:
        cfg: the composed config (`seed` and `device` are read).
        stage: the stage name.
        section: the stage's train section (stored at key `train`).
        **parts: what else the stage depends on: model groups, data identity, input checkpoints.
    """
    return plain_config(
        {
            "stage": stage,
            "seed": int(cfg.seed),
            "train": dict(section),
            "device": cfg.get("device") if hasattr(cfg, "get") else None,
            **parts,
        }
    )


# Scheduler keys read only by the sampler: changing them does not change what a stage trains.
SAMPLING_ONLY_SCHEDULER_KEYS: tuple[str, ...] = ("num_inference_steps", "eta")


def scheduler_identity(scheduler_cfg: Any) -> dict[str, Any]:
    """The scheduler config as a run identity: without `SAMPLING_ONLY_SCHEDULER_KEYS`.

    Args:
        scheduler_cfg: the `scheduler` group.
    """
    plain = plain_config(scheduler_cfg)
    return {k: v for k, v in plain.items() if k not in SAMPLING_ONLY_SCHEDULER_KEYS}


def warn_weight_copy(report: Any, log: Any, what: str) -> None:
    """Log a warning when `controlnet_from_unet` left tensors at their init for a shape mismatch.

    Args:
        report: its `WeightCopyReport`.
        log: the caller's logger.
        what: who copied, for the message.
    """
    if report.shape_mismatch:
        log.warning("%s: ControlNet initialised from the UNet, but %s", what, report)


def state_sha256(state: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a set of state dicts.

    Args:
        state: module name -> state dict.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        for key in sorted(state[name]):
            t = state[name][key].detach().to("cpu").contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{list(t.shape)}".encode())
            # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot change dtype by view
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def init_from_state(
    modules: Mapping[str, nn.Module], init_state: Mapping[str, Mapping[str, torch.Tensor]] | None
) -> str | None:
    """Load starting weights (e.g. the global weights of a federated round) into `modules`.

    Only a fresh run starts from them: a run directory with a checkpoint resumes from that
    checkpoint instead. Their hash goes into the run's identity, so a run directory is never
    resumed with other starting weights.

    Args:
        modules: name -> module.
        init_state: name -> state dict (strict: keys must match); None = keep the initialisation.

    Returns:
        sha256 of `init_state`, or None.

    Raises:
        ValueError: a name in `init_state` is not one of `modules`.
    """
    if not init_state:
        return None
    unknown = sorted(set(init_state) - set(modules))
    if unknown:
        raise ValueError(f"init_state names {unknown}; this stage trains {sorted(modules)}")
    for name, state in init_state.items():
        modules[name].load_state_dict(state)
    return state_sha256(init_state)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
    *,
    update: bool = True,
) -> float | None:
    """zero_grad, backward, optional clipping, step.

    Args:
        loss: scalar loss of this step.
        optimizer: the optimizer.
        params: its parameters (for clipping).
        scaler: from `make_grad_scaler` (a no-op except fp16 on CUDA).
        grad_clip: max global gradient norm, or None.
        update: call `scaler.update()` (False when another optimizer steps later in the same
            training step: the scaler is updated once per step, after the last one).

    Returns:
        The gradient norm before clipping, when clipping.

    Raises:
        NonFiniteError: the loss, or (without a GradScaler, which skips such steps itself) the
            gradients, are NaN or infinite; the optimizer has not stepped.
    """
    check_loss(loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    norm = None
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        if not scaler.is_enabled() and not math.isfinite(norm):
            raise NonFiniteError("gradient norm", norm)
    elif not scaler.is_enabled():
        check_gradients(params)
    scaler.step(optimizer)
    if update:
        scaler.update()
    return norm
