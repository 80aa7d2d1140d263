"""Classifier factories, the training stage and the regimes on tiny hand-made 32^3 data where the
tumour is a bright blob, so a tiny CNN learns the slice task in a few dozen steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from aldm_fed.config import compose
from aldm_fed.evaluation import regimes
from aldm_fed.evaluation.regimes import (
    RESULTS_FILE,
    ClassifierSettings,
    run_regime,
    run_regimes,
    select_synthetic,
)
from aldm_fed.evaluation.tasks import CaseItem, slice_task
from aldm_fed.models.classifier import build_classifier
from aldm_fed.training.classifier import AugmentConfig, build_augmentation, class_weights
from aldm_fed.training.device import resolve_device

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "classifier"
CPU = resolve_device("cpu", "fp32")
SIZE = 32


def blob_case(i: int, *, synthetic: bool = False, tumour: bool = True, seed: int = 0,
              source: str | None = None) -> CaseItem:
    """A 2-channel 32^3 'brain' sphere with noise and, if `tumour`, a bright blob (radius 4)."""
    rng = np.random.default_rng([seed, i, int(synthetic)])
    x, y, z = np.mgrid[:SIZE, :SIZE, :SIZE]
    c = (SIZE - 1) / 2
    brain = (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= 13**2
    img = np.where(brain, 0.4 + 0.05 * rng.standard_normal(brain.shape), 0.0).astype(np.float32)
    seg = np.zeros(brain.shape, dtype=np.uint8)
    if tumour:
        cx, cy, cz = rng.integers(11, 21, 3)
        seg[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 16] = 2
        img[seg > 0] = 0.9
    image = np.stack([img, 0.8 * img]).clip(0, 1)
    group = f"syn-{i:03d}" if synthetic else f"P{i:03d}"
    return CaseItem(image=image, seg=seg, group=group, label=int(tumour), synthetic=synthetic,
                    source_groups=(source,) if source else ())


ALEX_TINY = {"channels": [8, 16, 16, 16], "hidden": 16, "dropout": 0.0, "stem_kernel": 3, "stem_stride": 1}


def slice_cfg(steps: int = 60, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "slice",
        "slice": {"min_brain_fraction": 0.05},
        "network": {"name": "alexlite", "spatial_dims": 2, "alexlite": ALEX_TINY},
        "train": {"steps": steps, "batch_size": 16, "lr": 3e-3, "log_every": 10},
        "regimes": ["real_only"],
        "seeds": [0],
        "eval": {"n_boot": 100},
    }
    cfg.update(over)
    return cfg


REAL = [blob_case(i) for i in range(4)]
SYN = [blob_case(100 + i, synthetic=True) for i in range(6)]
TEST = [blob_case(50 + i) for i in range(4)]


# ------------------------------------------------------------------------------ networks


@pytest.mark.parametrize(
    "network, shape",
    [
        ({"name": "alexlite", "spatial_dims": 2, "alexlite": ALEX_TINY}, (3, 2, 32, 32)),
        ({"name": "densenet", "spatial_dims": 2,
          "densenet": {"init_features": 8, "growth_rate": 4, "block_config": [2, 2]}}, (3, 2, 32, 32)),
        ({"name": "resnet", "spatial_dims": 2,
          "resnet": {"layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8]}}, (3, 2, 32, 32)),
        ({"name": "resnet", "spatial_dims": 3,
          "resnet": {"layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8]}}, (2, 2, 16, 16, 16)),
        ({"name": "densenet", "spatial_dims": 3,
          "densenet": {"init_features": 8, "growth_rate": 4, "block_config": [2, 2]}}, (2, 2, 16, 16, 16)),
    ],
)
def test_build_classifier_one_logit(network: dict[str, Any], shape: tuple[int, ...]) -> None:
    model = build_classifier(network, in_channels=2)
    assert model(torch.rand(shape)).shape == (shape[0],)


def test_paper_alexlite_takes_small_and_large_slices() -> None:
    cfg = OmegaConf.load(CONFIGS / "slice.yaml").network
    model = build_classifier(cfg, 3).eval()
    for side in (32, 112):
        assert model(torch.rand(2, 3, side, side)).shape == (2,)


def test_build_classifier_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"classifier.network.name: expected one of"):
        build_classifier({"name": "alexnet", "spatial_dims": 2}, 1)
    with pytest.raises(ValueError, match="alexlite takes 2"):
        build_classifier({"name": "alexlite", "spatial_dims": 3, "alexlite": ALEX_TINY}, 1)
    with pytest.raises(ValueError, match=r"classifier.network.alexlite.hidden: missing"):
        build_classifier({"name": "alexlite", "spatial_dims": 2,
                          "alexlite": {k: v for k, v in ALEX_TINY.items() if k != "hidden"}}, 1)
    with pytest.raises(ValueError, match=r"classifier.network.resnet.layers: MONAI ResNet takes 4"):
        build_classifier({"name": "resnet", "spatial_dims": 3,
                          "resnet": {"layers": [1, 1], "block_inplanes": [4, 8, 8, 8]}}, 1)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name, task, dims", [("slice", "slice", 2), ("volume", "volume", 3)])
def test_shipped_configs_validate_and_compose(name: str, task: str, dims: int) -> None:
    settings = ClassifierSettings.from_mapping(compose([f"classifier={name}"]).classifier)
    assert settings.task == task and settings.network["spatial_dims"] == dims
    assert settings.regimes == ("real_only", "real_aug", "real_syn", "syn_only", "oracle")
    assert len(settings.seeds) >= 3 and settings.n_boot >= 1000
    # Switching family is one override; the MONAI alternative builds too.
    other = compose([f"classifier={name}", "classifier.network.name=densenet"]).classifier
    shape = (2, 3, 32, 32) if dims == 2 else (2, 3, 16, 16, 16)
    assert build_classifier(other.network, 3).eval()(torch.rand(shape)).shape == (2,)


def test_settings_errors() -> None:
    bad_dims = slice_cfg(network={"name": "resnet", "spatial_dims": 3,
                                  "resnet": {"layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8]}})
    with pytest.raises(ValueError, match="slice task needs 2"):
        ClassifierSettings.from_mapping(bad_dims)
    with pytest.raises(ValueError, match="classifier.regimes"):
        ClassifierSettings.from_mapping(slice_cfg(regimes=["real_only", "gan"]))
    with pytest.raises(ValueError, match="unknown key"):
        ClassifierSettings.from_mapping(slice_cfg(train={"steps": 1, "batch_size": 2, "lr": 1e-3, "epochs": 3}))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        ClassifierSettings.from_mapping(slice_cfg(train={"steps": 1, "batch_size": 1, "lr": 1e-3}))
    vol = OmegaConf.to_container(OmegaConf.load(CONFIGS / "volume.yaml"))
    vol["volume"]["label_map"] = {"HGG": 2}
    with pytest.raises(ValueError, match="label_map"):
        ClassifierSettings.from_mapping(vol)


# ------------------------------------------------------------------------------ training parts


def test_augmentation_is_seeded_and_keeps_range() -> None:
    aug = build_augmentation(AugmentConfig(affine_prob=1.0, intensity_prob=1.0), (2, SIZE, SIZE))
    x = torch.from_numpy(slice_task([REAL[0]]).inputs([16])[0])
    a, b, c = aug(x.clone(), 1), aug(x.clone(), 1), aug(x.clone(), 2)
    assert a.shape == x.shape and type(a) is torch.Tensor
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1
    aug3d = build_augmentation(AugmentConfig(), (2, 16, 16, 16))
    assert aug3d(torch.rand(2, 16, 16, 16), 0).shape == (2, 16, 16, 16)
    with pytest.raises(ValueError, match="flip_axes"):
        build_augmentation(AugmentConfig(flip_axes=(2,)), (2, SIZE, SIZE))


def test_class_weights_balance_the_classes() -> None:
    w0, w1 = class_weights(np.array([0, 0, 0, 1]))
    assert (3 * w0, 1 * w1) == (pytest.approx(2.0), pytest.approx(2.0))
    assert class_weights(np.array([0, 1, 1]), balanced=False) == (1.0, 1.0)
    with pytest.raises(ValueError, match="one class only"):
        class_weights(np.array([1, 1]))


# ------------------------------------------------------------------------------ regimes


def test_tiny_regime_learns_the_blob_and_writes_results(tmp_path: Path) -> None:
    result = run_regime("real_only", REAL, SYN, TEST, slice_cfg(), tmp_path / "r", seed=0, device=CPU)
    assert result.metrics["auc"]["value"] > 0.85
    assert result.metrics["resample_unit"] == "group" and result.metrics["n_groups"] == 4
    assert (result.n_train_cases_real, result.n_train_cases_syn, result.steps) == (4, 0, 60)
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["metrics"]["auc"]["value"] == pytest.approx(result.metrics["auc"]["value"])
    assert saved["identity"]["train_groups"] == ["P000", "P001", "P002", "P003"]
    preds = json.loads((tmp_path / "r" / "predictions.json").read_text())
    assert set(preds["groups"]) == {"P050", "P051", "P052", "P053"}
    np.testing.assert_allclose(preds["y_score"], result.y_score)
    # A finished run is reloaded, not retrained (a deterministic retrain would give the same
    # scores, so: no training call, and its files untouched).
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(regimes, "train_classifier", lambda *a, **k: pytest.fail("a finished regime trained again"))
        again = run_regime("real_only", REAL, SYN, TEST, slice_cfg(), tmp_path / "r", seed=0, device=CPU)
    np.testing.assert_array_equal(again.y_score, result.y_score)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()} == files


def test_run_regimes_table_and_json(tmp_path: Path) -> None:
    oracle = [blob_case(200 + i) for i in range(6)]
    cfg = slice_cfg(steps=3, regimes=["real_only", "real_aug", "real_syn", "syn_only", "oracle"],
                    syn_ratio=1.5, seeds=[0, 1])
    rows = run_regimes(REAL, SYN, TEST, cfg, tmp_path, oracle_items=oracle, device=CPU)
    by = {r["regime"]: r for r in rows}
    assert [r["regime"] for r in rows] == ["real_only", "real_aug", "real_syn", "syn_only", "oracle"]
    assert all(r["status"] == "ok" and r["n_seeds"] == 2 for r in rows)
    assert (by["real_syn"]["n_train_cases_real"], by["real_syn"]["n_train_cases_syn"]) == (4, 6)
    assert (by["syn_only"]["n_train_cases_real"], by["syn_only"]["n_train_cases_syn"]) == (0, 6)
    assert by["oracle"]["n_train_cases_real"] == 6
    for r in rows:
        assert r["steps"] == 3 and r["batch_size"] == 16  # same budget everywhere
        assert r["auc_ci_low"] <= r["auc_mean"] <= r["auc_ci_high"]
        assert r["n_test_patients"] == 4
    doc = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert doc["table"] == json.loads(json.dumps(rows))
    assert len(doc["runs"]) == 10 and doc["notes"]["test"] == "held-out real cases only"
    assert (tmp_path / "real_aug" / "seed_1" / "result.json").is_file()
    # Without synthetic volumes or an oracle pool those regimes are skipped, not failed.
    rows = run_regimes(REAL, [], TEST, cfg, tmp_path / "nosyn", regimes=["real_syn", "syn_only", "oracle"],
                       seeds=[0], device=CPU)
    assert [r["status"] for r in rows] == ["skipped"] * 3


def test_volume_regime_runs(tmp_path: Path) -> None:
    cfg = {
        "task": "volume",
        "volume": {"label_column": "grade", "label_map": {"HGG": 1, "LGG": 0}},
        "network": {"name": "resnet", "spatial_dims": 3,
                    "resnet": {"layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8]}},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3},
        "seeds": [0],
        "eval": {"n_boot": 50, "predict_batch_size": 2},
    }
    real = [blob_case(i, tumour=bool(i % 2)) for i in range(4)]
    test = [blob_case(60 + i, tumour=bool(i % 2)) for i in range(4)]
    result = run_regime("real_aug", real, [], test, cfg, tmp_path, seed=0, device=CPU)
    from sklearn.metrics import roc_auc_score

    assert result.metrics["n_samples"] == 4
    # The reported AUC is that of the predictions written next to it (4 volumes, labels 0 1 0 1).
    assert result.y_true.tolist() == [0, 1, 0, 1]
    assert result.metrics["auc"]["value"] == pytest.approx(roc_auc_score(result.y_true, result.y_score))
    assert result.task == "volume" and result.network == "resnet"


def test_bf16_autocast_training_and_prediction(tmp_path: Path) -> None:
    # The device setup decides precision; bf16 autocast must run end to end (CPU: emulated or
    # native), with the loss and the probabilities kept in float32.
    result = run_regime("real_only", REAL[:2], [], TEST[:2], slice_cfg(steps=2), tmp_path, seed=0,
                        device=resolve_device("cpu", "bf16"))
    assert result.y_score.dtype == np.float64 and np.isfinite(result.y_score).all()
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert np.isfinite(json.loads(lines[-1])["loss"])


def test_guards_refuse_bad_splits(tmp_path: Path) -> None:
    cfg = slice_cfg(steps=1)
    with pytest.raises(ValueError, match=r"synthetic item\(s\) passed as test data"):
        run_regime("real_only", REAL, SYN, TEST + [SYN[0]], cfg, tmp_path, seed=0, device=CPU)
    with pytest.raises(ValueError, match=r"patient leakage.*P050"):
        run_regime("real_only", REAL + [TEST[0]], SYN, TEST, cfg, tmp_path, seed=0, device=CPU)
    leaky = [blob_case(300, synthetic=True, source="P051")]
    with pytest.raises(ValueError, match=r"patient leakage.*P051"):
        run_regime("syn_only", REAL, leaky, TEST, cfg, tmp_path, seed=0, device=CPU)
    with pytest.raises(ValueError, match="train_items_syn holds real"):
        run_regime("syn_only", REAL, REAL, TEST, cfg, tmp_path, seed=0, device=CPU)
    with pytest.raises(ValueError, match="only class 0"):
        run_regime("real_only", REAL, SYN, [blob_case(70, tumour=False)], cfg, tmp_path, seed=0, device=CPU)
    with pytest.raises(ValueError, match="unknown regime"):
        run_regime("gan", REAL, SYN, TEST, cfg, tmp_path, seed=0, device=CPU)
    assert not (tmp_path / "train").exists()  # every guard fires before any training


def test_select_synthetic() -> None:
    picked = select_synthetic(SYN, n_real=4, ratio=1.0, seed=0)
    assert len(picked) == 4 and all(it.synthetic for it in picked)
    assert [it.group for it in picked] == [it.group for it in select_synthetic(SYN, 4, 1.0, 0)]
    draws = {tuple(it.group for it in select_synthetic(SYN, 2, 1.0, seed)) for seed in range(6)}
    assert len(draws) > 1  # the seed changes which synthetic volumes join
    assert len(select_synthetic(SYN, n_real=4, ratio=0.5, seed=0)) == 2
    with pytest.raises(ValueError, match="needs 8 synthetic volumes, only 6"):
        select_synthetic(SYN, n_real=4, ratio=2.0, seed=0)


def test_classifier_steps_through_the_shared_optimizer_step(tmp_path: Path, monkeypatch) -> None:
    # fp16 on CUDA needs the GradScaler that `optimizer_step` applies; the classifier must use it.
    from aldm_fed.training import classifier as classifier_module

    calls: list[Any] = []
    real_step = classifier_module.optimizer_step

    def spy(loss, optimizer, params, scaler, grad_clip, **kw):
        calls.append(scaler)
        return real_step(loss, optimizer, params, scaler, grad_clip, **kw)

    monkeypatch.setattr(classifier_module, "optimizer_step", spy)
    run_regime("real_only", REAL[:2], [], TEST[:2], slice_cfg(steps=2), tmp_path, seed=0, device=CPU)
    assert len(calls) == 2 and all(isinstance(s, torch.amp.GradScaler) for s in calls)
    assert not calls[0].is_enabled()  # a no-op off fp16/CUDA


def test_classifier_run_is_not_reused_for_other_content(tmp_path: Path) -> None:
    # Same patient ids, other content (re-synthesised / re-preprocessed): a new run, not a stale one.
    def keyed(items: list[CaseItem], key: str) -> list[CaseItem]:
        return [CaseItem(image=it.image, seg=it.seg, group=it.group, label=it.label, synthetic=it.synthetic,
                         source_groups=it.source_groups, content_key=key) for it in items]

    cfg = slice_cfg(steps=2)
    run_regime("real_only", keyed(REAL[:2], "prep:a"), [], TEST[:2], cfg, tmp_path, seed=0, device=CPU)
    run_regime("real_only", keyed(REAL[:2], "prep:a"), [], TEST[:2], cfg, tmp_path, seed=0, device=CPU)
    with pytest.raises(ValueError, match="different config"):
        run_regime("real_only", keyed(REAL[:2], "prep:b"), [], TEST[:2], cfg, tmp_path, seed=0, device=CPU)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["identity"]["train_content"] == ["P000=prep:a", "P001=prep:a"]
