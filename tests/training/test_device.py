"""Device and precision selection (CPU here; CUDA paths are covered by their error messages)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from aldm_fed.training import device as device_mod
from aldm_fed.training.device import (
    autocast_context,
    configure_threads,
    cpu_has_native_bf16,
    make_grad_scaler,
    measure_autocast_gain,
    resolve_device,
)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallbacks")


@needs_no_cuda
def test_auto_is_cpu_with_bf16_only_when_native(monkeypatch: pytest.MonkeyPatch) -> None:
    setup = resolve_device()
    assert setup.device == torch.device("cpu") and not setup.use_grad_scaler
    assert setup.autocast_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert resolve_device("auto").precision == "fp32"
    emulated = resolve_device("cpu", "bf16")  # explicit choice is honoured, with a warning note
    assert emulated.autocast_dtype == torch.bfloat16 and "emulated" in emulated.description
    assert resolve_device("cpu", "fp32").autocast_dtype is None


def test_fp16_on_cpu_and_bad_values_raise() -> None:
    with pytest.raises(ValueError, match="fp16.*not supported on CPU"):
        resolve_device("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_device("cpu", "int8")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("meta")


@needs_no_cuda
def test_cuda_without_gpu_raises() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_cpuinfo_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\n")  # aarch64 spelling
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_autocast_context_and_scaler() -> None:
    x = torch.randn(2, 3)
    w = torch.randn(3, 3)
    with autocast_context(resolve_device("cpu", "fp32")):
        assert (x @ w).dtype == torch.float32
    bf16 = resolve_device("cpu", "bf16")
    with autocast_context(bf16):
        assert (x @ w).dtype == torch.bfloat16
    assert not make_grad_scaler(bf16).is_enabled()


def test_configure_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_threads(None) >= 1
        with pytest.raises(ValueError):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_measure_autocast_gain_on_a_tiny_net() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4)).train()
    gain = measure_autocast_gain(net, torch.randn(8, 16), steps=1, backward=True)
    assert gain.fp32_s > 0 and gain.bf16_s > 0 and gain.speedup > 0
    assert 0 < gain.rel_error < 0.05  # bf16 has ~3 significant digits
    assert net.training  # mode restored
