"""Pick the device and the mixed-precision mode once, in one place.

Every training stage and the sampler ask `resolve_device()` instead of testing for CUDA themselves,
so "auto" means the same thing everywhere:

- CUDA when present: bf16 autocast if the GPU supports it, else fp16 autocast + GradScaler.
- CPU: bf16 autocast only where the CPU has native bf16 (AMX / AVX512-BF16, or ARM's bf16);
  measured on our 2-core machines it roughly halves step time at 1-3 % relative error
  (docs in /work/shared/notes/monai-generative.md). Without native support bf16 is emulated and
  slower than fp32, so "auto" stays fp32 there.

A precision chosen by "auto" is a guess about this machine, so it is allowed to fail safely: when
a training step goes non-finite under it, `run_loop` calls `fall_back_to_fp32` and this process
runs in fp32 from then on (`autocast_context` and `resolve_device` both honour it). An explicitly
asked-for precision is never changed behind the user's back; the stage stops instead.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "AutocastGain",
    "DeviceSetup",
    "autocast_context",
    "available_cpus",
    "configure_threads",
    "cpu_has_native_bf16",
    "fall_back_to_fp32",
    "fell_back_to_fp32",
    "make_grad_scaler",
    "measure_autocast_gain",
    "resolve_device",
    "training_layout",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST = ("auto", "true", "false")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags that mean bf16 matmuls run in hardware (x86: AMX or AVX512-BF16; ARM: bf16).
_NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
# Set once a step went non-finite under a precision that "auto" chose (`fall_back_to_fp32`):
# the reason, for the log. Per process: every Flower ClientApp actor and CLI run learns it alone.
_auto_fp32_reason: str | None = None


@dataclass(frozen=True)
class DeviceSetup:
    """Where and how a stage runs.

    Attributes:
        device: the torch device to put modules and batches on.
        autocast_dtype: dtype for `torch.autocast`, or None for plain fp32.
        use_grad_scaler: True only for fp16 on CUDA (bf16 has fp32's exponent range).
        description: one human-readable line for logs, e.g. "cpu, bf16 autocast (native bf16)".
        channels_last: train the 3D generative networks in `torch.channels_last_3d` memory
            format (`training_layout`).
        auto_precision: the precision was chosen by "auto" (so `fall_back_to_fp32` may override
            it), not asked for.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    description: str
    channels_last: bool = False
    auto_precision: bool = False

    @property
    def precision(self) -> str:
        """"fp32", "bf16" or "fp16": what steps run in now (never "auto"; fp32 after a fallback)."""
        if self.autocast_dtype is None or self.fell_back:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    @property
    def fell_back(self) -> bool:
        """True when "auto" chose a low precision that this process has since given up."""
        return self.auto_precision and self.autocast_dtype is not None and _auto_fp32_reason is not None


def fall_back_to_fp32(reason: str) -> bool:
    """Make every "auto" precision of this process fp32 from now on.

    Args:
        reason: one line for the log (stage, step, what went non-finite).

    Returns:
        True the first time (the caller logs it), False when the process had already fallen back.
    """
    global _auto_fp32_reason
    if _auto_fp32_reason is not None:
        return False
    _auto_fp32_reason = reason
    return True


def fell_back_to_fp32() -> str | None:
    """Why this process fell back to fp32 (`fall_back_to_fp32`), or None when it has not."""
    return _auto_fp32_reason


def _reset_fallback() -> None:
    # Tests only: forget an earlier fallback of this process.
    global _auto_fp32_reason
    _auto_fp32_reason = None


def cpu_has_native_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises hardware bf16 (Linux /proc/cpuinfo flags).

    torch 2.13's `torch.backends.cpu.get_cpu_capability()` reports only the vector ISA ("AVX512"),
    which does not say whether bf16 is native, so the kernel's flag list decides. Elsewhere
    (macOS, Windows) this returns False and "auto" stays fp32.

    Args:
        cpuinfo: file to read (a parameter so tests can pass a fixture).
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_device(spec: str = "auto", precision: str = "auto", channels_last: str = "false") -> DeviceSetup:
    """Resolve a device spec and a precision into a `DeviceSetup`.

    Args:
        spec: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        precision: "auto", "fp32", "bf16" or "fp16". An explicit value overrides "auto"'s choice.
        channels_last: "auto" (on CPU, where channels_last_3d measured 8-18 % faster per training
            step at 64^3, `benchmarks/speedups.py`; off on CUDA, not measured there), "true" or
            "false" (the default of callers that do not train the 3D generative networks).

    Raises:
        ValueError: unknown spec/precision, CUDA asked for but absent, fp16 on CPU, or bf16 on a
            GPU without bf16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    channels_last = str(channels_last).lower()
    if channels_last not in CHANNELS_LAST:
        raise ValueError(f"device.channels_last must be one of {CHANNELS_LAST}, got {channels_last!r}")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device spec {spec!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
        bf16_ok = torch.cuda.is_bf16_supported()
        auto = precision == "auto"
        if auto:
            precision = "bf16" if bf16_ok else "fp16"
            if _auto_fp32_reason is not None:
                precision = "fp32"
        if precision == "bf16" and not bf16_ok:
            raise ValueError(f"precision 'bf16' asked for, but {spec} lacks bf16; use fp16")
        name = torch.cuda.get_device_name(device)
        return DeviceSetup(
            device=device,
            autocast_dtype=_DTYPES[precision],
            use_grad_scaler=precision == "fp16",  # fp16's small range needs loss scaling
            description=f"{device} ({name}), {_describe(precision)}",
            channels_last=channels_last == "true",
            auto_precision=auto,
        )

    if precision == "fp16":
        raise ValueError(
            "precision 'fp16' is not supported on CPU (autocast would be slow and need a "
            "GradScaler); use 'bf16' (fast where the CPU has native bf16) or 'fp32'"
        )
    native = cpu_has_native_bf16()
    auto = precision == "auto"
    note = ""
    if auto:
        precision = "bf16" if native else "fp32"
        if precision == "bf16" and _auto_fp32_reason is not None:
            precision, note = "fp32", " (auto fell back from bf16 after a non-finite step)"
    if precision == "bf16":
        note = " (native bf16)" if native else " (emulated bf16: likely slower than fp32)"
    return DeviceSetup(
        device=device,
        autocast_dtype=_DTYPES[precision],
        use_grad_scaler=False,
        description=f"cpu, {_describe(precision)}{note}, {torch.get_num_threads()} threads",
        channels_last=channels_last in ("auto", "true"),
        auto_precision=auto,
    )


def _describe(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


def autocast_context(setup: DeviceSetup | None) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for `setup`: `torch.autocast(...)` or a no-op for fp32.

    Args:
        setup: from `resolve_device`; None = plain fp32 (a no-op).
    """
    if setup is None or setup.autocast_dtype is None or setup.fell_back:
        return contextlib.nullcontext()
    return torch.autocast(device_type=setup.device.type, dtype=setup.autocast_dtype)


def training_layout(module: nn.Module, setup: DeviceSetup) -> nn.Module:
    """Move `module` to the setup's device, its 5D weights in channels_last_3d when the setup says so.

    Convolutions then run in that layout (oneDNN follows the weights), which measured faster on CPU
    for the VAE and the diffusion UNet; checkpoints and shared weights are made contiguous when
    written (`checkpoints.save_checkpoint`, `federation.records`), so nothing outside training sees it.

    Args:
        module: a network about to be trained.
        setup: from `resolve_device`.
    """
    fmt = torch.channels_last_3d if setup.channels_last else torch.preserve_format
    return module.to(setup.device, memory_format=fmt)


def make_grad_scaler(setup: DeviceSetup) -> torch.amp.GradScaler:
    """A GradScaler that is active only when `setup` needs one (fp16 on CUDA), else a no-op.

    Args:
        setup: from `resolve_device`.
    """
    return torch.amp.GradScaler(setup.device.type, enabled=setup.use_grad_scaler)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    Args:
        n: threads to use; None = the CPUs this process may run on (affinity / cgroup aware where
            the OS says so), which on our shared 2-core machines is 2.
    """
    if n is None:
        n = available_cpus()
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class AutocastGain:
    """Result of `measure_autocast_gain` (best-of-N seconds per call).

    Attributes:
        fp32_s: seconds per call in fp32.
        bf16_s: seconds per call under bf16 autocast.
        speedup: fp32_s / bf16_s.
        rel_error: ||y_bf16 - y_fp32|| / ||y_fp32|| on the first output tensor.
    """

    fp32_s: float
    bf16_s: float
    speedup: float
    rel_error: float


def measure_autocast_gain(
    module: nn.Module,
    example: torch.Tensor | tuple[Any, ...],
    steps: int = 3,
    *,
    device: str | torch.device = "cpu",
    backward: bool = False,
) -> AutocastGain:
    """Time `module(example)` in fp32 and under bf16 autocast; for benchmarks, never at startup.

    Timing noise on shared machines reaches 2.5x, so each mode takes the best of `steps` runs after
    one warm-up, and the two modes alternate so drifting load hits both alike.

    Args:
        module: the network; it is put in eval mode for the measurement (dropout off) and its
            mode is restored afterwards.
        example: one input tensor, or a tuple of positional arguments.
        steps: timed runs per mode (best is kept).
        device: device type to autocast on ("cpu" or "cuda"); module and example must be there.
        backward: also time a backward pass of the first output's sum (training cost).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device_type = torch.device(device).type
    args = example if isinstance(example, tuple) else (example,)
    was_training = module.training
    module.eval()

    def run(dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        ctx = torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()
        grad = torch.enable_grad() if backward else torch.no_grad()
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with grad, ctx:
            out = _first_tensor(module(*args))
        if backward:
            out.float().sum().backward()
            module.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.detach().float()

    try:
        ref = run(None)[1]  # warm-ups (allocator, oneDNN kernel selection)
        low = run(torch.bfloat16)[1]
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(steps):
            times["fp32"].append(run(None)[0])
            times["bf16"].append(run(torch.bfloat16)[0])
    finally:
        module.train(was_training)
    fp32_s, bf16_s = min(times["fp32"]), min(times["bf16"])
    norm = torch.linalg.vector_norm
    rel = (norm(low - ref) / norm(ref).clamp_min(1e-12)).item()
    return AutocastGain(fp32_s=fp32_s, bf16_s=bf16_s, speedup=fp32_s / bf16_s, rel_error=rel)


def _first_tensor(out: Any) -> torch.Tensor:
    # MONAI networks return tuples (AutoencoderKL: recon, mu, sigma); compare the first tensor.
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"module output has no tensor to compare: {type(out).__name__}")
