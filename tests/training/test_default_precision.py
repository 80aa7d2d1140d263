"""The precision users get by default (`device=auto`), and what a non-finite step does.

`device=auto` picks bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX) and fp32 elsewhere,
so a suite that pins `device=cpu` never runs what a user with such a CPU gets (issue: the tiny
simulation diverged there). Here:
- every generative training stage (VAE, scale, backbone, ControlNet, the GAN baseline) and the
  sampler run with the default device, once as this machine resolves
  it and once as a native-bf16 CPU resolves it (`cpu_has_native_bf16` patched: this machine then
  emulates bf16, so the arithmetic is bf16's, only slower); the weights stay finite;
- a step that goes non-finite under bf16 (a broken kernel, simulated by a forward hook) stops the
  stage with one line naming stage, step, precision and the override, before anything is saved;
  under `precision=auto` the same step is redone in fp32 and the stage finishes.
The classifiers and the faithfulness segmenter run on the default device in the tiny simulation
(tests/federation/test_simulation.py).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.cli import main as cli_main
from aldm_fed.config import compose
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.diffusion.pipeline import generate
from aldm_fed.training import device as device_mod
from aldm_fed.training.artifacts import RunLayout, load_generative_models
from aldm_fed.training.common import optimizer_step
from aldm_fed.training.device import autocast_context, make_grad_scaler, resolve_device
from aldm_fed.training.loop import LATEST_FILE, LoopConfig, run_loop
from aldm_fed.training.numerics import NonFiniteError
from aldm_fed.training.stages import run_stage

STAGES = ("vae", "scale", "backbone", "controlnet", "gan")
FAST = [
    "train.vae.max_steps=3", "train.vae.ckpt_every=3", "train.vae.eval.max_cases=1",
    "train.backbone.max_steps=3", "train.backbone.ckpt_every=3",
    "train.controlnet.max_steps=3", "train.controlnet.ckpt_every=3",
    "train.gan.max_steps=2", "train.gan.ckpt_every=2",
]


@pytest.fixture(autouse=True)
def _fresh_fallback() -> Iterator[None]:
    # The fp32 fallback is per process; no test may inherit another's.
    device_mod._reset_fallback()
    yield
    device_mod._reset_fallback()


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `device=auto` resolve as on a CPU with native bf16 (AVX512-BF16 / AMX)."""
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda *a, **k: True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    cfg = compose(["experiment=tiny"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    return root


def default_overrides(root: Path, runs: Path, *extra: str) -> list[str]:
    # No device override: what `aldm-fed ...` gives a user.
    return ["experiment=tiny", "site=C", f"paths.cohort={root / 'cohort'}", f"paths.cache={root / 'cache'}",
            f"paths.runs={runs}", *FAST, *extra]


def default_cfg(root: Path, runs: Path, *extra: str) -> Any:
    return compose(default_overrides(root, runs, *extra))


def all_finite(ckpt_dir: Path) -> bool:
    ckpt = load_checkpoint(ckpt_dir)
    return all(bool(torch.isfinite(t).all()) for group in ckpt.tensors.values() for t in group.values()
               if t.is_floating_point())


def run_every_stage_and_sample(cfg: Any) -> None:
    layout = RunLayout.from_cfg(cfg)
    for stage in STAGES:
        result = run_stage(cfg, stage, progress=False)
        assert result.checkpoint is not None and all_finite(Path(result.checkpoint)), stage
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    models = load_generative_models(cfg, "C", device=setup.device)
    labels = torch.zeros((1, 32, 32, 32), dtype=torch.int64)
    labels[:, 12:20, 12:20, 12:20] = 2
    with autocast_context(setup):
        images = generate(models, labels, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape[:2] == (1, 4) and bool(torch.isfinite(images).all())
    assert layout.final("controlnet", "C").is_dir()


@pytest.mark.slow
def test_every_stage_on_this_machines_default_device(cohort: Path, tmp_path: Path) -> None:
    cfg = default_cfg(cohort, tmp_path / "runs")
    assert cfg.device.spec == "auto" and cfg.device.precision == "auto"
    run_every_stage_and_sample(cfg)


@pytest.mark.slow
def test_every_stage_on_a_native_bf16_cpus_default_device(cohort: Path, tmp_path: Path, native_bf16: None) -> None:
    cfg = default_cfg(cohort, tmp_path / "runs")
    setup = resolve_device("auto", "auto")
    assert setup.precision == "bf16" and setup.auto_precision
    run_every_stage_and_sample(cfg)


# --------------------------------------------------------------------------- the guard itself


def test_optimizer_step_refuses_a_nonfinite_loss_or_gradient_before_stepping() -> None:
    net = nn.Linear(3, 1)
    before = net.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = make_grad_scaler(resolve_device("cpu", "fp32"))
    x = torch.ones(2, 3)
    with pytest.raises(NonFiniteError, match="the loss is nan"):
        optimizer_step(net(x).sum() * float("nan"), opt, list(net.parameters()), scaler, None)
    # A finite loss whose gradient is not (a backward kernel gone wrong): caught with and without
    # clipping.
    hook = net.weight.register_hook(lambda g: g * float("inf"))
    for clip in (None, 1.0):
        with pytest.raises(NonFiniteError, match="gradient norm is inf"):
            optimizer_step(net(x).sum(), opt, list(net.parameters()), scaler, clip)
    hook.remove()
    assert torch.equal(net.weight.detach(), before)
    # A healthy step still steps.
    optimizer_step(net(x).sum(), opt, list(net.parameters()), scaler, None)
    assert not torch.equal(net.weight.detach(), before)


def _toy_loop(run_dir: Path, setup: Any, broken_under_autocast: bool = True) -> Any:
    """Four steps of a linear model whose forward is NaN under autocast from step 1 (a stand-in
    for a low-precision kernel that breaks)."""
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = make_grad_scaler(setup)
    seen: list[tuple[int, bool]] = []

    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        x = torch.randn(8, 4, generator=generator)
        with autocast_context(setup):
            out = net(x)
            low = torch.is_autocast_enabled("cpu")
        seen.append((step, low))
        if low and step >= 1 and broken_under_autocast:
            out = out * float("nan")
        loss = (out.float() ** 2).mean()
        optimizer_step(loss, opt, list(net.parameters()), scaler, None)
        return {"loss": float(loss.detach())}

    cfg = LoopConfig(max_steps=4, ckpt_every=1, seed=0, progress=False)
    result = run_loop(run_dir, cfg, modules={"toy": net}, step_fn=step_fn, optimizers={"opt": opt},
                      meta={"stage": "toy"}, setup=setup)
    return result, seen, net


def test_explicit_bf16_stops_the_stage_with_one_clear_line(tmp_path: Path) -> None:
    setup = resolve_device("cpu", "bf16")
    with pytest.raises(NonFiniteError) as info:
        _toy_loop(tmp_path / "run", setup)
    line = str(info.value)
    assert "\n" not in line
    for part in ("stage toy", "step 1", "the loss is nan", "bf16 autocast", "device.precision=fp32",
                 "nothing from this step was saved"):
        assert part in line, (part, line)
    # Only step 0's checkpoint exists: nothing non-finite was saved.
    assert (tmp_path / "run" / LATEST_FILE).read_text().strip().endswith("step_00000001")
    assert all_finite(tmp_path / "run" / "checkpoints" / "step_00000001")
    assert device_mod.fell_back_to_fp32() is None  # an explicit precision never falls back


def test_auto_bf16_redoes_the_step_in_fp32_and_finishes(
    tmp_path: Path, native_bf16: None, caplog: pytest.LogCaptureFixture
) -> None:
    setup = resolve_device("cpu", "auto")
    assert setup.precision == "bf16"
    with caplog.at_level(logging.WARNING, logger="aldm_fed.training.loop"):
        result, seen, net = _toy_loop(tmp_path / "run", setup)
    assert result.step == 4 and math.isfinite(result.metrics["loss"])
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    # step 0 in bf16; step 1 tried in bf16, then redone in fp32; the rest in fp32.
    assert seen == [(0, True), (1, True), (1, False), (2, False), (3, False)]
    warning = [r.getMessage() for r in caplog.records if "falls back to fp32" in r.getMessage()]
    assert len(warning) == 1 and "stage toy" in warning[0] and "step 1" in warning[0]
    # The rest of the process resolves "auto" to fp32 too, and says why.
    again = resolve_device("cpu", "auto")
    assert again.precision == "fp32" and "fell back" in again.description
    assert resolve_device("cpu", "bf16").precision == "bf16"  # asked for explicitly: honoured


def test_a_step_that_fails_in_fp32_too_stops(tmp_path: Path) -> None:
    setup = resolve_device("cpu", "fp32")

    def always_nan(step: int, generator: torch.Generator) -> dict[str, float]:
        raise NonFiniteError("loss", float("nan"))

    with pytest.raises(NonFiniteError, match=r"stage toy.*step 0.*under fp32.*lower train.<stage>.lr"):
        run_loop(tmp_path / "run", LoopConfig(max_steps=2, ckpt_every=1, seed=0, progress=False),
                 modules={"toy": nn.Linear(2, 1)}, step_fn=always_nan, meta={"stage": "toy"}, setup=setup)


@pytest.fixture(scope="module")
def source_runs(cohort: Path) -> Path:
    """The VAE and scale stages, once, in fp32 (device settings do not change a run's identity)."""
    runs = cohort / "source-runs"
    cfg = default_cfg(cohort, runs, "device.precision=fp32")
    for stage in ("vae", "scale"):
        run_stage(cfg, stage, progress=False)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_a_real_backbone_stage_whose_bf16_forward_breaks(
    cohort: Path, source_runs: Path, tmp_path: Path, native_bf16: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], precision: str,
) -> None:
    """The tiny backbone stage with its UNet's output NaN under autocast (a broken bf16 kernel)."""
    from monai.networks.nets import DiffusionModelUNet

    real_forward = DiffusionModelUNet.forward

    def broken(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_forward(self, *args, **kwargs)
        return out * float("nan") if torch.is_autocast_enabled("cpu") else out

    shutil.copytree(source_runs, tmp_path / "runs")
    overrides = default_overrides(cohort, tmp_path / "runs", f"device.precision={precision}")
    cfg = compose(overrides)
    monkeypatch.setattr(DiffusionModelUNet, "forward", broken)
    stage_dir = RunLayout.from_cfg(cfg).stage_dir("backbone")
    if precision == "bf16":  # as a user meets it: `aldm-fed train backbone ...`, one line, exit 1
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["train", "backbone", "--no-progress", *overrides])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: stage backbone ("), err
        assert "step 0: the loss is nan under bf16 autocast" in err and "device.precision=fp32" in err, err
        assert not (stage_dir / LATEST_FILE).exists()
    else:
        result = run_stage(cfg, "backbone", progress=False)
        assert result.step == 3 and all_finite(Path(result.checkpoint))
        assert "backbone" in (device_mod.fell_back_to_fp32() or "")
