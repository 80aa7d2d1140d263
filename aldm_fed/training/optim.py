"""The Adam/AdamW optimizer every training stage uses, fused where PyTorch has the kernel.

Why not plain `torch.optim.AdamW(params)`: on CPU its default is a Python loop over the
parameters (`foreach` is CUDA-only by default), which cost 5-10 ms a step for the demo UNet, more
than our whole per-step budget over bare MONAI (issue #7). The fused kernel (CPU and CUDA since
torch 2.4) does the same update in one call; `benchmarks/steps.py` measures the result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

__all__ = ["adam_optimizer", "match_state_layout"]


def adam_optimizer(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    decoupled: bool = True,
) -> torch.optim.Optimizer:
    """AdamW (`decoupled=True`) or Adam over `params`, with the fused kernel when every parameter
    is a floating-point tensor on a device that has it.

    Args:
        params: the trained parameters.
        lr: learning rate.
        weight_decay: decoupled (AdamW) or L2 (Adam) weight decay.
        betas: Adam's (beta1, beta2).
        decoupled: AdamW when True, Adam when False (the GAN baseline, as pix2pix).
    """
    params = list(params)
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices() for p in params
    ) and len({p.device for p in params}) == 1
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's memory layout.

    Why: checkpoints store tensors contiguous, and the fused CPU Adam kernel (torch 2.13) pairs a
    parameter's elements with its state's by memory position. A channels_last_3d parameter with a
    contiguous moment restored from a checkpoint is silently updated wrong (measured: a max
    weight error of 0.16 after one step; `tests/training/test_optim.py`). Call after
    `load_state_dict`.

    Args:
        optimizer: an optimizer whose state was just loaded.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
