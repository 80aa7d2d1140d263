"""The shared training loop: exact resume, run-dir identity, checkpoints, metrics, EMA, seeding."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from aldm_fed.checkpoints import WEIGHTS_FILE, load_checkpoint
from aldm_fed.training.ema import EMA
from aldm_fed.training.loop import (
    LATEST_FILE,
    METRICS_FILE,
    LoopConfig,
    batch_indices,
    find_latest_checkpoint,
    run_loop,
    step_seed,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
N_ITEMS, BATCH = 12, 4


@dataclass
class Setup:
    model: nn.Module
    opt: torch.optim.Optimizer
    step_fn: Callable[[int, torch.Generator], dict[str, float]]
    calls: list[int]


def make_setup(init_seed: int = 0, fail_at: int | None = None, sigint_at: int | None = None) -> Setup:
    """A tiny regression whose step uses every source of randomness a stage might use."""
    torch.manual_seed(init_seed)  # a resumed run starts from other weights: the checkpoint must win
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.linspace(-1, 1, N_ITEMS * 3).reshape(N_ITEMS, 3)
    target = data.sum(dim=1, keepdim=True)
    calls: list[int] = []

    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        if step == fail_at:
            raise RuntimeError("simulated crash")
        calls.append(step)
        idx = batch_indices(0, step, N_ITEMS, BATCH)
        x = data[idx] + 0.05 * torch.randn(BATCH, 3, generator=generator)  # per-step generator
        loss = (model(x) - target[idx]).pow(2).mean()  # dropout: global torch RNG
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == sigint_at:
            signal.raise_signal(signal.SIGINT)
        return {"loss": loss.item(), "np": float(np.random.random())}  # global numpy RNG

    return Setup(model, opt, step_fn, calls)


def loop_cfg(max_steps: int = 10, **kw: object) -> LoopConfig:
    return LoopConfig(**{"max_steps": max_steps, "ckpt_every": 3, "keep_last": 2, "ema_decay": 0.9, "progress": False, **kw})  # type: ignore[arg-type]


def config(max_steps: int = 10, lr: float = 1e-2) -> dict[str, object]:
    return {"train": {"max_steps": max_steps, "lr": lr}, "model": {"hidden": 8}}


def run(run_dir: Path, s: Setup, max_steps: int = 10, **kw: object):  # noqa: ANN201
    return run_loop(
        run_dir,
        loop_cfg(max_steps),
        modules={"net": s.model},
        optimizers={"net": s.opt},
        step_fn=s.step_fn,
        config=config(max_steps, **kw),  # type: ignore[arg-type]
        meta={"scale_factor": 0.5},
        ema_modules=["net"],
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Setup, object]:
    """The uninterrupted 10-step run."""
    run_dir = tmp_path_factory.mktemp("ref")
    s = make_setup()
    return run_dir, s, run(run_dir, s)


def assert_same_run(ref: tuple[Path, Setup, object], run_dir: Path, s: Setup, result: object) -> None:
    ref_dir, ref_setup, ref_result = ref
    for p, q in zip(ref_setup.model.parameters(), s.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(ref_result.ema["net"].parameters(), result.ema["net"].parameters(), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(p, q)
    a, b = ref_setup.opt.state_dict()["state"], s.opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert (ref_dir / METRICS_FILE).read_bytes() == (run_dir / METRICS_FILE).read_bytes()
    assert result.metrics == ref_result.metrics and result.step == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_killed_and_resumed_run_equals_uninterrupted(reference, tmp_path: Path, how: str) -> None:  # noqa: ANN001
    if how == "stop":  # a run asked for 6 steps, later extended to 10 (max_steps may change)
        first = run(tmp_path, make_setup(), max_steps=6)
        assert first.step == 6
    else:  # killed during step 7: checkpoint at 6, metrics already logged for step index 6
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, make_setup(fail_at=7))
        assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 7

    s = make_setup(init_seed=123)
    result = run(tmp_path, s)
    assert result.resumed_from == 6 and s.calls == [6, 7, 8, 9]
    assert_same_run(reference, tmp_path, s, result)


def test_ctrl_c_finishes_step_checkpoints_and_reraises(reference, tmp_path: Path) -> None:  # noqa: ANN001
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="after step 5"):
        run(tmp_path, make_setup(sigint_at=4))
    assert signal.getsignal(signal.SIGINT) is handler
    assert (tmp_path / LATEST_FILE).read_text().strip() == "checkpoints/step_00000005"

    s = make_setup(init_seed=7)
    result = run(tmp_path, s)
    assert result.resumed_from == 5
    assert_same_run(reference, tmp_path, s, result)


def test_keyboard_interrupt_inside_a_step_writes_no_checkpoint(tmp_path: Path) -> None:
    s = make_setup()
    inner = s.step_fn

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        if step == 4:
            raise KeyboardInterrupt  # a half-done step: weights/optimizer may disagree
        return inner(step, gen)

    with pytest.raises(KeyboardInterrupt):
        run_loop(tmp_path, loop_cfg(), modules={"net": s.model}, optimizers={"net": s.opt}, step_fn=step_fn, ema_modules=["net"])
    assert (tmp_path / LATEST_FILE).read_text().strip() == "checkpoints/step_00000003"


def test_checkpoints_pointer_pruning_and_contents(reference) -> None:  # noqa: ANN001
    run_dir, s, result = reference
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000009", "step_00000010"]
    assert (run_dir / LATEST_FILE).read_text().strip() == "checkpoints/step_00000010"
    assert result.checkpoint == run_dir / "checkpoints" / "step_00000010"
    ckpt = load_checkpoint(result.checkpoint)
    assert set(ckpt.groups) == {"net", "ema.net", "optim.net", "rng"}
    assert ckpt.step == 10 and ckpt.scale_factor == 0.5 and ckpt.config == config()
    assert ckpt.meta["metrics"] == result.metrics
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10)) and all("loss" in r for r in lines)


def test_completed_run_is_not_rerun(reference, tmp_path: Path) -> None:  # noqa: ANN001
    run_dir = tmp_path / "copy"
    shutil.copytree(reference[0], run_dir)
    s = make_setup(init_seed=5)
    result = run(run_dir, s)
    assert s.calls == [] and result.resumed_from == 10 and result.metrics == reference[2].metrics
    for p, q in zip(reference[1].model.parameters(), s.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="past max_steps"):
        run(run_dir, make_setup(), max_steps=8)


def test_damaged_latest_checkpoint_falls_back(reference, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    run_dir = tmp_path / "copy"
    shutil.copytree(reference[0], run_dir)
    weights = run_dir / "checkpoints" / "step_00000010" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        ckpt = find_latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.step == 9 and "truncated" in caplog.text
    s = make_setup()
    assert run(run_dir, s).resumed_from == 9 and s.calls == [9]
    assert (run_dir / METRICS_FILE).read_bytes() == (reference[0] / METRICS_FILE).read_bytes()


def test_different_config_is_refused_unless_overwrite(tmp_path: Path) -> None:
    run(tmp_path, make_setup(), max_steps=3)
    with pytest.raises(ValueError, match=r"different config \(differs at: config\.train\.lr\)"):
        run(tmp_path, make_setup(), max_steps=3, lr=2e-2)
    s = make_setup()
    result = run_loop(
        tmp_path, loop_cfg(3), modules={"net": s.model}, optimizers={"net": s.opt}, step_fn=s.step_fn,
        config=config(3, lr=2e-2), ema_modules=["net"], overwrite=True,
    )
    assert result.resumed_from == 0 and s.calls == [0, 1, 2]
    with pytest.raises(ValueError, match="different config"):  # the seed is part of the identity too
        run_loop(tmp_path, loop_cfg(3, seed=1), modules={"net": s.model}, optimizers={"net": s.opt},
                 step_fn=s.step_fn, config=config(3, lr=2e-2), ema_modules=["net"])


def test_ema_follows_known_sequence(tmp_path: Path) -> None:
    ema = EMA(nn.Linear(1, 1, bias=False), decay=0.5)
    nn.init.zeros_(ema.module.weight)
    live = nn.Linear(1, 1, bias=False)
    for value, expected in [(1.0, 0.5), (2.0, 1.25), (3.0, 2.125)]:
        nn.init.constant_(live.weight, value)
        ema.update(live)
        assert ema.module.weight.item() == expected
    assert not ema.module.weight.requires_grad

    # Through the loop: the weight is set to step + 1 at each step, decay 0.5, start 0.
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        with torch.no_grad():
            model.weight.fill_(step + 1.0)
        return {"w": step + 1.0}

    cfg = LoopConfig(max_steps=3, ckpt_every=2, ema_decay=0.5, progress=False)
    result = run_loop(tmp_path, cfg, modules={"m": model}, step_fn=step_fn, ema_modules=["m"])
    assert result.ema["m"].weight.item() == 2.125
    assert load_checkpoint(result.checkpoint).tensors["ema.m"]["weight"].item() == 2.125


def test_ema_averages_every_parameter_copies_buffers_and_checks_shapes() -> None:
    """The fused update equals the per-tensor formula on a net with BatchNorm buffers, also after
    the live weights change in place (the tensor pairs are found once and kept)."""
    torch.manual_seed(0)
    live = nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.Flatten(), nn.LazyLinear(1))
    live(torch.randn(2, 2, 5, 5, 5))  # materialise the lazy layer, move the running stats
    ema = EMA(live, decay=0.9)
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        live.train()(torch.randn(2, 2, 5, 5, 5))  # new running stats (buffers)
        ema.update(live)
        params = dict(live.named_parameters())
        for k, v in live.state_dict().items():
            expected[k] = expected[k] + 0.1 * (v - expected[k]) if k in params else v.clone()
    got = ema.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-6), k
    assert got["1.num_batches_tracked"].item() == live[1].num_batches_tracked.item() == 4
    with pytest.raises(ValueError, match="shape"):
        EMA(nn.Linear(2, 1), 0.9).update(nn.Linear(3, 1))


def test_batch_indices_are_seeded_epochs() -> None:
    n, bs = 10, 4
    flat = [i for step in range(5) for i in batch_indices(3, step, n, bs)]  # 20 positions = 2 epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch has its own order
    assert batch_indices(3, 2, n, bs) == batch_indices(3, 2, n, bs) != batch_indices(4, 2, n, bs)
    assert sorted(batch_indices(0, 0, 3, 7)) == [0, 0, 0, 1, 1, 2, 2]  # batch larger than the data
    assert step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
    with pytest.raises(ValueError):
        batch_indices(0, 0, 0, 1)


def test_loop_config_from_base_yaml_and_validation() -> None:
    train = OmegaConf.load(CONFIGS / "train" / "base.yaml")
    cfg = LoopConfig.from_mapping(train, seed=5)
    assert (cfg.max_steps, cfg.ckpt_every, cfg.keep_last, cfg.seed, cfg.ema_decay) == (1000, 100, 2, 5, None)
    assert {"lr", "batch_size"} <= set(train)
    with pytest.raises(ValueError, match="ckpt_every"):
        LoopConfig(max_steps=1, ckpt_every=0)
    with pytest.raises(ValueError, match="ema_decay"):
        LoopConfig(max_steps=1, ckpt_every=1, ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_modules"):
        run_loop(Path("/nonexistent"), LoopConfig(1, 1, ema_decay=0.9), modules={"m": nn.Linear(1, 1)}, step_fn=lambda s, g: {})
    with pytest.raises(ValueError, match="bad module"):
        run_loop(Path("/nonexistent"), LoopConfig(1, 1), modules={"rng": nn.Linear(1, 1)}, step_fn=lambda s, g: {})


def test_train_and_device_groups_compose(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    for group in ("train", "device"):
        shutil.copytree(CONFIGS / group, tmp_path / group)
    (tmp_path / "config.yaml").write_text("defaults:\n  - train: base\n  - device: auto\n  - _self_\nseed: 0\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        for choice, spec in [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda")]:
            cfg = compose(config_name="config", overrides=[f"device={choice}"])
            assert cfg.device.spec == spec and set(cfg.device) == {"spec", "precision", "num_threads", "channels_last"}
    LoopConfig.from_mapping(cfg.train, seed=cfg.seed)


def test_step_generator_and_global_rng_are_distinct_streams(tmp_path: Path) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        seen.append((torch.rand(4, generator=gen), torch.rand(4)))
        return {}

    run_loop(tmp_path, LoopConfig(max_steps=2, ckpt_every=5, progress=False), modules={}, step_fn=step_fn)
    (g0, r0), (g1, _) = seen
    assert not torch.equal(g0, r0) and not torch.equal(g0, g1)


def test_metrics_may_be_tensors_and_lines_follow_log_every(tmp_path: Path) -> None:
    w = nn.Parameter(torch.ones(1))

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        return {"loss": (w * step).sum()}  # type: ignore[dict-item]  # a tensor needing grad

    cfg = LoopConfig(max_steps=5, ckpt_every=5, log_every=2, progress=True)
    result = run_loop(tmp_path, cfg, modules={}, step_fn=step_fn)
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 3.0}, {"step": 4, "loss": 4.0}]
    assert result.metrics == {"loss": 4.0}
