"""The allow-list of what may leave a site, and the weights <-> Flower record conversion."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from aldm_fed.federation.records import from_array_record, to_array_record
from aldm_fed.federation.sharing import ALLOW_LIST, PHASES, SharingError, check_reply, site_reply


def weights(*groups: str) -> ArrayRecord:
    return to_array_record({g: {"w": torch.ones(2, 3), "b": torch.zeros(3)} for g in groups})


def test_records_round_trip_is_exact_and_float32() -> None:
    state = {"vae": {"w": torch.randn(4, 5), "half": torch.randn(3).to(torch.bfloat16)},
             "unet": {"x": torch.arange(6.0).reshape(2, 3)}}
    back = from_array_record(to_array_record(state))
    assert torch.equal(back["vae"]["w"], state["vae"]["w"]) and torch.equal(back["unet"]["x"], state["unet"]["x"])
    assert back["vae"]["half"].dtype == torch.float32  # FedAvg refuses bfloat16
    with pytest.raises(ValueError, match="expected"):
        from_array_record(to_array_record(state), ("vae",))
    with pytest.raises(ValueError, match="group"):
        to_array_record({"a.b": {"w": torch.ones(1)}})


def test_every_phase_accepts_what_it_should() -> None:
    site_reply("hello", metrics={"n-source": 2, "n-target": 16, "n-test": 8},
               config={"site": "A", "protocol": 1, "version": "0.1.0"})
    site_reply("vae", metrics={"num-examples": 3, "loss": 0.1, "kl": 2.0}, arrays=weights("vae"))
    site_reply("scale", metrics={"num-examples": 3, "latent-count": 10, "latent-sum": 1.0, "latent-sum-sq": 4.0})
    site_reply("backbone", metrics={"num-examples": 3, "loss": 0.1}, arrays=weights("unet", "controlnet"))
    site_reply("local", metrics={"n_test_cases": 4, "real_only.auc_mean": 0.7, "real_syn.f1_ci_low": 0.2,
                                 "real_syn_noadapt.auc_mean": 0.6, "syn_only_gan.n_seeds": 3,
                                 "adapt.loss": 0.3, "synthesis.n_volumes": 8})
    assert set(PHASES) == set(ALLOW_LIST)


@pytest.mark.parametrize(
    ("phase", "kwargs", "match"),
    [
        # a case id or a path as a metric name
        ("local", {"metrics": {"BraTS-GLI-00012.auc": 0.5}}, "allow-list"),
        ("local", {"metrics": {"real_only./data/A/case1": 0.5}}, "allow-list"),
        # a domain-shift row names another site: single-machine only, never sent
        ("local", {"metrics": {"shift_from_A.auc_mean": 0.5}}, "allow-list"),
        ("local", {"metrics": {"real_syn_mybaseline.auc_mean": 0.5}}, "allow-list"),
        ("vae", {"metrics": {"num-examples": 1, "case_00012": 1.0}, "arrays": weights("vae")}, "allow-list"),
        # non-finite or non-scalar values
        ("local", {"metrics": {"n_test_cases": math.nan}}, "finite"),
        ("local", {"metrics": {"n_test_cases": [1, 2]}}, "finite"),
        # the site's own ControlNet, the discriminator, or any group in the wrong phase
        ("vae", {"metrics": {"num-examples": 1}, "arrays": weights("vae", "disc")}, "only"),
        ("backbone", {"metrics": {"num-examples": 1}, "arrays": weights("unet")}, "only"),
        ("local", {"metrics": {"n_test_cases": 1}, "arrays": weights("controlnet")}, "may not leave"),
        # strings outside the hello phase, or unknown hello fields
        ("local", {"metrics": {"n_test_cases": 1}, "config": {"site": "A"}}, "may not leave"),
        ("hello", {"metrics": {"n-source": 1}, "config": {"site": "A", "path": "/data/A"}}, "may not leave"),
        ("nope", {"metrics": {}}, "unknown phase"),
    ],
)
def test_anything_else_is_refused(phase: str, kwargs: dict, match: str) -> None:
    with pytest.raises(SharingError, match=match):
        site_reply(phase, **kwargs)


def test_server_side_checks_against_the_global_shapes() -> None:
    expected = {"vae.w": (2, 3), "vae.b": (3,)}
    ok = RecordDict({"arrays": weights("vae"), "metrics": MetricRecord({"num-examples": 1})})
    check_reply("vae", ok, expected)
    with pytest.raises(SharingError, match="shape"):
        check_reply("vae", ok, {"vae.w": (3, 2), "vae.b": (3,)})
    with pytest.raises(SharingError, match="missing"):
        check_reply("vae", ok, {**expected, "vae.extra": (1,)})
    bad = to_array_record({"vae": {"w": torch.full((2, 3), math.inf), "b": torch.zeros(3)}})
    with pytest.raises(SharingError, match="NaN or Inf"):
        check_reply("vae", RecordDict({"arrays": bad, "metrics": MetricRecord({"num-examples": 1})}), expected)
    with pytest.raises(SharingError, match="metrics"):
        check_reply("vae", RecordDict({"arrays": weights("vae"), "config": ConfigRecord({"a": "b"})}))

