"""Stop a training step before anything non-finite is applied, saved or sent.

`optimizer_step` checks the loss before backward and the gradients before the optimizer's step
(`check_loss`, `check_gradients`) and raises `NonFiniteError`; `run_loop` catches it, names the
stage, step and precision, and either stops the stage with that line or, when the precision was
chosen by `device.precision=auto`, redoes the step in fp32 (`device.fall_back_to_fp32`). Why: a
low-precision step that goes non-finite poisons the weights of every later step, the
checkpoints and, in a federation, the global model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["NonFiniteError", "after_an_update", "check_gradients", "check_loss", "nonfinite_parameters"]


class NonFiniteError(FloatingPointError):
    """A loss or gradient of a training step is NaN or infinite; nothing was applied.

    Attributes:
        quantity: what went non-finite ("loss", "gradient norm", "reported loss").
        value: its value (nan, inf or -inf).
        applied: the optimizer may already have stepped (found after the step, not before it).
    """

    def __init__(self, quantity: str, value: float, message: str | None = None, *, applied: bool = False) -> None:
        self.quantity = quantity
        self.value = value
        self.applied = applied
        super().__init__(message or f"the {quantity} is {value}")


def check_loss(loss: torch.Tensor) -> None:
    """Raise `NonFiniteError` when the scalar `loss` is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError("loss", value)


def check_gradients(params: Iterable[nn.Parameter]) -> float:
    """The global L2 norm of the gradients; `NonFiniteError` when it is not finite.

    Args:
        params: parameters whose `.grad` to check (those without one are skipped).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
    if not math.isfinite(norm):
        raise NonFiniteError("gradient norm", norm)
    return norm


def nonfinite_parameters(modules: Mapping[str, nn.Module], limit: int = 3) -> str:
    """Where the damage is, for the error line: parameters whose gradient or value is non-finite.

    Args:
        modules: name -> module, as given to `run_loop`.
        limit: how many names to list.

    Returns:
        e.g. "non-finite gradients in 3 of 57 tensors, first unet.out.2.conv.weight", or "" when
        every gradient and weight is finite.
    """
    bad_grad: list[str] = []
    bad_value: list[str] = []
    total = 0
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            total += 1
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad_grad.append(f"{prefix}.{name}")
            if not bool(torch.isfinite(p.detach()).all()):
                bad_value.append(f"{prefix}.{name}")
    parts = []
    for label, names in (("gradients", bad_grad), ("weights", bad_value)):
        if names:
            first = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            parts.append(f"non-finite {label} in {len(names)} of {total} tensors, first {first}")
    return "; ".join(parts)


@contextmanager
def after_an_update() -> Iterator[None]:
    """Mark non-finite errors raised inside as coming after another optimizer already stepped.

    Why: a stage with two optimizers (VAE or GAN generator, then its discriminator) cannot redo
    the step in fp32 once the first one has applied its update; the stage stops instead.
    """
    try:
        yield
    except NonFiniteError as exc:
        exc.applied = True
        raise
