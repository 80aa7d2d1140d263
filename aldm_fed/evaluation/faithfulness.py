"""Anatomical faithfulness (issue #4): does a synthetic volume show its tumour where its mask says?

A tumour segmenter trained on the site's REAL target cases segments the synthetic volumes; its Dice
against the masks that conditioned them is set beside its Dice on held-out real test cases. A
generator that draws the tumour where the mask puts it scores about as well on synthetic volumes
as on real ones; `dice_gap` (real minus synthetic) measures how far it falls short.

```python
result = faithfulness(cfg.faithfulness, real_k, real_test, {"aldm": syn, "gan": gan_set},
                      "runs/x/sites/A/faithfulness")
result["real"]["dice_mean"], result["synthetic"]["aldm"]["dice_mean"], result["synthetic"]["gan"]["dice_gap"]
faithfulness_metrics(result)   # {"faithfulness.real.dice_mean": 0.81, ..., "faithfulness.gan.n": 16}
```

Several synthetic sets (the ALDM set and each baseline's) are measured by the same segmenter,
trained once; with no synthetic set at all, only the real Dice is measured.

1. The segmenter: MONAI `UNet` (3D, stride 2 between levels, `faithfulness.network`), one sigmoid
   output for the whole tumour (label > 0); Dice + BCE loss (MONAI `DiceCELoss`).
2. Training (`train_segmenter`) through the shared resumable `run_loop`: random cubic patches,
   `pos_fraction` of them centred on a tumour voxel; a finished run is read back, not retrained.
3. Prediction: sliding windows of the training patch size, sigmoid >= `threshold`.
4. Dice per case (MONAI `DiceMetric`, `ignore_empty=False`): a case without tumour scores 1 when
   nothing is predicted and 0 otherwise, so every case has a finite value.

Layout of `run_dir`:

```
run_dir/
  faithfulness.json     real test set and each synthetic set: n, Dice mean, Dice and case id per
                        case; settings, notes
  segmenter/            the loop's run dir (checkpoints, metrics.jsonl)
```

Guards, raising ValueError: a synthetic item among the training cases, a real item among the
synthetic ones, a synthetic test item, and a test patient or a synthetic item's id among the
training patients (`check_no_leakage`). Synthetic masks are usually drawn from the training
patients' own masks (augmented and moved): that is the setting the measure is meant for, so it is
allowed and counted (`n_syn_mask_from_train`).

The flat numbers (`faithfulness_metrics`) carry fixed names and counts only, never a case id:
`faithfulness.n_train`, `faithfulness.real.<REAL_NUMBERS>` and `faithfulness.<set>.<SET_NUMBERS>`
per synthetic set (`metric_key_pattern` builds the regular expression that accepts exactly those).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aldm_fed.checkpoints import plain_config
from aldm_fed.evaluation.metrics import set_metric_pattern
from aldm_fed.evaluation.tasks import CaseItem, check_no_leakage, check_real_test_items, training_groups
from aldm_fed.io import atomic_write_json
from aldm_fed.models.segmenter import NORMS, SegmenterNetwork, build_segmenter
from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_int, get_int_list, get_str
from aldm_fed.training.common import optimizer_step
from aldm_fed.training.device import DeviceSetup, autocast_context, make_grad_scaler, resolve_device
from aldm_fed.training.loop import LoopConfig, LoopResult, batch_indices, run_loop, stable_seed
from aldm_fed.training.optim import adam_optimizer

__all__ = [
    "FAITHFULNESS_FILE",
    "REAL_NUMBERS",
    "SET_NUMBERS",
    "FaithfulnessSettings",
    "SegmenterTrainConfig",
    "TrainedSegmenter",
    "dice_scores",
    "faithfulness",
    "faithfulness_metrics",
    "metric_key_pattern",
    "predict_tumour",
    "train_segmenter",
]

FAITHFULNESS_FILE = "faithfulness.json"
SEGMENTER_DIR = "segmenter"
# The flat numbers `faithfulness_metrics` returns: `faithfulness.n_train`, `faithfulness.real.<name>`
# for the real test cases and `faithfulness.<set>.<name>` for each synthetic set.
REAL_NUMBERS: tuple[str, ...] = ("dice_mean", "n")
SET_NUMBERS: tuple[str, ...] = ("dice_mean", "dice_gap", "n")
REAL = "real"  # the real test set's name; a synthetic set may not take it
# A synthetic set's name becomes part of a metric name: lower-case letters, digits, '_'.
_SET_NAME = re.compile(r"[a-z][a-z0-9_]*")
GROUP = "faithfulness"
_NETWORK_KEYS = ("channels", "num_res_units", "norm", "dropout")
_TRAIN_KEYS = ("steps", "batch_size", "lr", "weight_decay", "patch_size", "pos_fraction", "ckpt_every",
               "log_every", "progress")
_EVAL_KEYS = ("threshold", "overlap", "sw_batch_size")


# ============================================================================================
# Settings
# ============================================================================================


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """Training budget, optimizer and patches (`faithfulness.train`).

    Attributes:
        steps: optimizer steps.
        batch_size: patches per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patch_size: edge of the cubic training patch, clamped to the volume; None = whole volume.
            Prediction uses sliding windows of the same size.
        pos_fraction: share of patches centred on a tumour voxel (the rest are centred anywhere).
        ckpt_every: checkpoint every N steps (None: only at the end).
        log_every: metrics.jsonl line every N steps.
        progress: tqdm progress bar.
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patch_size: int | None = None
    pos_fraction: float = 0.5
    ckpt_every: int | None = None
    log_every: int = 10
    progress: bool = False


@dataclass(frozen=True)
class FaithfulnessSettings:
    """The `faithfulness` config group, validated (configs/faithfulness/default.yaml).

    Attributes:
        enabled: whether `aldm_fed.evaluation.site.evaluate_site` measures faithfulness.
        network: the UNet.
        train: budget, optimizer, patches.
        threshold: sigmoid >= threshold is tumour.
        overlap: sliding-window overlap at prediction time, in [0, 1).
        sw_batch_size: windows per forward pass.
    """

    network: SegmenterNetwork
    train: SegmenterTrainConfig
    enabled: bool = True
    threshold: float = 0.5
    overlap: float = 0.25
    sw_batch_size: int = 4

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> FaithfulnessSettings:
        """Validate the `faithfulness` group; every key must be present (the YAML holds the defaults).

        Args:
            cfg: mapping or DictConfig (e.g. `cfg.faithfulness`), or settings (returned as they are).

        Raises:
            ValueError: unknown, missing or invalid keys, named as `faithfulness.<section>.<key>`.
        """
        if isinstance(cfg, FaithfulnessSettings):
            return cfg
        c = as_plain_dict(cfg, GROUP)
        check_keys(c, GROUP, ("enabled", "network", "train", "eval"))
        net = as_plain_dict(c["network"], f"{GROUP}.network")
        train = as_plain_dict(c["train"], f"{GROUP}.train")
        ev = as_plain_dict(c["eval"], f"{GROUP}.eval")
        for section, keys, name in ((net, _NETWORK_KEYS, "network"), (train, _TRAIN_KEYS, "train"),
                                    (ev, _EVAL_KEYS, "eval")):
            check_keys(section, f"{GROUP}.{name}", keys)

        g = f"{GROUP}.network"
        channels = get_int_list(net, "channels", g)
        if len(channels) < 2:
            raise ValueError(f"{g}.channels: a UNet needs at least 2 levels, got {channels}")
        network = SegmenterNetwork(
            channels=tuple(channels),
            num_res_units=get_int(net, "num_res_units", g, minimum=0),
            norm=get_str(net, "norm", g, NORMS),
            dropout=get_float(net, "dropout", g, minimum=0.0, maximum=1.0),
        )

        g = f"{GROUP}.train"
        patch = train["patch_size"]
        if patch is not None:
            patch = get_int(train, "patch_size", g)
            if patch % network.divisor:
                raise ValueError(f"{g}.patch_size: {patch} is not divisible by {network.divisor} "
                                 f"(2^(levels - 1) for {len(channels)} levels of network.channels)")
        ckpt_every = train["ckpt_every"]
        train_cfg = SegmenterTrainConfig(
            steps=get_int(train, "steps", g),
            batch_size=get_int(train, "batch_size", g),
            lr=get_float(train, "lr", g, minimum=0.0, inclusive_min=False),
            weight_decay=get_float(train, "weight_decay", g, minimum=0.0),
            patch_size=patch,
            pos_fraction=get_float(train, "pos_fraction", g, minimum=0.0, maximum=1.0),
            ckpt_every=None if ckpt_every is None else get_int(train, "ckpt_every", g),
            log_every=get_int(train, "log_every", g),
            progress=get_bool(train, "progress", g),
        )

        g = f"{GROUP}.eval"
        overlap = get_float(ev, "overlap", g, minimum=0.0)
        if overlap >= 1.0:
            raise ValueError(f"{g}.overlap: expected a value in [0, 1), got {overlap}")
        return cls(
            network=network,
            train=train_cfg,
            enabled=get_bool(c, "enabled", GROUP),
            threshold=get_float(ev, "threshold", g, minimum=0.0, maximum=1.0),
            overlap=overlap,
            sw_batch_size=get_int(ev, "sw_batch_size", g),
        )

    def roi_size(self, grid: Sequence[int]) -> tuple[int, ...]:
        """The patch (training) and window (prediction) shape for volumes of `grid`.

        Args:
            grid: (S, S, S) of the volumes.

        Raises:
            ValueError: the shape is not divisible by the network's downsampling.
        """
        p = self.train.patch_size
        roi = tuple(int(s) if p is None else min(p, int(s)) for s in grid)
        bad = [s for s in roi if s % self.network.divisor]
        if bad:
            raise ValueError(
                f"{GROUP}: patches of {roi} voxels for volumes of {tuple(grid)}: every side must be "
                f"divisible by {self.network.divisor} (2^(levels - 1) of network.channels); pick "
                f"train.patch_size or fewer levels"
            )
        return roi


# ============================================================================================
# Network, training, prediction
# ============================================================================================


@dataclass
class TrainedSegmenter:
    """What `train_segmenter` returns.

    Attributes:
        model: the trained UNet (on `device.device`, eval mode).
        loop: the loop's result (final checkpoint, last metrics, resumed_from).
        device: where it ran.
    """

    model: nn.Module
    loop: LoopResult
    device: DeviceSetup


def _check_cases(items: Sequence[CaseItem], what: str) -> None:
    if not items:
        raise ValueError(f"{what}: no volumes")
    missing = [it.group for it in items if it.seg is None]
    if missing:
        raise ValueError(f"{what}: item(s) {missing[:10]} have no tumour mask (seg)")
    shapes = {tuple(it.image.shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"{what}: all volumes must share one shape (C, S, S, S); got {sorted(shapes)}")


def _crop_start(fg: np.ndarray, grid: tuple[int, ...], roi: tuple[int, ...], generator: torch.Generator,
                pos_fraction: float) -> tuple[int, ...]:
    # Centre on a tumour voxel with probability pos_fraction, else anywhere; clamp into the volume.
    if fg.size and float(torch.rand((), generator=generator)) < pos_fraction:
        k = int(torch.randint(fg.size, (), generator=generator))
        centre = np.unravel_index(int(fg[k]), grid)
    else:
        centre = tuple(int(torch.randint(s, (), generator=generator)) for s in grid)
    return tuple(min(max(int(c) - r // 2, 0), s - r) for c, r, s in zip(centre, roi, grid, strict=True))


def train_segmenter(
    items: Sequence[CaseItem],
    settings: FaithfulnessSettings | Mapping[str, Any] | Any,
    run_dir: str | os.PathLike[str],
    *,
    seed: int,
    device: DeviceSetup | None = None,
    overwrite: bool = False,
) -> TrainedSegmenter:
    """Train the whole-tumour segmenter on REAL cases in `run_dir` (resumable; a finished run is
    read back, not retrained).

    Args:
        items: the real training volumes, each with `seg`.
        settings: the `faithfulness` group (or `FaithfulnessSettings`).
        run_dir: the loop's run directory (checkpoints, metrics.jsonl, run.json).
        seed: initialisation, batch order and patch positions derive from it.
        device: from `resolve_device`; None = `resolve_device("auto")`.
        overwrite: discard a run in `run_dir` that was trained with another config or other cases.

    Returns:
        The trained model with the loop's result.

    Raises:
        ValueError: no items, a synthetic item (the segmenter learns from real anatomy only),
            items without a mask or of mixed shapes, bad settings, or a `run_dir` holding another
            run (without `overwrite`).
    """
    from monai.losses import DiceCELoss

    s = FaithfulnessSettings.from_mapping(settings)
    _check_cases(items, "segmenter training")
    fake = [it.group for it in items if it.synthetic]
    if fake:
        raise ValueError(f"synthetic item(s) {fake[:10]} passed as segmenter training data; it trains on "
                         "real cases only (the synthetic ones are what it measures)")
    setup = device or resolve_device("auto")
    grid = items[0].size
    roi = s.roi_size(grid)
    t = s.train

    # 1. Same init for a given seed; the global RNG of the caller is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed("aldm-fed/segmenter-init", int(seed)) % 2**63)
        model = build_segmenter(s.network, items[0].channels)
    model.to(setup.device)
    # batch=True: Dice over the whole batch, so a patch without tumour does not give a 0/0 Dice.
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    opt = adam_optimizer(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    params = list(model.parameters())
    scaler = make_grad_scaler(setup)  # active only for fp16 on CUDA
    optimizers: dict[str, Any] = {"segmenter": opt}
    if setup.use_grad_scaler:
        optimizers["scaler"] = scaler
    # Tumour voxel positions, found once: patch centres are drawn from them.
    fg = [np.flatnonzero(np.asarray(it.seg) > 0) for it in items]

    # 2. One step: patches, forward under autocast, loss in fp32, AdamW.
    def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
        model.train()
        xs, ys = [], []
        for i in batch_indices(seed, step, len(items), t.batch_size):
            start = _crop_start(fg[i], grid, roi, generator, t.pos_fraction)
            box = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
            xs.append(np.asarray(items[i].image[(slice(None), *box)], dtype=np.float32))
            ys.append((np.asarray(items[i].seg[box]) > 0)[None].astype(np.float32))
        x = torch.from_numpy(np.stack(xs)).to(setup.device)
        y = torch.from_numpy(np.stack(ys)).to(setup.device)
        with autocast_context(setup):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer_step(loss, opt, params, scaler, None)
        return {"loss": loss.detach()}

    # 3. The loop; the run's identity holds the settings and the training cases themselves.
    identity = {
        "stage": "segmenter",
        "network": plain_config(s.network),
        "train": plain_config(t),
        "train_groups": sorted(it.group for it in items),
        "train_content": sorted(f"{it.group}={it.content_key}" for it in items),
    }
    loop_cfg = LoopConfig(max_steps=t.steps, ckpt_every=t.ckpt_every or t.steps, keep_last=1, seed=int(seed),
                          progress=t.progress, log_every=t.log_every)
    result = run_loop(run_dir, loop_cfg, modules={"segmenter": model}, step_fn=step_fn, optimizers=optimizers,
                      config=identity, meta={"stage": "segmenter"}, overwrite=overwrite, generator_device="cpu",
                      setup=setup)
    model.eval()
    return TrainedSegmenter(model=model, loop=result, device=setup)


@torch.no_grad()
def predict_tumour(
    model: nn.Module, item: CaseItem, settings: FaithfulnessSettings, *, device: DeviceSetup | None = None
) -> np.ndarray:
    """The predicted whole-tumour mask of one volume (sliding windows of the training patch size).

    Args:
        model: from `train_segmenter` (or `build_segmenter`).
        item: the volume.
        settings: window size, overlap, threshold.
        device: from `resolve_device`; None = where the model's parameters are, fp32.

    Returns:
        bool (S, S, S).
    """
    from monai.inferers import sliding_window_inference

    if device is None:
        dev = next(model.parameters()).device
        device = DeviceSetup(dev, None, False, str(dev))
    roi = settings.roi_size(item.size)
    # a copy: cached volumes are read-only memory maps, which torch does not take
    x = torch.from_numpy(np.array(item.image, dtype=np.float32)[None]).to(device.device)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device):
            logits = sliding_window_inference(x, roi, settings.sw_batch_size, model, overlap=settings.overlap)
    finally:
        model.train(was_training)
    return (torch.sigmoid(logits.float()) >= settings.threshold)[0, 0].cpu().numpy()


def dice_scores(pred: Any, target: Any) -> np.ndarray:
    """Dice per case of binary masks (MONAI `DiceMetric`, `ignore_empty=False`).

    A case whose target is empty scores 1 if the prediction is empty too, else 0, so every case
    gets a finite value.

    Args:
        pred: predicted masks, (B, S, S, S) or (S, S, S); nonzero = tumour.
        target: true masks, the same shape; nonzero = tumour.

    Returns:
        float64 (B,).

    Raises:
        ValueError: shapes differ or are not 3D (+ batch).
    """
    from monai.metrics import DiceMetric

    p = torch.as_tensor(np.asarray(pred) != 0)
    y = torch.as_tensor(np.asarray(target) != 0)
    if p.shape != y.shape or p.ndim not in (3, 4):
        raise ValueError(f"dice_scores: pred and target must be equal (B, S, S, S) or (S, S, S); got "
                         f"{tuple(p.shape)} and {tuple(y.shape)}")
    if p.ndim == 3:
        p, y = p[None], y[None]
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return metric(p[:, None].float(), y[:, None].float()).reshape(-1).numpy().astype(np.float64)


# ============================================================================================
# The measure
# ============================================================================================


def _set_dice(trained: TrainedSegmenter, items: Sequence[CaseItem], s: FaithfulnessSettings) -> np.ndarray:
    # One volume at a time: only one predicted mask is held at once.
    return np.concatenate([
        dice_scores(predict_tumour(trained.model, it, s, device=trained.device), np.asarray(it.seg))
        for it in items
    ])


def _summary(dice: np.ndarray) -> dict[str, Any]:
    return {"n": int(dice.size), "dice_mean": float(dice.mean()), "dice_per_case": dice.tolist()}


def _named_sets(
    synthetic: Sequence[CaseItem] | Mapping[str, Sequence[CaseItem]],
) -> dict[str, Sequence[CaseItem]]:
    """Synthetic sets by name; a plain list is the one set "synthetic"."""
    sets = dict(synthetic) if isinstance(synthetic, Mapping) else {"synthetic": synthetic}
    bad = [n for n in sets if not isinstance(n, str) or not _SET_NAME.fullmatch(n) or n == REAL]
    if bad:
        raise ValueError(f"synthetic set name(s) {bad}: names become metric names, so use lower-case "
                         f"letters, digits and '_' (starting with a letter), and not {REAL!r}")
    return sets


def faithfulness(
    cfg_section: FaithfulnessSettings | Mapping[str, Any] | Any,
    real_train: Sequence[CaseItem],
    real_test: Sequence[CaseItem],
    synthetic: Sequence[CaseItem] | Mapping[str, Sequence[CaseItem]],
    run_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    device: DeviceSetup | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the segmenter on real target cases (once: a finished run is read back); Dice on real
    test cases and on each synthetic set (against its conditioning masks); write
    `run_dir/faithfulness.json` atomically.

    Args:
        cfg_section: the `faithfulness` config group (or `FaithfulnessSettings`).
        real_train: real training volumes with masks (the K target cases).
        real_test: held-out real volumes with masks.
        synthetic: synthetic sets by name (e.g. `{"aldm": ..., "gan": ...}`; names are lower-case
            letters, digits and '_', not "real"), or one list (the set "synthetic"); `seg` is the
            mask each volume was generated from. An empty mapping measures the real test cases only.
        run_dir: output folder (the JSON file and the segmenter's run).
        seed: training seed.
        device: from `resolve_device`; None = auto.
        overwrite: retrain a segmenter run whose folder holds another config.

    Returns:
        `{"real": {"n", "dice_mean", "dice_per_case"}, "synthetic": {name: {"n", "dice_mean",
        "dice_per_case", "dice_gap" (real mean minus this set's mean), "n_mask_from_train"}},
        "n_train", "threshold"}`; per-case lists follow the order of the items given. No case id:
        those are in the JSON file only.

    Raises:
        ValueError: an empty set, a bad set name, items in the wrong list (synthetic training or
            test items, real items among the synthetic ones), patient leakage, missing masks, or
            volumes of different shapes across the sets.
    """
    s = FaithfulnessSettings.from_mapping(cfg_section)
    run_dir = Path(run_dir)
    setup = device or resolve_device("auto")
    sets = _named_sets(synthetic)

    # 1. The guards: real anatomy trains, nothing measured was trained on.
    for items, what in ((real_train, "real_train"), (real_test, "real_test"),
                        *((items, f"synthetic set {name!r}") for name, items in sets.items())):
        _check_cases(items, what)
    check_real_test_items(real_test)
    for name, items in sets.items():
        real = [it.group for it in items if not it.synthetic]
        if real:
            raise ValueError(f"synthetic set {name!r} holds real item(s) {real[:10]}: pass real and synthetic "
                             "volumes in their own lists")
    shapes = {what: tuple(items[0].image.shape)
              for what, items in (("real_train", real_train), ("real_test", real_test), *sets.items())}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"real_train, real_test and the synthetic sets differ in volume shape: {shapes}")
    train_groups = training_groups(real_train)  # train_segmenter refuses synthetic items
    check_no_leakage(train_groups, [it.group for it in real_test])
    for items in sets.values():
        check_no_leakage(train_groups, [it.group for it in items])

    # 2. Finished before on the same volumes and settings: read back, nothing trained or written.
    identity = {
        "settings": plain_config(s), "seed": int(seed),
        "train": [f"{it.group}={it.content_key}" for it in real_train],
        "test": [f"{it.group}={it.content_key}" for it in real_test],
        "sets": {name: [f"{it.group}={it.content_key}" for it in items] for name, items in sets.items()},
    }
    if not overwrite:
        try:
            done = json.loads((run_dir / FAITHFULNESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = None
        if isinstance(done, dict) and done.get("identity") == json.loads(json.dumps(identity)) and "result" in done:
            return done["result"]

    # 3. Train (or resume) the segmenter; 4. Dice per set.
    trained = train_segmenter(real_train, s, run_dir / SEGMENTER_DIR, seed=seed, device=setup,
                              overwrite=overwrite)
    dice_real = _set_dice(trained, real_test, s)
    per_set: dict[str, dict[str, Any]] = {}
    for name, items in sets.items():
        dice = _set_dice(trained, items, s)
        per_set[name] = {
            **_summary(dice),
            "dice_gap": float(dice_real.mean() - dice.mean()),
            # Synthetic masks drawn from training patients' masks: expected, but worth knowing.
            "n_mask_from_train": sum(bool(set(it.source_groups) & train_groups) for it in items),
        }
    result: dict[str, Any] = {
        REAL: _summary(dice_real),
        "synthetic": per_set,
        "n_train": len(real_train),
        "threshold": s.threshold,
    }

    # 5. The file, with case ids (it stays at the site).
    atomic_write_json(run_dir / FAITHFULNESS_FILE, {
        "version": 3,
        "identity": identity,
        "result": result,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": setup.description,
        "seed": int(seed),
        "settings": plain_config(s),
        **result,
        REAL: {**result[REAL], "case_ids": [it.group for it in real_test]},
        "synthetic": {name: {**per_set[name], "case_ids": [it.group for it in items],
                             "source_groups": [list(it.source_groups) for it in items]}
                      for name, items in sets.items()},
        "train_case_ids": sorted(it.group for it in real_train),
        "final_train_loss": trained.loop.metrics.get("loss"),
        "notes": {
            "region": "whole tumour (label > 0), one sigmoid output",
            "dice": "MONAI DiceMetric, ignore_empty=False: an empty true mask scores 1 with an empty "
                    "prediction, else 0",
            "dice_gap": "real test mean minus the set's synthetic mean (> 0: tumours less faithful on "
                        "synthetic volumes)",
            "train": "real target cases only, trained once for every set; synthetic masks may be "
                     "augmented copies of their masks (n_mask_from_train)",
        },
    })
    return result


def faithfulness_metrics(result: Mapping[str, Any]) -> dict[str, float | int]:
    """The result of `faithfulness` as flat numbers under fixed names (no case id).

    Args:
        result: what `faithfulness` returned (or its JSON file, read back).

    Returns:
        `faithfulness.n_train`, `faithfulness.real.<name>` for `REAL_NUMBERS` and
        `faithfulness.<set>.<name>` for `SET_NUMBERS` of each synthetic set: Dice means and gaps
        as float, counts as int.
    """
    out: dict[str, float | int] = {
        "faithfulness.n_train": int(result["n_train"]),
        "faithfulness.real.dice_mean": float(result[REAL]["dice_mean"]),
        "faithfulness.real.n": int(result[REAL]["n"]),
    }
    for name, part in result["synthetic"].items():
        out |= {f"faithfulness.{name}.dice_mean": float(part["dice_mean"]),
                f"faithfulness.{name}.dice_gap": float(part["dice_gap"]),
                f"faithfulness.{name}.n": int(part["n"])}
    return out


def metric_key_pattern(set_names: Sequence[str]) -> str:
    """A regular expression (for `re.fullmatch`) accepting exactly the names `faithfulness_metrics`
    gives for synthetic sets named `set_names`, and nothing else.

    Args:
        set_names: the synthetic sets' fixed names (e.g. ("aldm", "noadapt", "concat", "gan")).
    """
    return set_metric_pattern("faithfulness", rf"n_train|{REAL}\.({'|'.join(REAL_NUMBERS)})", set_names, SET_NUMBERS)
