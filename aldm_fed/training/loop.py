"""The shared, resumable training loop. It holds no model math.

Each stage (VAE, backbone, ControlNet, classifier) writes a `step_fn(step, generator)` that draws
its batch, runs forward + backward + optimizer step and returns its metrics; `run_loop` does all
the rest, the same way for every stage:

1. Open `run_dir`: `run.json` records a hash of the config; a run dir holding a different config
   is refused unless `overwrite=True` (which discards it and starts at step 0).
2. Resume from the newest complete checkpoint there (modules, EMA, optimizers, RNG states) and
   cut `metrics.jsonl` back to that step, so the log always matches the state.
3. Run steps `start .. max_steps - 1`, each seeded from `(seed, step)` alone.
4. After each step: EMA update, a metrics line, the progress bar.
5. Every `ckpt_every` steps and at the end: a checkpoint, the `latest` pointer, prune to
   `keep_last`.
6. Ctrl-C finishes the current step, writes a checkpoint, then raises KeyboardInterrupt.
7. A step whose loss or gradients go non-finite (`numerics.NonFiniteError`, raised before the
   optimizer steps) stops the stage with one line naming stage, step and precision, so nothing
   non-finite is checkpointed or sent; when "auto" chose that precision, the step is redone in
   fp32 instead (`device.fall_back_to_fp32`).

Run directory:

    run_dir/
      run.json                    config hash + the hashed content (written when the run starts)
      metrics.jsonl               {"step": 0, "loss": ...} per logged step
      latest                      "checkpoints/step_00000100": the newest complete checkpoint
      checkpoints/step_00000100/  aldm_fed.checkpoints format; groups: each module by name,
                                  "ema.<name>", "optim.<name>", "rng"

Step numbering: `step_fn` gets the 0-based index of the step it takes, and metrics lines carry that
index; a checkpoint's `step` counts completed steps, i.e. it is the index of the next step to run.

Why a killed and resumed run equals an uninterrupted one bit for bit on CPU: nothing random is
carried from step to step. Step `i` gets `torch.Generator().manual_seed(step_seed(seed, i))`, the
global torch RNG is seeded from (seed, i) too, with another derived seed (dropout cannot take a
generator), and stages draw their batch with `batch_indices(seed, i, ...)`. The global numpy /
Python RNGs are checkpointed and restored in case a stage uses them (a fresh run seeds them
from `seed`). On CUDA, results also depend on the kernels' own determinism
(`torch.use_deterministic_algorithms`), which the loop leaves alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aldm_fed.checkpoints import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    plain_config,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
)
from aldm_fed.io import atomic_write_json, atomic_write_text
from aldm_fed.training.device import DeviceSetup, fall_back_to_fp32
from aldm_fed.training.ema import EMA
from aldm_fed.training.numerics import NonFiniteError, nonfinite_parameters
from aldm_fed.training.optim import match_state_layout

__all__ = [
    "CKPT_DIR",
    "LATEST_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "RUN_FILE",
    "LoopConfig",
    "LoopResult",
    "Stateful",
    "StepFn",
    "batch_indices",
    "config_hash",
    "find_latest_checkpoint",
    "run_loop",
    "stable_seed",
    "step_seed",
]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LATEST_FILE = "latest"
CKPT_DIR = "checkpoints"
# Config keys (dotted, from the composed root config) that may change between a run and its
# resume without making it a different run: how long to train, how often to save/log, where to run.
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.max_steps",
    "train.ckpt_every",
    "train.keep_last",
    "train.log_every",
    "train.progress",
    "device",
)
_CKPT_RE = re.compile(r"^step_(\d{8})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RESERVED_NAMES = frozenset({"ema", "optim", "rng"})
_LOOP_META = frozenset({"config", "step", "metrics", "loop", "optimizers", "rng"})

StepFn = Callable[[int, torch.Generator], Mapping[str, float]]


class Stateful(Protocol):
    """Optimizers, LR schedulers, GradScalers: anything with a state dict."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class LoopConfig:
    """Loop settings (`configs/train/base.yaml` documents each key).

    Attributes:
        max_steps: total optimizer steps of the run (a resumed run may raise it).
        ckpt_every: write a checkpoint every this many steps (and always at the end).
        keep_last: checkpoints kept in `run_dir/checkpoints` (older ones are deleted after a new
            one is complete).
        seed: the run seed; every step's randomness derives from (seed, step).
        ema_decay: EMA decay for the modules named in `ema_modules`; None = no EMA.
        progress: show a tqdm progress bar.
        log_every: write a metrics line every this many steps (and at the last step).
    """

    max_steps: int
    ckpt_every: int
    keep_last: int = 2
    seed: int = 0
    ema_decay: float | None = None
    progress: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        for name in ("ckpt_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}")

    @classmethod
    def from_mapping(cls, train_cfg: Any, **overrides: Any) -> LoopConfig:
        """Build from the `train` config section; keys that are not loop keys (lr, batch_size)
        are ignored.

        Args:
            train_cfg: mapping or DictConfig, e.g. `cfg.train`.
            **overrides: values taking precedence, e.g. `seed=cfg.seed`.
        """
        plain = plain_config(train_cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in plain.items() if k in names}, **overrides})


@dataclass
class LoopResult:
    """What `run_loop` returns.

    Attributes:
        step: completed steps (== max_steps).
        metrics: metrics of the last step taken (from the checkpoint if no step ran).
        checkpoint: the final checkpoint directory.
        ema: name -> EMA copy of that module (empty without EMA).
        resumed_from: the step the run resumed from (0 for a fresh run).
    """

    step: int
    metrics: dict[str, float]
    checkpoint: Path
    ema: dict[str, nn.Module]
    resumed_from: int


# ---------------------------------------------------------------------------- seeding helpers


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, the same in every process and Python version.

    Python's `hash()` is salted for str, so seeds are derived from blake2b of `repr(parts)`.

    Args:
        *parts: e.g. a purpose tag, the run seed and a step or item index.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


_mix = stable_seed


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step` of a run seeded `seed` (stable across processes and versions).

    Args:
        seed: run seed.
        step: 0-based step index.
    """
    return _mix("aldm-fed/step", int(seed), int(step))


def batch_indices(seed: int, step: int, n_items: int, batch_size: int) -> list[int]:
    """Item indices of the batch for `step`, a function of (seed, step) only.

    Epochs are consecutive runs of `n_items` positions; each epoch visits every item once in its
    own seeded order, and a batch may straddle two epochs. No sampler state needs checkpointing.

    Args:
        seed: run seed.
        step: 0-based step index.
        n_items: dataset size.
        batch_size: items per batch (may exceed `n_items`; items then repeat across epochs).
    """
    if n_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(
            f"need n_items >= 1, batch_size >= 1, step >= 0; got {n_items}, {batch_size}, {step}"
        )
    orders: dict[int, np.ndarray] = {}
    out: list[int] = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_items)
        if epoch not in orders:
            rng = np.random.default_rng(_mix("aldm-fed/epoch", int(seed), epoch))
            orders[epoch] = rng.permutation(n_items)
        out.append(int(orders[epoch][i]))
    return out


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (a config, made plain first).

    Args:
        obj: DictConfig, dataclass or nested mapping of JSON values.
    """
    text = json.dumps(plain_config(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------- the loop


def run_loop(
    run_dir: str | os.PathLike[str],
    cfg: LoopConfig,
    *,
    modules: Mapping[str, nn.Module],
    step_fn: StepFn,
    optimizers: Mapping[str, Stateful] | None = None,
    config: Any = None,
    meta: Mapping[str, Any] | None = None,
    ema_modules: Sequence[str] = (),
    overwrite: bool = False,
    generator_device: str | torch.device = "cpu",
    setup: DeviceSetup | None = None,
) -> LoopResult:
    """Run (or resume) a training run in `run_dir` up to `cfg.max_steps` steps.

    Args:
        run_dir: the run's directory (created if absent).
        cfg: loop settings.
        modules: name -> module whose weights are checkpointed (trained ones; a frozen UNet
            that comes from another checkpoint need not be listed). Names: letters, digits, _ -.
        step_fn: `step_fn(step, generator) -> {"loss": ...}`: one training step (forward,
            backward, optimizer step). Draw randomness from `generator` or the global torch RNG
            and the batch from `batch_indices(cfg.seed, step, ...)`.
        optimizers: name -> optimizer (or LR scheduler, GradScaler) whose state is checkpointed.
        config: the run's config (DictConfig or dict, ideally the full composed one). Stored in
            every checkpoint; its hash, minus `RESUMABLE_KEYS`, decides whether `run_dir` may be
            resumed.
        meta: extra checkpoint metadata, e.g. `scale_factor`, `data_hash`, `stage`.
        ema_modules: names in `modules` that get an EMA copy when `cfg.ema_decay` is set.
        overwrite: discard any run already in `run_dir` and start at step 0.
        generator_device: device of the per-step generator passed to `step_fn`.
        setup: the device setup `step_fn` autocasts with: named in the non-finite error, and,
            when its precision was chosen by "auto", what falls back to fp32.

    Raises:
        ValueError: bad names, `run_dir` holds a different config, or a resumed run is past
            `max_steps`.
        NonFiniteError: a step's loss or gradients went non-finite (message: stage, step,
            precision, the override that avoids it); the last checkpoint is the one before.
        KeyboardInterrupt: after Ctrl-C, once the current step is finished and checkpointed.
    """
    run_dir = Path(run_dir)
    optimizers = dict(optimizers or {})
    _check_names(modules, optimizers, ema_modules, cfg)
    config_plain = plain_config(config) if config is not None else {}
    user_meta = plain_config(dict(meta or {}))
    clash = _LOOP_META & set(user_meta)
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are written by the loop itself")

    # 1. The run directory and its identity.
    identity = {
        "config": _without(config_plain, RESUMABLE_KEYS),
        "seed": cfg.seed,
        "ema_decay": cfg.ema_decay,
        "ema_modules": sorted(ema_modules) if cfg.ema_decay is not None else [],
    }
    digest = config_hash(identity)
    _open_run_dir(run_dir, identity, digest, overwrite)
    ckpt_dir = run_dir / CKPT_DIR
    metrics_path = run_dir / METRICS_FILE
    emas: dict[str, EMA] = {}
    if cfg.ema_decay is not None:
        emas = {n: EMA(modules[n], cfg.ema_decay) for n in ema_modules}

    # 2. Resume, or seed the global RNGs of a fresh run.
    ckpt = find_latest_checkpoint(run_dir)
    if ckpt is not None:
        start = _restore(ckpt, digest, modules, optimizers, emas)
        if start > cfg.max_steps:
            raise ValueError(f"{run_dir} is at step {start}, past max_steps={cfg.max_steps}")
        last_metrics: dict[str, float] = dict(ckpt.meta.get("metrics") or {})
        ckpt_path, saved_step = ckpt.path, start
        log.info("resuming %s from step %d (%s)", run_dir, start, ckpt.path.name)
    else:
        start, last_metrics, ckpt_path, saved_step = 0, {}, None, None
        np.random.seed(_mix("aldm-fed/numpy", cfg.seed) % 2**32)
        random.seed(_mix("aldm-fed/python", cfg.seed))
    _truncate_metrics(metrics_path, start)
    _remove_stale(ckpt_dir, start)

    def checkpoint(step: int) -> Path:
        groups: dict[str, Any] = dict(modules)
        groups.update({f"ema.{n}": e.state_dict() for n, e in emas.items()})
        opt_structures = {}
        for name, opt in optimizers.items():
            groups[f"optim.{name}"], opt_structures[name] = optimizer_state_to_tensors(opt)
        groups["rng"], rng_structure = rng_state_to_tensors()
        path = save_checkpoint(
            ckpt_dir / f"step_{step:08d}",
            groups,
            {
                **user_meta,
                "config": config_plain,
                "step": step,
                "metrics": last_metrics,
                "loop": {"config_hash": digest, **dataclasses.asdict(cfg)},
                "optimizers": opt_structures,
                "rng": rng_structure,
            },
        )
        # The pointer moves only once the new checkpoint is complete; pruning comes last.
        atomic_write_text(run_dir / LATEST_FILE, f"{CKPT_DIR}/{path.name}\n")
        _prune(ckpt_dir, cfg.keep_last)
        return path

    # 3-6. The steps.
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=run_dir.name,
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    running: dict[str, float] = {}
    interrupt = _DeferredInterrupt()
    with interrupt, open(metrics_path, "a", encoding="utf-8") as metrics_log:
        try:
            for step in range(start, cfg.max_steps):
                last_metrics = _guarded_step(
                    step_fn, step, cfg.seed, generator_device, setup, modules, _where(user_meta, run_dir)
                )
                for name, ema in emas.items():
                    ema.update(modules[name])
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    metrics_log.write(json.dumps({"step": step, **last_metrics}) + "\n")
                    metrics_log.flush()
                _update_bar(bar, running, last_metrics)
                if done % cfg.ckpt_every == 0 or done == cfg.max_steps or interrupt.requested:
                    os.fsync(metrics_log.fileno())  # the log on disk must reach the checkpoint
                    ckpt_path, saved_step = checkpoint(done), done
                if interrupt.requested:
                    raise KeyboardInterrupt(f"interrupted after step {done}; saved {ckpt_path}")
        finally:
            bar.close()
    if saved_step != cfg.max_steps:  # max_steps == 0 on a fresh run: record the initial state
        ckpt_path = checkpoint(cfg.max_steps)
    assert ckpt_path is not None
    return LoopResult(
        step=cfg.max_steps,
        metrics=last_metrics,
        checkpoint=ckpt_path,
        ema={n: e.module for n, e in emas.items()},
        resumed_from=start,
    )


def _where(meta: Mapping[str, Any], run_dir: Path) -> str:
    """How the error line names the run: "<stage> (<run_dir>)"."""
    stage = meta.get("stage")
    return f"{stage} ({run_dir})" if stage else str(run_dir)


def _seeded_step(step_fn: StepFn, step: int, seed: int, generator_device: str | torch.device) -> dict[str, float]:
    # Modules that use the global RNG (dropout) repeat too; a different seed from the
    # generator's so the two streams are not the same random numbers.
    torch.manual_seed(_mix("aldm-fed/global", seed, step))
    generator = torch.Generator(device=generator_device)
    generator.manual_seed(step_seed(seed, step))
    return _as_floats(step_fn(step, generator), step)


def _guarded_step(
    step_fn: StepFn,
    step: int,
    seed: int,
    generator_device: str | torch.device,
    setup: DeviceSetup | None,
    modules: Mapping[str, nn.Module],
    where: str,
) -> dict[str, float]:
    """One step; a non-finite one is redone in fp32 (auto precision) or stops the stage."""
    try:
        return _checked_step(step_fn, step, seed, generator_device)
    except NonFiniteError as exc:
        precision = setup.precision if setup is not None else "fp32"
        line = _nonfinite_line(exc, where, step, precision, modules)
        if setup is None or not setup.auto_precision or precision == "fp32" or exc.applied:
            raise _stop(exc, line, precision) from None
    # "auto" chose the low precision, and nothing was applied (`optimizer_step` raises before
    # stepping): take the same step again, with the same seeds, in fp32.
    if fall_back_to_fp32(line):
        log.warning("%s; device.precision=auto falls back to fp32 for the rest of this process "
                    "(set device.precision=fp32 to start there)", line)
    try:
        return _checked_step(step_fn, step, seed, generator_device)
    except NonFiniteError as exc:
        raise _stop(exc, _nonfinite_line(exc, where, step, "fp32", modules), "fp32") from None


def _checked_step(step_fn: StepFn, step: int, seed: int, generator_device: str | torch.device) -> dict[str, float]:
    metrics = _seeded_step(step_fn, step, seed, generator_device)
    # A step_fn that steps its optimizer without `optimizer_step` is caught here, after the fact.
    loss = metrics.get("loss")
    if loss is not None and not np.isfinite(loss):
        raise NonFiniteError("reported loss", loss, applied=True)
    return metrics


def _nonfinite_line(exc: NonFiniteError, where: str, step: int, precision: str, modules: Mapping[str, nn.Module]) -> str:
    words = "fp32" if precision == "fp32" else f"{precision} autocast"
    damage = nonfinite_parameters(modules)
    return f"stage {where}, step {step}: {exc} under {words}" + (f"; {damage}" if damage else "")


def _stop(exc: NonFiniteError, line: str, precision: str) -> NonFiniteError:
    fix = "device.precision=fp32" if precision != "fp32" else "a lower train.<stage>.lr or a grad_clip"
    return NonFiniteError(
        exc.quantity, exc.value, f"{line}; nothing from this step was saved; rerun with {fix} to avoid it",
        applied=exc.applied,
    )


# ------------------------------------------------------------------------- run dir and resume


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest checkpoint in `run_dir` that loads and verifies, or None.

    The `latest` pointer is tried first, then every `checkpoints/step_*` newest first; damaged
    ones are skipped with a warning.

    Args:
        run_dir: a run directory written by `run_loop`.
    """
    run_dir = Path(run_dir)
    candidates = [p for _, p in sorted(_step_dirs(run_dir / CKPT_DIR), reverse=True)]
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        named = run_dir / CKPT_DIR / Path(pointer.read_text().strip()).name  # stay inside the run
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return None


def _open_run_dir(run_dir: Path, identity: dict[str, Any], digest: str, overwrite: bool) -> None:
    run_file = run_dir / RUN_FILE
    ours = [run_dir / n for n in (RUN_FILE, METRICS_FILE, LATEST_FILE, CKPT_DIR)]
    if overwrite:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif run_file.is_file():
        try:
            stored = json.loads(run_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{run_file} is damaged ({exc}); overwrite=True starts afresh") from None
        if stored.get("config_hash") != digest:
            diff = _diff_keys(stored.get("identity", {}), identity)
            raise ValueError(
                f"{run_dir} holds a run with a different config (differs at: "
                f"{', '.join(diff) or '?'}); use another run directory, or overwrite=True to "
                f"discard that run"
            )
        return
    elif any(p.exists() for p in ours[1:]):
        raise ValueError(
            f"{run_dir} holds training files but no {RUN_FILE}; overwrite=True discards them"
        )
    atomic_write_json(
        run_file,
        {
            "config_hash": digest,
            "identity": identity,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _restore(
    ckpt: Checkpoint,
    digest: str,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, Stateful],
    emas: Mapping[str, EMA],
) -> int:
    if ckpt.meta.get("loop", {}).get("config_hash") != digest:
        raise CheckpointError(f"{ckpt.path} was written by a run with a different config")

    def group(name: str) -> dict[str, torch.Tensor]:
        if name not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path} has no group {name!r} (it holds {ckpt.groups})")
        return ckpt.tensors[name]

    for name, module in modules.items():
        module.load_state_dict(group(name))
    for name, ema in emas.items():
        ema.load_state_dict(group(f"ema.{name}"))
    for name, opt in optimizers.items():
        structure = ckpt.meta["optimizers"][name]
        opt.load_state_dict(optimizer_state_from_tensors(group(f"optim.{name}"), structure))
        if isinstance(opt, torch.optim.Optimizer):
            match_state_layout(opt)  # checkpoints are contiguous; channels_last parameters are not
    restore_rng_state(group("rng"), ckpt.meta["rng"])
    return int(ckpt.meta["step"])


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(_CKPT_RE.match(p.name), p) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def _remove_stale(ckpt_dir: Path, start: int) -> None:
    # Leftovers of a killed save (".step_X.tmp") and checkpoints past the resume point (they
    # failed to load, or pruning would keep them over good ones).
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        if path.name.startswith(".") and path.is_dir():
            shutil.rmtree(path)
    for step, path in _step_dirs(ckpt_dir):
        if step > start:
            log.warning("removing unusable checkpoint %s (resuming from step %d)", path, start)
            shutil.rmtree(path)


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    for _, path in _step_dirs(ckpt_dir)[:-keep_last]:
        shutil.rmtree(path)


def _truncate_metrics(path: Path, start: int) -> None:
    # Keep the lines of steps before `start`, byte for byte; drop later ones and a torn last line.
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(record, dict) and record.get("step", start) < start:
            kept.append(line)
    new = "".join(kept)
    if new != text:
        atomic_write_text(path, new)


# ------------------------------------------------------------------------------------ helpers


def _check_names(
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, Stateful],
    ema_modules: Sequence[str],
    cfg: LoopConfig,
) -> None:
    for name in [*modules, *optimizers]:
        if not _NAME_RE.match(name) or name in _RESERVED_NAMES:
            raise ValueError(
                f"bad module/optimizer name {name!r}: use letters, digits, _ or -, and not one "
                f"of {sorted(_RESERVED_NAMES)}"
            )
    missing = [n for n in ema_modules if n not in modules]
    if missing:
        raise ValueError(f"ema_modules {missing} are not in modules {list(modules)}")
    if cfg.ema_decay is not None and not ema_modules:
        raise ValueError("ema_decay is set but ema_modules names no module to average")


def _as_floats(metrics: Any, step: int) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        kind = type(metrics).__name__
        raise TypeError(f"step_fn must return a dict of floats, got {kind} at step {step}")
    # A loss tensor may still require grad; detach so float() does not warn.
    return {
        str(k): float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        for k, v in metrics.items()
    }


def _update_bar(bar: Any, running: dict[str, float], metrics: Mapping[str, float]) -> None:
    # Smoothed values: a single step's loss is too noisy to read.
    for key, value in list(metrics.items())[:4]:
        running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
    bar.update(1)


def _without(config: Any, dotted_keys: Sequence[str]) -> Any:
    if not isinstance(config, dict):
        return config
    out = json.loads(json.dumps(config))  # deep copy of plain JSON
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _diff_keys(a: Any, b: Any, limit: int = 8) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    missing = object()
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, missing) != fb.get(k, missing))
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


class _DeferredInterrupt:
    """While active, a first Ctrl-C only sets `requested`: the loop finishes the step (a step cut
    in half leaves weights and optimizer state out of step with each other), checkpoints, then
    raises. A second Ctrl-C interrupts at once, without a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _DeferredInterrupt:
        # Python delivers signals to the main thread only; elsewhere there is nothing to defer.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._restore_target())
        tqdm.write(
            "interrupt: finishing this step and saving a checkpoint (Ctrl-C again aborts now)",
            file=sys.stderr,
        )

    def _restore_target(self) -> Any:
        return self._previous if self._previous is not None else signal.default_int_handler

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._restore_target())
