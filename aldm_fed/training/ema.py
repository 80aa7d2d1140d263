"""Exponential moving average of a module's weights (the copy that diffusion models sample with).

A small class rather than `torch.optim.swa_utils.AveragedModel`: its state dict has exactly the
keys of the wrapped module (AveragedModel prefixes "module." and adds `n_averaged`), so the
checkpoint group "ema.unet" loads straight into a fresh UNet for sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """`ema = decay * ema + (1 - decay) * param` after every optimizer step.

    Floating-point parameters are averaged; buffers (e.g. BatchNorm running stats, which are
    already averages) and integer tensors are copied. The average starts from the module's
    weights at construction, with a constant decay (no warm-up).

    Args:
        module: the trained module; a frozen deep copy holds the average.
        decay: in [0, 1); 0.999 ~ an average over the last ~1000 steps.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the current weights of `module` (same architecture) into the average.

        Args:
            module: the module being trained.
        """
        for (name, avg), (_, cur) in zip(
            self.module.named_parameters(), module.named_parameters(), strict=True
        ):
            if avg.shape != cur.shape:
                raise ValueError(f"EMA parameter {name!r}: shape {[*avg.shape]} != {[*cur.shape]}")
            if avg.is_floating_point():
                # lerp: avg + (1 - decay) * (cur - avg), one fused op per tensor
                avg.lerp_(cur.detach().to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(cur)
        for avg, cur in zip(self.module.buffers(), module.buffers(), strict=True):
            avg.copy_(cur)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the wrapped module's keys."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load averaged weights (strict: keys must match the module's).

        Args:
            state: e.g. `ckpt.tensors["ema.unet"]`.
        """
        self.module.load_state_dict(state)
