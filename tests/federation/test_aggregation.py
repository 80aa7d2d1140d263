"""Robust aggregation: the aggregators, the norm-outlier rule, PhaseFedAvg on fake replies, and the
hello phase's check that a site can serve the run. No Flower process is started."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from aldm_fed.config import compose
from aldm_fed.federation.aggregation import (
    RobustSettings,
    aggregate_arrays,
    norm_outliers,
    trimmed_count,
    update_norms,
)
from aldm_fed.federation.compatibility import (
    encode_shapes,
    model_shapes,
    shapes_fingerprint,
)
from aldm_fed.federation.sharing import PROTOCOL
from aldm_fed.federation.strategy import FederationError, PhaseFedAvg

NODES = {11: "A", 12: "B", 13: "C", 14: "D"}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity a ServerApp process has (Flower stamps it on every Message it builds)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def content(values: dict[str, np.ndarray], n: int = 1) -> RecordDict:
    arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})


def scalars(*values: float, weights: tuple[int, ...] | None = None) -> list[RecordDict]:
    weights = weights or (1,) * len(values)
    return [content({"vae.w": np.full(3, v)}, n) for v, n in zip(values, weights, strict=True)]


# ------------------------------------------------------------------------------ aggregators


def test_median_of_1_2_100_is_2() -> None:
    out = aggregate_arrays(scalars(1, 2, 100), "median")
    np.testing.assert_array_equal(out["vae.w"].numpy(), [2, 2, 2])


def test_trimmed_mean_cuts_floor_fraction_times_n_from_each_end() -> None:
    four = scalars(1, 2, 3, 100)
    # floor(0.25 x 4) = 1 from each end: mean(2, 3)
    np.testing.assert_allclose(aggregate_arrays(four, "trimmed_mean", trim_fraction=0.25)["vae.w"].numpy(), 2.5)
    # floor(0.2 x 4) = 0: nothing cut, the plain mean
    np.testing.assert_allclose(aggregate_arrays(four, "trimmed_mean", trim_fraction=0.2)["vae.w"].numpy(), 26.5)
    assert trimmed_count(3, 0.34) == 1 and trimmed_count(3, 0.25) == 0
    # n = 3 with the default fraction: the median
    np.testing.assert_allclose(aggregate_arrays(scalars(1, 2, 100), "trimmed_mean")["vae.w"].numpy(), 2.0)


def test_weighted_fedavg_equals_flowers() -> None:
    replies = scalars(0.0, 4.0, weights=(1, 3))
    ours = aggregate_arrays(replies, "fedavg")["vae.w"].numpy()
    np.testing.assert_allclose(ours, 3.0)  # (0 x 1 + 4 x 3) / 4
    instructions = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
    flower, _ = FedAvg().aggregate_train(1, [Message(c, reply_to=m) for c, m in zip(replies, instructions)])
    np.testing.assert_array_equal(ours, flower["vae.w"].numpy())


def test_aggregate_rejects_unknown_method_and_empty() -> None:
    with pytest.raises(ValueError, match="fed.aggregation"):
        aggregate_arrays(scalars(1), "krum")
    with pytest.raises(ValueError, match="nothing to aggregate"):
        aggregate_arrays([], "median")


# ------------------------------------------------------------------------- the outlier rule


def test_update_norms_per_group_against_the_global_weights() -> None:
    ref = content({"vae.a": np.zeros(2), "unet.b": np.ones(1)})["arrays"]
    site = content({"vae.a": np.array([3.0, 4.0]), "unet.b": np.array([3.0])})["arrays"]
    assert update_norms(site, ref) == pytest.approx({"vae": 5.0, "unet": 2.0})


def test_norm_rule_rejects_x100_and_needs_three_updates() -> None:
    norms = {"A": {"vae": 1.0}, "B": {"vae": 1.3}, "C": {"vae": 100.0}}
    out = norm_outliers(norms, 5.0)
    assert list(out) == ["C"] and "norm_factor=5" in out["C"]
    # any group counts: C is normal in vae but wild in unet
    assert list(norm_outliers({s: {**n, "unet": 1.0} for s, n in norms.items()} | {"C": {"vae": 1.1, "unet": 90.0}}, 5.0)) == ["C"]
    # with 2 updates the median is their mean: no verdict (documented behaviour)
    assert norm_outliers({"A": {"vae": 1.0}, "C": {"vae": 100.0}}, 5.0) == {}


def test_settings_from_config_and_their_errors() -> None:
    cfg = compose(["experiment=tiny"])
    settings = RobustSettings.from_cfg(cfg.fed)
    assert settings.aggregation == "fedavg" and settings.norm_check
    assert RobustSettings.from_cfg({"aggregation": "median", "robust": {"norm_factor": None}}) == \
        RobustSettings("median", None, RobustSettings().trim_fraction)
    with pytest.raises(ValueError, match="fed.aggregation"):
        RobustSettings(aggregation="mean")
    with pytest.raises(ValueError, match="trim_fraction"):
        RobustSettings(trim_fraction=0.5)
    with pytest.raises(ValueError, match="norm_factor"):
        RobustSettings(norm_factor=0.5)


# ------------------------------------------------------------ PhaseFedAvg on fake replies


def run_round(
    updates: dict[int, dict[str, np.ndarray] | None], robust: RobustSettings, min_replies: int = 1
) -> tuple[ArrayRecord, list[str]]:
    """One round of PhaseFedAvg: global weights 0, the given site weights as replies."""
    shapes = {"vae.w": (4,), "vae.b": (2,)}
    rounds: list[tuple[int, list[str]]] = []
    strategy = PhaseFedAvg("vae", {n: NODES[n] for n in updates}, expected=shapes,
                           on_round=lambda rnd, a, m, used: rounds.append((rnd, used)),
                           min_replies=min_replies, robust=robust)
    glob = content({k: np.zeros(s) for k, s in shapes.items()})["arrays"]
    instructions = strategy.configure_train(1, glob, ConfigRecord(), None)  # type: ignore[arg-type]
    replies = [Message(content(updates[m.metadata.dst_node_id] or {}, n=2), reply_to=m) for m in instructions]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert rounds and rounds[0][0] == 1
    return arrays, rounds[0][1]


def honest(scale: float) -> dict[str, np.ndarray]:
    return {"vae.w": np.array([1.0, -1.0, 0.5, 0.0]) * scale, "vae.b": np.array([0.2, 0.1]) * scale}


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_phase_rejects_x100_and_nan_naming_the_site_and_aggregates_the_rest(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad_nan = honest(1.0)
    bad_nan["vae.w"][1] = math.nan
    updates = {11: honest(1.0), 12: honest(1.2), 13: honest(100.0), 14: bad_nan}
    with caplog.at_level(logging.WARNING, logger="aldm_fed.federation.strategy"):
        arrays, used = run_round(updates, RobustSettings(aggregation=method))
    assert used == ["A", "B"]
    assert "rejected the update of site C: update norm" in caplog.text
    assert "rejected the update of site D" in caplog.text and "NaN" in caplog.text
    # what is left (A and B, equal weights): mean, median and trimmed mean all give 1.1 x honest
    np.testing.assert_allclose(arrays["vae.w"].numpy(), honest(1.1)["vae.w"], rtol=1e-6)


def test_phase_without_the_norm_rule_lets_x100_through() -> None:
    _, used = run_round({11: honest(1.0), 12: honest(1.2), 13: honest(100.0)}, RobustSettings(norm_factor=None))
    assert used == ["A", "B", "C"]


def test_phase_with_two_updates_keeps_both_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aldm_fed.federation.strategy"):
        arrays, used = run_round({11: honest(1.0), 13: honest(100.0)}, RobustSettings())
    assert used == ["A", "C"]  # documented: with 2 updates the outlier cannot be told apart
    assert "cannot be told apart" in caplog.text and "(A 1.517, C 151.7)" in caplog.text  # sqrt(2.3), x100
    np.testing.assert_allclose(arrays["vae.w"].numpy(), honest(50.5)["vae.w"], rtol=1e-6)


def test_phase_rejections_below_min_replies_stop_the_run() -> None:
    with pytest.raises(FederationError, match=r"fewer than fed.min_replies=3.*\['C'\]"):
        run_round({11: honest(1.0), 12: honest(1.2), 13: honest(100.0)}, RobustSettings(), min_replies=3)


# ------------------------------------------------------------------- hello: can it serve?


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose(["experiment=tiny"])


def fake_site(tmp_path, modalities=("t1n", "t1c", "t2w", "t2f", "seg")):
    """A site with two cases whose files exist by name only (hello reads no file)."""
    from aldm_fed.data.manifest import SiteManifest, write_manifest
    from aldm_fed.federation.site import Site

    cohort = tmp_path / "cohort"
    for case in ("c1", "c2"):
        folder = cohort / "A" / case
        folder.mkdir(parents=True)
        for suffix in modalities:
            (folder / f"{case}-{suffix}.nii.gz").write_bytes(b"")
    write_manifest(SiteManifest("A", "../A", {"source": ["c1"], "target": ["c2"]}), cohort / "manifests" / "A.json")
    return Site("A", cohort, tmp_path / "state")


def server_hello(cfg) -> ConfigRecord:
    shapes = model_shapes(cfg)
    return ConfigRecord({"phase": "hello", "protocol": PROTOCOL, "model-sha256": shapes_fingerprint(shapes),
                         "model-shapes": encode_shapes(shapes)})


def test_hello_reports_the_model_fingerprint_when_it_matches(tiny_cfg, tmp_path) -> None:
    from aldm_fed.federation.site import hello

    request = server_hello(tiny_cfg)
    reply = hello(fake_site(tmp_path), tiny_cfg, request)
    assert reply["config"]["model-sha256"] == request["model-sha256"]
    assert dict(reply["metrics"]) == {"n-source": 1, "n-target": 1, "n-test": 0}


def test_hello_names_the_site_and_the_differing_key(tiny_cfg, tmp_path) -> None:
    from aldm_fed.federation.site import hello

    shapes = model_shapes(tiny_cfg)
    key = next(k for k in shapes if k.startswith("vae.") and len(shapes[k]) == 5)
    shapes[key] = (shapes[key][0] * 2, *shapes[key][1:])  # a server whose code builds a wider layer
    request = ConfigRecord({"phase": "hello", "protocol": PROTOCOL, "model-sha256": shapes_fingerprint(shapes),
                            "model-shapes": encode_shapes(shapes)})
    with pytest.raises(FederationError, match=rf"site A: .* 1 key\(s\), first {key}: "):
        hello(fake_site(tmp_path), tiny_cfg, request)


def test_hello_refuses_data_without_the_run_modalities(tiny_cfg, tmp_path) -> None:
    from aldm_fed.federation.site import hello

    site = fake_site(tmp_path, modalities=("t1n", "t2w", "t2f", "seg"))  # no t1c
    with pytest.raises(FederationError, match=r"site A: its data cannot serve this run.*case c1: no t1c file"):
        hello(site, tiny_cfg, server_hello(tiny_cfg))


def test_model_shapes_match_the_weights_the_server_builds(tiny_cfg) -> None:
    from aldm_fed.federation.global_models import initial_weights

    real = {f"{g}.{k}": tuple(t.shape) for g, sd in initial_weights(tiny_cfg, "vae").items() for k, t in sd.items()}
    shapes = model_shapes(tiny_cfg)
    assert {k: v for k, v in shapes.items() if k.startswith("vae.")} == real
    assert json.loads(encode_shapes(shapes))[next(iter(real))] == list(real[next(iter(real))])


# ---------------------------------------------------------------------------- the benchmark


def test_benchmark_table_shows_the_checks_at_work(tmp_path, capsys) -> None:
    """benchmarks/aggregation.py runs on the tiny VAE; qualitative facts only (no figure asserted):
    a clean round is FedAvg itself, a x100 site ruins raw FedAvg but is rejected by the checks."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "aggregation.py"
    spec = importlib.util.spec_from_file_location("bench_aggregation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    assert module.main(["--experiment", "tiny", "--sites", "3", "--repeats", "1", "--out", str(out)]) == 0
    rows = {(r["attack"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 12 and "| x100 | median |" in capsys.readouterr().out
    assert rows["clean", "fedavg"]["raw_rel_distance"] == 0.0
    x100 = rows["x100", "fedavg"]
    assert x100["kept_sites"] == 2 and x100["checked_rel_distance"] < 1.0 < x100["raw_rel_distance"]
    assert rows["nan", "median"]["kept_sites"] == 2 and math.isnan(rows["nan", "fedavg"]["raw_rel_distance"])


class HelloGrid:
    """A Grid whose one node is site A answering with `site.hello` under its own config."""

    def __init__(self, site, site_cfg, tamper=None) -> None:  # noqa: ANN001
        self.site, self.site_cfg, self.tamper = site, site_cfg, tamper

    def get_node_ids(self) -> list[int]:
        return [11]

    def send_and_receive(self, messages, timeout):  # noqa: ANN001, ANN201
        from flwr.app import Error

        from aldm_fed.federation.site import hello

        out = []
        for msg in messages:
            try:
                content = hello(self.site, self.site_cfg, msg.content["config"])
                if self.tamper:
                    content["config"]["model-sha256"] = self.tamper
                out.append(Message(content, reply_to=msg))
            except FederationError as exc:  # how Flower hands a ClientApp exception to the server
                out.append(Message(Error(code=0, reason=f"Exception ClientAppException occurred. Message: {exc}"),
                                   reply_to=msg))
        return out


def test_roll_call_stops_at_connection_time_on_mismatched_networks(tiny_cfg, tmp_path) -> None:  # noqa: ANN001
    from aldm_fed.federation.coordinator import _roll_call

    server_cfg = tiny_cfg.copy()
    server_cfg.fed.sites = ["A"]
    site = fake_site(tmp_path)
    (info,) = _roll_call(HelloGrid(site, server_cfg), server_cfg).values()
    assert (info.name, info.n_source, info.n_target) == ("A", 1, 1)
    # the site's code builds a wider VAE from the run config: it names itself and the key
    other = server_cfg.copy()
    other.model.vae.channels = [8, 16, 32]
    with pytest.raises(FederationError, match=r"node 11 failed the roll call: site A: .* first vae\.\S+: \("):
        _roll_call(HelloGrid(site, other), server_cfg)
    # a site that skips its own check is caught by the server's fingerprint comparison
    with pytest.raises(FederationError, match="site A builds the shared networks with other shapes"):
        _roll_call(HelloGrid(site, server_cfg, tamper="0" * 64), server_cfg)
    # a bad fed.aggregation fails before any site is asked
    server_cfg.fed.aggregation = "mean"
    with pytest.raises(ValueError, match="fed.aggregation='mean'"):
        _roll_call(HelloGrid(site, server_cfg), server_cfg)


def test_an_error_the_superlink_makes_is_filed_under_the_site_it_was_sent_to() -> None:
    # The SuperLink answers for a vanished node with an error from its own node id (1).
    from flwr.app import Error

    from aldm_fed.federation.strategy import replies_by_node

    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    for i, m in enumerate(sent):  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id-{i}"
    ok = Message(RecordDict(), reply_to=sent[0])
    lost = Message(Error(code=0, reason="node unavailable"), reply_to=sent[1])
    lost.metadata.__dict__["_src_node_id"] = 1
    by_node = replies_by_node(sent, [ok, lost])
    assert set(by_node) == {11, 12} and by_node[12].has_error()
