"""Anatomical faithfulness: Dice semantics, a segmenter that learns, the guards, the JSON file and
the flat numbers.

Volumes are 16^3 "blobs": one channel of noisy background with a bright sphere, the sphere being
the tumour. A 2-level UNet learns them in a few dozen steps on one thread.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aldm_fed.config import compose
from aldm_fed.evaluation.faithfulness import (
    FAITHFULNESS_FILE,
    FaithfulnessSettings,
    dice_scores,
    faithfulness,
    faithfulness_metrics,
    metric_key_pattern,
    predict_tumour,
    train_segmenter,
)
from aldm_fed.evaluation.tasks import CaseItem
from aldm_fed.models.segmenter import build_segmenter
from aldm_fed.training.device import resolve_device

SIZE = 16
CPU = resolve_device("cpu", "fp32")


def settings(steps: int = 40, **train: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "network": {"channels": [4, 8], "num_res_units": 0, "norm": "instance", "dropout": 0.0},
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "patch_size": None,
                  "pos_fraction": 0.5, "ckpt_every": None, "log_every": 10, "progress": False, **train},
        "eval": {"threshold": 0.5, "overlap": 0.25, "sw_batch_size": 1},
    }


def blob(group: str, seed: int, *, synthetic: bool = False, source_groups: tuple[str, ...] = ()) -> CaseItem:
    """A bright sphere (the tumour) at a random place in noisy background."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(5, SIZE - 5, size=3)
    radius = rng.uniform(2.5, 4.0)
    dist2 = ((np.indices((SIZE,) * 3) - centre[:, None, None, None]) ** 2).sum(0)
    seg = (dist2 <= radius**2).astype(np.uint8)
    image = 0.3 + 0.5 * seg + 0.05 * rng.standard_normal((SIZE,) * 3)
    return CaseItem(image=np.clip(image, 0, 1)[None].astype(np.float32), seg=seg, group=group,
                    synthetic=synthetic, source_groups=source_groups)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dice_scores_follow_monai_semantics() -> None:
    full, empty = np.ones((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    half = full.copy()
    half[:2] = False
    np.testing.assert_allclose(dice_scores(full, full), [1.0])
    np.testing.assert_allclose(dice_scores(empty, full), [0.0])
    np.testing.assert_allclose(dice_scores(full, empty), [0.0])  # ignore_empty=False: a finite value
    np.testing.assert_allclose(dice_scores(empty, empty), [1.0])  # nothing there, nothing found
    np.testing.assert_allclose(dice_scores(np.stack([half, full]), np.stack([full, full])), [2 / 3, 1.0])
    with pytest.raises(ValueError, match="pred and target"):
        dice_scores(full, full[:2])


def test_a_trained_segmenter_beats_an_untrained_one_on_held_out_blobs(tmp_path: Path) -> None:
    # Patches of 8^3 (half a side), tumour-centred half the time; prediction by sliding windows.
    s = FaithfulnessSettings.from_mapping(settings(steps=40, patch_size=8))
    train = [blob(f"T{i}", i) for i in range(6)]
    held_out = [blob(f"H{i}", 100 + i) for i in range(4)]

    trained = train_segmenter(train, s, tmp_path / "seg", seed=0, device=CPU)
    torch.manual_seed(0)
    untrained = build_segmenter(s.network, 1)

    def mean_dice(model: torch.nn.Module) -> float:
        return float(np.mean([dice_scores(predict_tumour(model, it, s), it.seg)[0] for it in held_out]))

    learned, chance = mean_dice(trained.model), mean_dice(untrained)
    assert trained.loop.step == 40
    assert learned > 0.7 and learned > chance + 0.3, (learned, chance)


def _sets() -> tuple[list[CaseItem], list[CaseItem], list[CaseItem]]:
    train = [blob(f"T{i}", i) for i in range(3)]
    test = [blob(f"X{i}", 50 + i) for i in range(2)]
    syn = [blob(f"SYN-{i}", 80 + i, synthetic=True, source_groups=(f"T{i}",)) for i in range(2)]
    syn.append(blob("SYN-2", 82, synthetic=True, source_groups=("elsewhere",)))
    return train, test, syn


def test_faithfulness_writes_the_json_and_flat_numbers_carry_no_case_id(tmp_path: Path) -> None:
    train, test, syn = _sets()
    other = [blob(f"GAN-{i}", 90 + i, synthetic=True, source_groups=(f"T{i}",)) for i in range(2)]
    result = faithfulness(settings(steps=3), train, test, {"aldm": syn, "gan": other}, tmp_path, seed=0, device=CPU)

    assert (result["real"]["n"], result["n_train"]) == (2, 3)
    assert list(result["synthetic"]) == ["aldm", "gan"]
    assert (result["synthetic"]["aldm"]["n"], result["synthetic"]["gan"]["n"]) == (3, 2)
    assert (result["synthetic"]["aldm"]["n_mask_from_train"], result["synthetic"]["gan"]["n_mask_from_train"]) == (2, 2)
    for part in (result["real"], *result["synthetic"].values()):
        per_case = part["dice_per_case"]
        assert all(0.0 <= d <= 1.0 for d in per_case)
        assert part["dice_mean"] == pytest.approx(np.mean(per_case))
    for part in result["synthetic"].values():
        assert part["dice_gap"] == pytest.approx(result["real"]["dice_mean"] - part["dice_mean"])
    assert "X0" not in json.dumps(result) and "SYN-0" not in json.dumps(result)

    written = json.loads((tmp_path / FAITHFULNESS_FILE).read_text())
    assert written["real"]["case_ids"] == ["X0", "X1"]
    assert written["synthetic"]["aldm"]["case_ids"] == ["SYN-0", "SYN-1", "SYN-2"]
    assert written["synthetic"]["gan"]["case_ids"] == ["GAN-0", "GAN-1"]
    assert written["synthetic"]["aldm"]["dice_per_case"] == result["synthetic"]["aldm"]["dice_per_case"]
    assert written["train_case_ids"] == ["T0", "T1", "T2"]
    assert not list(tmp_path.glob(f".{FAITHFULNESS_FILE}.*"))  # no temporary file left

    flat = faithfulness_metrics(result)
    assert set(flat) == {"faithfulness.n_train", "faithfulness.real.dice_mean", "faithfulness.real.n",
                         *(f"faithfulness.{s}.{n}" for s in ("aldm", "gan") for n in ("dice_mean", "dice_gap", "n"))}
    assert all(type(v) in (int, float) and math.isfinite(v) for v in flat.values()), flat
    assert (flat["faithfulness.real.n"], flat["faithfulness.aldm.n"], flat["faithfulness.gan.n"]) == (2, 3, 2)
    assert faithfulness_metrics(written) == flat  # the file read back gives the same numbers
    pattern = metric_key_pattern(["aldm", "gan"])
    assert all(re.fullmatch(pattern, k) for k in flat)
    for key in ("faithfulness.X0.dice_mean", "faithfulness.noadapt.n", "faithfulness.real.dice_gap",
                "faithfulness.aldm.dice_per_case", "faithfulness..n"):
        assert not re.fullmatch(pattern, key), key

    # A repeated call reads the finished segmenter back: the same numbers; one set alone, or
    # none (the real test cases only), is measured by the same segmenter.
    mtime = (tmp_path / "segmenter" / "run.json").stat().st_mtime_ns
    again = faithfulness(settings(steps=3), train, test, {"aldm": syn, "gan": other}, tmp_path, seed=0, device=CPU)
    assert again == result
    single = faithfulness(settings(steps=3), train, test, syn, tmp_path, seed=0, device=CPU)
    assert list(single["synthetic"]) == ["synthetic"] and single["synthetic"]["synthetic"] == result["synthetic"]["aldm"]
    real_only = faithfulness(settings(steps=3), train, test, {}, tmp_path, seed=0, device=CPU)
    assert real_only["synthetic"] == {} and real_only["real"] == result["real"]
    assert set(faithfulness_metrics(real_only)) == {"faithfulness.n_train", "faithfulness.real.dice_mean",
                                                    "faithfulness.real.n"}
    assert (tmp_path / "segmenter" / "run.json").stat().st_mtime_ns == mtime  # not retrained


def test_guards_refuse_leakage_and_items_in_the_wrong_list(tmp_path: Path) -> None:
    train, test, syn = _sets()
    cases = {
        "patient leakage": (train, [*test, blob("T0", 0)], syn),           # a test patient trained on
        "trains on real cases only": ([*train, syn[0]], test, syn[1:]),    # a synthetic item in training
        "passed as test data": (train, [*test, syn[0]], syn[1:]),          # a synthetic test item
        "synthetic set 'synthetic' holds real": (train, test, [*syn, blob("R9", 9)]),  # a real item as synthetic
        "set name": (train, test, {"Bad name": syn}),                      # a name that cannot be a metric name
        "synthetic set 'gan': no volumes": (train, test, {"aldm": syn, "gan": []}),
    }
    for message, (tr, te, sy) in cases.items():
        with pytest.raises(ValueError, match=message):
            faithfulness(settings(), tr, te, sy, tmp_path / "run", device=CPU)
    clash = blob("T1", 90, synthetic=True)  # a synthetic item under a training patient's id
    with pytest.raises(ValueError, match="patient leakage"):
        faithfulness(settings(), train, test, [clash], tmp_path / "run", device=CPU)
    assert not (tmp_path / "run").exists()  # refused before anything trained


def test_config_group_composes_and_is_validated() -> None:
    default = FaithfulnessSettings.from_mapping(compose().faithfulness)
    tiny = FaithfulnessSettings.from_mapping(compose(["experiment=tiny"]).faithfulness)
    assert default.train.patch_size == 64 and default.network.divisor == 8
    assert tiny.train.steps == 10 and tiny.roi_size((32, 32, 32)) == (32, 32, 32)
    assert default.roi_size((32, 32, 32)) == (32, 32, 32)  # the patch is clamped to the volume
    with pytest.raises(ValueError, match="faithfulness.train.patch_size"):
        FaithfulnessSettings.from_mapping(settings(patch_size=10) | {"network": {
            "channels": [4, 8, 16], "num_res_units": 0, "norm": "instance", "dropout": 0.0}})
    with pytest.raises(ValueError, match="faithfulness.train.pos_fraction"):
        FaithfulnessSettings.from_mapping(settings(pos_fraction=1.5))
    assert default.enabled and tiny.enabled
    with pytest.raises(ValueError, match="faithfulness.enabled: expected true/false"):
        FaithfulnessSettings.from_mapping(settings() | {"enabled": "yes"})
    with pytest.raises(ValueError, match="faithfulness.eval.typo: unknown key"):
        cfg = settings()
        FaithfulnessSettings.from_mapping(cfg | {"eval": {**cfg["eval"], "typo": 1}})
