"""Privacy options of the shared phases (aldm_fed/federation/privacy.py): settings, the epsilon
accountant, the central-DP wrapper around the real `PhaseFedAvg` (clipping, equal weights, noise
of the right size, the checkpoint sees the noised model), and, slow, a simulated run with DP on
whose audit logs hold only allow-listed records.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from aldm_fed.config import compose
from aldm_fed.federation.privacy import (
    CentralDP,
    DPSettings,
    PrivacySettings,
    epsilon_after,
    releases_before,
    run_privacy,
)
from aldm_fed.federation.strategy import PhaseFedAvg


@pytest.fixture(scope="module")
def cfg() -> Any:
    return compose(["experiment=tiny"])


def _with(cfg: Any, **privacy: Any) -> Any:
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, value in privacy.items():
        OmegaConf.update(out, f"fed.{key}", value)
    return out


def test_defaults_are_off_and_bad_options_are_named(cfg: Any) -> None:
    settings = PrivacySettings.from_config(cfg)
    assert not settings.dp.enabled and not settings.secagg.enabled
    with pytest.raises(ValueError, match=r"fed\.privacy\.dp: unknown option\(s\) \['sigma'\]"):
        PrivacySettings.from_config(_with(cfg, **{"privacy.dp.sigma": 1.0}))
    with pytest.raises(ValueError, match=r"fed\.privacy\.dp\.noise_multiplier must be >= 0"):
        PrivacySettings.from_config(_with(cfg, **{"privacy.dp.noise_multiplier": -1.0}))
    with pytest.raises(ValueError, match=r"fed\.privacy\.dp\.clipping_norm must be > 0"):
        PrivacySettings.from_config(_with(cfg, **{"privacy.dp.clipping_norm": 0.0}))
    with pytest.raises(ValueError, match=r"needs fed\.aggregation=fedavg"):
        PrivacySettings.from_config(_with(cfg, **{"privacy.dp.enabled": True, "aggregation": "median"}))


def test_secagg_options_are_checked_by_name_and_conflicts_are_refused(cfg: Any) -> None:
    on = {"privacy.secagg.enabled": True}
    assert PrivacySettings.from_config(_with(cfg, **on)).secagg.enabled
    with pytest.raises(ValueError, match=r"cannot be combined with fed\.privacy\.dp\.enabled=true"):
        PrivacySettings.from_config(_with(cfg, **on, **{"privacy.dp.enabled": True}))
    with pytest.raises(ValueError, match=r"secagg\.enabled=true needs fed\.aggregation=fedavg, got 'median'"):
        PrivacySettings.from_config(_with(cfg, **on, aggregation="median"))
    for option, value, why in [("num_shares", 2, "must be > 2"), ("num_shares", 0.0, "must be > 0"),
                               ("reconstruction_threshold", 1.5, r"in \(0, 1\]"),
                               ("clipping_range", 0.0, "must be > 0"),
                               ("quantization_range", 2**32, r"in \(0, 2\*\*32\)")]:
        with pytest.raises(ValueError, match=rf"fed\.privacy\.secagg\.{option}: .*{why}"):
            PrivacySettings.from_config(_with(cfg, **{f"privacy.secagg.{option}": value}))


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_is_below_the_classic_rdp_bound() -> None:
    dp = DPSettings(enabled=True, noise_multiplier=1.0, delta=1e-5)
    eps = [epsilon_after(dp, k, 2) for k in (1, 4, 9)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert epsilon_after(DPSettings(noise_multiplier=2.0), 9, 2) < eps[2]
    assert epsilon_after(dp, 0, 2) == 0.0 and math.isinf(epsilon_after(DPSettings(noise_multiplier=0.0), 1, 2))
    # Gaussian RDP (Mironov 2017): k releases -> k*a/(2 z^2) at order a; eps <= RDP + log(1/delta)/(a-1).
    classic = min(9 * a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.01, 64, 20000))
    assert 0.5 * classic < eps[2] <= classic


def test_backbone_releases_follow_the_vae_rounds_and_the_run_reports_epsilon(cfg: Any) -> None:
    on = _with(cfg, **{"privacy.dp.enabled": True})
    vae_rounds, bb_rounds = int(cfg.fed.phases.vae.rounds), int(cfg.fed.phases.backbone.rounds)
    assert releases_before(on, "vae") == 0 and releases_before(on, "backbone") == vae_rounds
    info = run_privacy(on, 2)
    assert info["dp"]["releases"] == vae_rounds + bb_rounds
    assert info["dp"]["epsilon"] == pytest.approx(epsilon_after(PrivacySettings.from_config(on).dp, vae_rounds + bb_rounds, 2))
    assert "epsilon" not in run_privacy(cfg, 2)["dp"]


# ------------------------------------------------------------------------------- the wrapper

SHAPES = {"vae.a": (300, 200), "vae.b": (1000,)}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "loss": 1.0})})
    return Message(content=content, metadata=meta)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages from the server need a run and node id (set by Flower's ServerApp process).
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _round(dp: DPSettings, updates: dict[int, dict[str, np.ndarray]], counts: dict[int, int],
           release_offset: int = 0) -> tuple[dict[str, np.ndarray], list[Any], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    saved: list[Any] = []
    nodes = {1: "A", 2: "B"}

    def build(callback: Any) -> PhaseFedAvg:
        return PhaseFedAvg("vae", nodes, expected=SHAPES, on_round=callback)

    strategy = CentralDP(build, dp, lambda *a: saved.append(a), population=2, releases_before=release_offset)
    record = ArrayRecord({k: Array(v) for k, v in start.items()})
    list(strategy.configure_train(1, record, ConfigRecord({"local-steps": 1}), grid=None))  # type: ignore[arg-type]
    replies = [_reply(n, {k: start[k] + u[k] for k in start}, counts[n]) for n, u in updates.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return start, saved, {k: a.numpy() for k, a in arrays.items()}


def _update(norm: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    total = math.sqrt(sum(float((v**2).sum()) for v in u.values()))
    return {k: v * norm / total for k, v in u.items()}


def test_updates_are_clipped_and_averaged_with_equal_weights(task_identity: None) -> None:
    dp = DPSettings(enabled=True, noise_multiplier=0.0, clipping_norm=1.0)
    ua, ub = _update(10.0, 1), _update(0.5, 2)
    start, saved, out = _round(dp, {1: ua, 2: ub}, {1: 50, 2: 1})
    for k in start:  # A's update scaled to norm 1, B's kept; weights 1:1 (not 50:1)
        expected = start[k] + (ua[k] / 10.0 + ub[k]) / 2
        np.testing.assert_allclose(out[k], expected, atol=2e-6)
    (rnd, _, metrics, used), = saved
    assert rnd == 1 and used == ["A", "B"] and "dp-epsilon" not in metrics  # z = 0: no privacy


def test_noise_has_the_calibrated_std_and_the_checkpoint_gets_the_noised_model(task_identity: None) -> None:
    dp = DPSettings(enabled=True, noise_multiplier=0.5, clipping_norm=2.0)
    ua, ub = _update(1.0, 1), _update(1.0, 2)
    start, saved, out = _round(dp, {1: ua, 2: ub}, {1: 3, 2: 3}, release_offset=4)
    noise = np.concatenate([(out[k] - start[k] - (ua[k] + ub[k]) / 2).ravel() for k in start])
    assert noise.std() == pytest.approx(0.5 * 2.0 / 2, rel=0.02)  # z * C / n
    (_, arrays, metrics, _), = saved
    for k in start:  # what the server saves is exactly what it sends on
        np.testing.assert_array_equal(arrays[k].numpy(), out[k])
    assert metrics["dp-epsilon"] == pytest.approx(epsilon_after(dp, 5, 2))
    assert metrics["dp-noise-std"] == pytest.approx(0.5)


def test_a_rejected_reply_is_left_to_the_strategy_and_the_noise_follows_the_sites_averaged(
    task_identity: None,
) -> None:
    dp = DPSettings(enabled=True, noise_multiplier=0.5, clipping_norm=1.0)
    ua = _update(0.5, 1)
    bad = {k: np.zeros(s[::-1] if len(s) > 1 else (s[0] + 1,)) for k, s in SHAPES.items()}
    rng = np.random.default_rng(0)
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    saved: list[Any] = []
    strategy = CentralDP(lambda cb: PhaseFedAvg("vae", {1: "A", 2: "B"}, expected=SHAPES, on_round=cb),
                         dp, lambda *a: saved.append(a), population=2)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord({}), grid=None))  # type: ignore[arg-type]
    replies = [_reply(1, {k: start[k] + ua[k] for k in start}, 3), _reply(2, bad, 3)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert saved[0][3] == ["A"] and metrics is not None
    assert metrics["dp-noise-std"] == pytest.approx(0.5)  # z * C / 1


# ------------------------------------------------------------------------------- whole run


@pytest.mark.slow
def test_a_simulated_run_with_dp_reports_epsilon_and_only_allow_listed_records_leave_the_sites(tmp_path: Path) -> None:
    from aldm_fed.data.phantom import PhantomConfig, make_cohort
    from aldm_fed.data.volumes import site_manifests
    from aldm_fed.federation.apps import OUTGOING_LOG
    from aldm_fed.federation.sharing import ALLOW_LIST
    from aldm_fed.federation.simulation import simulate

    run_cfg = compose([
        "experiment=tiny", "device=cpu", "fed.phases.vae.rounds=1", "fed.phases.vae.local_steps=2",
        "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
        "fed.phases.local.adapt=false", "fed.phases.local.synthesize=false", "fed.phases.local.evaluate=false",
        "fed.privacy.dp.enabled=true", "fed.privacy.dp.noise_multiplier=1.0", "fed.privacy.dp.clipping_norm=1.0",
        f"paths.cohort={tmp_path / 'cohort'}", f"paths.runs={tmp_path / 'runs'}",
    ])
    make_cohort(tmp_path / "cohort", PhantomConfig.from_mapping(run_cfg.phantom), seed=0, progress=False)
    status = simulate(run_cfg, progress=False)
    assert status["status"] == "done"
    expected = epsilon_after(PrivacySettings.from_config(run_cfg).dp, 2, 2)
    assert status["privacy"]["dp"]["epsilon"] == pytest.approx(expected)
    state = tmp_path / "runs" / "federation"
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["metrics"]["dp-epsilon"] for r in rounds] == pytest.approx([epsilon_after(PrivacySettings.from_config(run_cfg).dp, k, 2) for k in (1, 2)])
    assert json.loads((state / "report.json").read_text())["context"]["privacy"]["dp"]["enabled"] is True
    case_ids = [c for _, m in site_manifests(tmp_path / "cohort").values() for s in ("source", "target", "test") for c in m.cases(s)]
    for site in ("A", "B", "C"):
        raw = (state / "sites" / site / OUTGOING_LOG).read_text()
        assert not any(c in raw for c in case_ids) and str(tmp_path) not in raw
        for line in map(json.loads, raw.splitlines()):
            rule = ALLOW_LIST[line["phase"]]
            assert set(line) <= {"time", "phase", "arrays", "metrics", "config"}
            if "arrays" in line:
                assert line["arrays"]["groups"] == sorted(rule.groups)
            assert all(rule.metric_allowed(k) for k in line["metrics"])
