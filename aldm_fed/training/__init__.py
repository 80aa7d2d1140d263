"""Training: the shared resumable loop, device/precision selection, EMA; one module per stage.

Stages (`vae.py`, `backbone.py`, `controlnet.py`, `classifier.py`) hold the model math and call
`run_loop` for everything around it (resume, seeding, EMA, checkpoints, metrics, progress).
"""

from __future__ import annotations

from aldm_fed.training.device import (
    DeviceSetup,
    autocast_context,
    configure_threads,
    resolve_device,
)
from aldm_fed.training.ema import EMA
from aldm_fed.training.loop import LoopConfig, LoopResult, batch_indices, run_loop, step_seed

__all__ = [
    "EMA",
    "DeviceSetup",
    "LoopConfig",
    "LoopResult",
    "autocast_context",
    "batch_indices",
    "configure_threads",
    "resolve_device",
    "run_loop",
    "step_seed",
]
