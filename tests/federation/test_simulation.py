"""The whole federated pipeline through Flower's simulation engine at tiny size: 3 phantom sites
(two with source cases, one without), 1 round per FedAvg phase, then local adaptation,
synthesis and classifiers at each site.

Checks: the run completes and writes the report; the global models are the averaged ones and
changed; each site's ControlNet differs and stays in that site's folder; every reply that left a
site (its audit log) holds only allow-listed groups and metrics, and no case id or path; a rerun
resumes (nothing is retrained).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.config import compose
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import site_manifests
from aldm_fed.federation.apps import OUTGOING_LOG
from aldm_fed.federation.global_models import initial_weights
from aldm_fed.federation.sharing import ALLOW_LIST
from aldm_fed.federation.simulation import simulate

pytestmark = pytest.mark.slow  # Flower's simulation engine (Ray)

TINY_FED = [
    "experiment=tiny",  # the default device (auto): what users get
    "fed.phases.vae.rounds=1", "fed.phases.vae.local_steps=2",
    "fed.phases.backbone.rounds=1", "fed.phases.backbone.local_steps=2",
    "train.controlnet.max_steps=2", "train.controlnet.ckpt_every=2", "synthesis=tiny",
    "classifier.train.steps=4", "classifier.seeds=[0]", "classifier.eval.n_boot=20",
    "classifier.regimes=[real_only,real_syn]",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fed")
    cfg = compose([*TINY_FED, f"paths.cohort={root / 'cohort'}", f"paths.runs={root / 'runs'}"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    pythonpath = os.environ.get("PYTHONPATH")
    status = simulate(cfg, progress=False)
    return {"pythonpath": pythonpath, "root": root, "cfg": cfg, "status": status, "runs": root / "runs", "state": root / "runs" / "federation"}


def test_run_completes_and_writes_the_report(run: dict[str, Any]) -> None:
    # Flower's Ray backend sets PYTHONPATH for its actors; simulate puts it back.
    assert run["pythonpath"] == os.environ.get("PYTHONPATH")
    status = run["status"]
    assert status["status"] == "done" and status["sites"] == ["A", "B", "C"]
    report = Path(status["report"]).read_text()
    for site in ("A", "B", "C"):
        assert f"| {site} |" in report
    data = json.loads((run["state"] / "report.json").read_text())
    assert set(data["sites"]) == {"A", "B", "C"}
    # Every site's classifier was tested on its own held-out real cases.
    assert all(s["site"]["n_test_cases"] == 2 for s in data["sites"].values())
    rounds = [(r["phase"], r["round"], r["sites"]) for r in map(json.loads, (run["state"] / "rounds.jsonl").read_text().splitlines())]
    assert rounds == [("vae", 1, ["A", "B"]), ("backbone", 1, ["A", "B"])]
    # Each round's cost (fed.transfer_dtype, benchmarks/federation.py): wall time at the server,
    # each site's own compute time and the weight bytes both ways.
    for line in map(json.loads, (run["state"] / "rounds.jsonl").read_text().splitlines()):
        cost = line["cost"]
        assert cost["transfer_dtype"] == "float32" and cost["params_bytes_fp32"] > 0
        assert 0 < cost["max_compute_s"] < cost["wall_s"] and 0 < cost["overhead_fraction"] < 1
        assert set(cost["sites"]) == {"A", "B"}
        for site in cost["sites"].values():  # float32 on the wire: the parameters plus NumPy headers and names
            assert cost["params_bytes_fp32"] < site["bytes_sent"] == site["bytes_received"] < 1.1 * cost["params_bytes_fp32"]
            assert site["compute_s"] > 0
    assert set(status["cost"]) == {"vae", "backbone"} and status["cost"]["vae"]["rounds"] == 1
    # Flower's own lines are kept next to the run (the terminal shows them only with --verbose).
    flower = (run["state"] / "flower.log").read_text()
    assert "Starting PhaseFedAvg strategy" in flower and "[backbone] round 1" in flower


def test_global_models_are_the_average_and_every_site_has_them(run: dict[str, Any]) -> None:
    cfg, runs = run["cfg"], run["runs"]
    vae = load_checkpoint(runs / "vae" / "final")
    start = initial_weights(cfg, "vae")["vae"]
    assert any(not torch.equal(vae.tensors["vae"][k], start[k]) for k in start)
    assert vae.meta["federated"]["sites"] == ["A", "B"]
    backbone = load_checkpoint(runs / "backbone" / "final")
    assert backbone.meta["sources"]["vae"]["sha256"] == vae.meta["weights"]["sha256"]
    for site in ("A", "B", "C"):  # installed bit for bit, C included (it trained on nothing)
        for stage, ckpt in (("vae", vae), ("backbone", backbone)):
            installed = load_checkpoint(run["state"] / "sites" / site / stage / "final", groups=[])
            assert installed.meta["weights"]["sha256"] == ckpt.meta["weights"]["sha256"]


def test_each_site_controlnet_is_its_own_and_stays_there(run: dict[str, Any]) -> None:
    state = run["state"]
    nets = {s: load_checkpoint(state / "sites" / s / "sites" / s / "controlnet" / "final").tensors["controlnet"]
            for s in ("A", "B", "C")}
    assert not all(torch.equal(nets["A"][k], nets["C"][k]) for k in nets["A"])
    assert not all(torch.equal(nets["A"][k], nets["B"][k]) for k in nets["A"])
    # Nothing site-specific on the server side.
    assert not (run["runs"] / "sites").exists()
    for site in ("A", "B", "C"):
        assert (state / "sites" / site / "sites" / site / "synthesis" / "synthesis.json").is_file()
        others = {"A", "B", "C"} - {site}
        assert not any((state / "sites" / site / "sites" / o).exists() for o in others)


def test_only_allow_listed_weights_and_metrics_left_the_sites(run: dict[str, Any]) -> None:
    cohort, state = run["root"] / "cohort", run["state"]
    case_ids = [c for _, m in site_manifests(cohort).values() for split in ("source", "target", "test") for c in m.cases(split)]
    assert case_ids
    phases_seen = {}
    for site in ("A", "B", "C"):
        raw = (state / "sites" / site / OUTGOING_LOG).read_text()
        for forbidden in [*case_ids, str(run["root"]), "/"]:
            assert forbidden not in raw, f"{forbidden!r} left site {site}"
        for line in map(json.loads, raw.splitlines()):
            rule = ALLOW_LIST[line["phase"]]
            phases_seen.setdefault(site, []).append(line["phase"])
            assert set(line) <= {"time", "phase", "arrays", "metrics", "config"}
            if "arrays" in line:
                assert line["arrays"]["groups"] == sorted(rule.groups)
            assert all(rule.metric_allowed(k) and isinstance(v, int | float) for k, v in line["metrics"].items())
            if "config" in line:
                assert line["phase"] == "hello" and set(line["config"]) <= set(rule.config)
    # Source sites sent weights in both FedAvg phases; site C never did.
    assert phases_seen["A"] == ["hello", "vae", "scale", "backbone", "local"]
    assert phases_seen["C"] == ["hello", "scale", "local"]


def test_a_rerun_resumes_without_retraining(run: dict[str, Any]) -> None:
    state, runs = run["state"], run["runs"]
    before = {p: p.stat().st_mtime_ns for p in [runs / "vae" / "final" / "meta.json",
                                                runs / "backbone" / "final" / "meta.json"]}
    rounds_before = (state / "rounds.jsonl").read_text()
    status = simulate(run["cfg"], progress=False)
    assert status["status"] == "done"
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (state / "rounds.jsonl").read_text() == rounds_before
