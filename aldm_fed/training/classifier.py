"""Train and apply a downstream classifier (slice or volume task) with the shared loop.

The stage holds only the model math; `run_loop` does resume, seeding, checkpoints and metrics:

1. Class weights from the training labels (class-balanced BCE: each class carries half the loss).
2. `step_fn(step, generator)`: batch = `batch_indices(seed, step, N, batch_size)`, optional
   classic augmentation (MONAI random flips, small affine, intensity scale and gamma) seeded from
   the step's generator, forward under the device's autocast, weighted BCE, AdamW step through
   `optimizer_step` (a GradScaler for fp16 on CUDA, checkpointed with the optimizer).
3. `predict_proba`: sigmoid of the logits, in eval mode, float32.

A finished run directory is not retrained: `run_loop` finds the final checkpoint, loads the
weights and returns at once, so rerunning an evaluation only re-predicts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from aldm_fed.checkpoints import plain_config
from aldm_fed.evaluation.tasks import TaskData
from aldm_fed.training.common import optimizer_step
from aldm_fed.training.device import DeviceSetup, autocast_context, make_grad_scaler, resolve_device
from aldm_fed.training.loop import LoopConfig, LoopResult, batch_indices, run_loop
from aldm_fed.training.optim import adam_optimizer

__all__ = [
    "AugmentConfig",
    "ClassifierTrainConfig",
    "TrainedClassifier",
    "build_augmentation",
    "class_weights",
    "predict_proba",
    "train_classifier",
]

Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Training budget and optimizer (`classifier.train` in configs/classifier/*.yaml).

    Attributes:
        steps: optimizer steps (the same for every regime: equal budget).
        batch_size: samples per step (>= 2: BatchNorm needs two).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        class_balanced: weight the BCE so both classes carry equal total weight.
        ckpt_every: checkpoint every N steps (None: only at the end).
        log_every: metrics.jsonl line every N steps.
        progress: tqdm progress bar.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    class_balanced: bool = True
    ckpt_every: int | None = None
    log_every: int = 10
    progress: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"classifier.train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"classifier.train.batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"classifier.train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"classifier.train.weight_decay must be >= 0, got {self.weight_decay}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> ClassifierTrainConfig:
        """Build from the `classifier.train` section (unknown keys are an error).

        Args:
            cfg: mapping or DictConfig.
        """
        plain = plain_config(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(plain) - known)
        if unknown:
            raise ValueError(f"classifier.train: unknown key(s) {unknown} (known: {sorted(known)})")
        return cls(**plain)


@dataclass(frozen=True)
class AugmentConfig:
    """Classic augmentation for the "real + classic augmentation" regime (`classifier.augmentation`).

    Attributes:
        flip_prob: probability of a flip along each axis of `flip_axes`.
        flip_axes: spatial axes to flip (0 = left-right in the RAS cache).
        affine_prob: probability of a random affine.
        rotate_deg: max rotation (degrees) about each axis.
        scale: max relative zoom (0.1 -> 0.9..1.1).
        translate: max shift as a fraction of the side.
        intensity_prob: probability of each intensity change.
        intensity_scale: max relative intensity scaling (x (1 +- s)).
        gamma: (low, high) gamma range of the contrast change.
    """

    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (0,)
    affine_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    gamma: tuple[float, float] = field(default=(0.8, 1.25))

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "intensity_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"classifier.augmentation.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("rotate_deg", "scale", "translate", "intensity_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"classifier.augmentation.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.gamma) != 2 or not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(
                f"classifier.augmentation.gamma must be (low, high) with 0 < low <= high, got {self.gamma}"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> AugmentConfig:
        """Build from the `classifier.augmentation` section (unknown keys are an error).

        Args:
            cfg: mapping or DictConfig.
        """
        plain = dict(plain_config(cfg))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(plain) - known)
        if unknown:
            raise ValueError(f"classifier.augmentation: unknown key(s) {unknown} (known: {sorted(known)})")
        for key in ("flip_axes", "gamma"):
            if key in plain:
                plain[key] = tuple(plain[key])
        return cls(**plain)


def build_augmentation(aug: AugmentConfig, sample_shape: Sequence[int]) -> Augment:
    """A per-sample augmentation `fn(x, seed) -> x` from MONAI random transforms.

    The transforms are reseeded for every call, so a step's augmentation is a function of the
    step's generator only (exact resume).

    Args:
        aug: the settings.
        sample_shape: (C, *spatial) of one sample (2 or 3 spatial dims).
    """
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandScaleIntensity

    spatial = [int(s) for s in sample_shape[1:]]
    dims = len(spatial)
    bad_axes = [a for a in aug.flip_axes if not 0 <= a < dims]
    if bad_axes:
        raise ValueError(
            f"classifier.augmentation.flip_axes {list(aug.flip_axes)}: a {dims}D sample has axes 0..{dims - 1}"
        )
    rot = math.radians(aug.rotate_deg)
    transforms: list[Any] = [RandFlip(prob=aug.flip_prob, spatial_axis=a) for a in aug.flip_axes]
    transforms.append(
        RandAffine(
            prob=aug.affine_prob,
            rotate_range=rot if dims == 2 else (rot, rot, rot),
            scale_range=[aug.scale] * dims,
            translate_range=[aug.translate * s for s in spatial],
            padding_mode="zeros",  # outside the brain is 0 in the cache
            mode="bilinear",
        )
    )
    transforms += [
        RandScaleIntensity(factors=aug.intensity_scale, prob=aug.intensity_prob),
        RandAdjustContrast(prob=aug.intensity_prob, gamma=aug.gamma),
    ]
    chain = Compose(transforms)

    def apply(x: torch.Tensor, seed: int) -> torch.Tensor:
        chain.set_random_state(seed=seed % (2**32))
        out = chain(x)
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)  # drop MetaTensor
        return out.clamp_(0.0, 1.0)

    return apply


def class_weights(labels: np.ndarray, balanced: bool = True) -> tuple[float, float]:
    """(weight of class 0, weight of class 1) for the BCE.

    Balanced: n / (2 n_c), so each class sums to half of the loss; else (1, 1).

    Args:
        labels: 0/1 training labels.
        balanced: class-balanced weights or plain ones.

    Raises:
        ValueError: a class is absent (nothing to learn a boundary from).
    """
    n = int(labels.shape[0])
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(f"training labels hold one class only ({n_pos} positives of {n}); a binary "
                         "classifier needs both")
    if not balanced:
        return 1.0, 1.0
    return n / (2.0 * (n - n_pos)), n / (2.0 * n_pos)


@dataclass
class TrainedClassifier:
    """What `train_classifier` returns.

    Attributes:
        model: the trained network (on `device.device`, eval mode).
        loop: the loop's result (final checkpoint, last metrics, resumed_from).
        device: where it ran.
        class_weights: (w0, w1) used in the loss.
    """

    model: nn.Module
    loop: LoopResult
    device: DeviceSetup
    class_weights: tuple[float, float]


def train_classifier(
    model: nn.Module,
    data: TaskData,
    run_dir: str | os.PathLike[str],
    cfg: ClassifierTrainConfig,
    *,
    seed: int,
    augment: AugmentConfig | None = None,
    device: DeviceSetup | None = None,
    config: Any = None,
    overwrite: bool = False,
) -> TrainedClassifier:
    """Train `model` on `data` for `cfg.steps` steps in `run_dir` (resumable).

    Args:
        model: from `aldm_fed.models.classifier.build_classifier` (one logit per sample).
        data: the training samples.
        run_dir: the run directory (checkpoints, metrics.jsonl, run.json).
        cfg: budget and optimizer.
        seed: run seed: batch order, augmentation and dropout derive from (seed, step).
        augment: classic augmentation, or None.
        device: from `resolve_device`; None = `resolve_device("auto")`.
        config: what identifies the run (stored with checkpoints; a run dir with another config
            is refused unless `overwrite`). Defaults to the train/augment settings and data sizes.
        overwrite: discard an existing run in `run_dir`.
    """
    setup = device or resolve_device("auto")
    model.to(setup.device)
    w0, w1 = class_weights(data.labels, cfg.class_balanced)
    labels = torch.as_tensor(data.labels, dtype=torch.float32)
    aug_fn = build_augmentation(augment, data.sample_shape) if augment is not None else None
    opt = adam_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = list(model.parameters())
    scaler = make_grad_scaler(setup)  # active only for fp16 on CUDA
    optimizers: dict[str, Any] = {"classifier": opt}
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler
    n = len(data)

    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        model.train()
        idx = batch_indices(seed, step, n, cfg.batch_size)
        x = torch.from_numpy(data.inputs(idx))
        if aug_fn is not None:
            seeds = torch.randint(0, 2**31 - 1, (len(idx),), generator=generator).tolist()
            x = torch.stack([aug_fn(xi, s) for xi, s in zip(x, seeds, strict=True)])
        y = labels[idx].to(setup.device)
        x = x.to(setup.device)
        with autocast_context(setup):
            logits = model(x)
        # The loss in fp32: bf16 logits lose the small margins BCE cares about.
        weight = y * w1 + (1.0 - y) * w0
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y, weight=weight)
        optimizer_step(loss, opt, params, scaler, None)
        return {"loss": loss.detach(), "lr": cfg.lr}

    loop_cfg = LoopConfig(
        max_steps=cfg.steps,
        ckpt_every=cfg.ckpt_every or cfg.steps,
        keep_last=1,
        seed=seed,
        progress=cfg.progress,
        log_every=cfg.log_every,
    )
    if config is None:
        config = {
            "train": plain_config(cfg),
            "augment": plain_config(augment) if augment is not None else None,
            "data": {"task": data.task, "n": n, "class_counts": list(data.class_counts()),
                     "groups": data.n_groups},
        }
    result = run_loop(
        run_dir,
        loop_cfg,
        modules={"classifier": model},
        step_fn=step_fn,
        optimizers=optimizers,
        config=config,
        meta={"stage": "classifier"},
        overwrite=overwrite,
        generator_device="cpu",
        setup=setup,
    )
    model.eval()
    return TrainedClassifier(model=model, loop=result, device=setup, class_weights=(w0, w1))


@torch.no_grad()
def predict_proba(
    model: nn.Module, data: TaskData, *, batch_size: int = 64, device: DeviceSetup | None = None
) -> np.ndarray:
    """Probability of class 1 for every sample of `data`, float64 (N,).

    Args:
        model: a classifier returning one logit per sample.
        data: the samples (e.g. the real test slices).
        batch_size: samples per forward pass.
        device: from `resolve_device`; None = where the model's parameters are, fp32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        dev = next(model.parameters()).device
        device = DeviceSetup(dev, None, False, str(dev))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            idx = np.arange(start, min(start + batch_size, len(data)))
            x = torch.from_numpy(data.inputs(idx)).to(device.device)
            with autocast_context(device):
                logits = model(x)
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
