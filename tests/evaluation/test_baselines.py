"""Generative baselines and domain shift in the evaluation (issue #4): fixed regime names inside the
federated allow-list, the `concat` baseline really without ControlNet, baseline and shift rows
next to the ALDM regimes (shift tested on the target site's real test cases only), the comparison
report, and (slow) `aldm-fed compare` end to end at tiny size.

Hand-made synthetic sets (flipped copies of a site's few-shot cases, written by the synthesis
writer, as in test_site_eval.py) stand in for the generators in the fast tests.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
import torch
from omegaconf import OmegaConf

from aldm_fed.cli import main
from aldm_fed.config import compose
from aldm_fed.data.manifest import read_manifest
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import load_split
from aldm_fed.diffusion.conditioning import conditioning_config
from aldm_fed.diffusion.pipeline import GenerativeModels, generate
from aldm_fed.evaluation.regimes import (
    BASELINE_REGIMES,
    REGIMES,
    SYNTHETIC_BASELINES,
    is_regime,
    order_regimes,
    regime_kind,
    shift_regime,
)
from aldm_fed.evaluation.report import write_report
from aldm_fed.evaluation.site import METRIC_KEY_PATTERN, REGIME_NUMBERS, evaluate_site
from aldm_fed.federation.sharing import ALLOW_LIST
from aldm_fed.models import build_controlnet, build_unet, build_vae, vae_downsample_factor
from aldm_fed.synthesis import case_files, write_labels_csv, write_synthetic_case
from aldm_fed.synthesis import write_manifest as write_syn_manifest
from aldm_fed.synthesis.baselines import baseline_dir, baseline_models

TINY_CLASSIFIER = [
    "classifier.train.steps=3", "classifier.train.batch_size=8", "classifier.train.progress=false",
    "classifier.seeds=[0]", "classifier.eval.n_boot=20",
    "classifier.network.alexlite.channels=[4,8,8,8]", "classifier.network.alexlite.hidden=8",
    "classifier.network.alexlite.dropout=0.0", "classifier.network.alexlite.stem_kernel=3",
]


# --- names ------------------------------------------------------------------------------------

def test_baseline_regime_names_are_fixed_and_inside_the_federated_allow_list():
    assert set(BASELINE_REGIMES) == {f"{r}_{b}" for r in ("real_syn", "syn_only") for b in ("noadapt", "concat", "gan")}
    local = ALLOW_LIST["local"]
    for regime in (*REGIMES, *BASELINE_REGIMES):
        for name in REGIME_NUMBERS:
            key = f"{regime}.{name}"
            assert METRIC_KEY_PATTERN.fullmatch(key) and local.metric_allowed(key), key
    # Domain shift names a site: never a shareable metric.
    for key in ("shift_from_A.auc_mean", "real_syn_other.auc_mean", "real_syn_gan.case_id"):
        assert not METRIC_KEY_PATTERN.fullmatch(key) and not local.metric_allowed(key), key


def test_regime_kinds_and_order():
    assert regime_kind("real_syn_gan") == "real_syn" and regime_kind("syn_only_concat") == "syn_only"
    assert regime_kind(shift_regime("A")) == "real_only" and regime_kind("oracle") == "oracle"
    assert is_regime("shift_from_site-2") and not is_regime("shift_from_") and not is_regime("real_syn_x")
    with pytest.raises(ValueError, match="site name"):
        shift_regime("A/../x")
    with pytest.raises(ValueError, match="unknown regime"):
        regime_kind("real_syn_x")
    assert order_regimes({"shift_from_B", "real_syn_gan", "oracle", "real_syn_noadapt", "real_only",
                          "shift_from_A"}) == ["real_only", "oracle", "real_syn_noadapt", "real_syn_gan",
                                               "shift_from_A", "shift_from_B"]


# --- the concat baseline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models() -> GenerativeModels:
    """Tiny random networks; the zero-initialised ControlNet output blocks and UNet output layer are
    randomised (else every bundle would sample the same)."""
    torch.manual_seed(0)
    cfg = compose(["model/vae=tiny", "model/unet=tiny", "model/controlnet=tiny", "scheduler=ddim"])
    cc = conditioning_config(cfg.model.conditioning)
    latent, factor = int(cfg.model.vae.latent_channels), vae_downsample_factor(cfg.model.vae)
    controlnet = build_controlnet(cfg.model.unet, cfg.model.controlnet, latent, factor,
                                  mask_channels=cc.mask_channels, unet_mask_channels=cc.unet_mask_channels)
    unet = build_unet(cfg.model.unet, latent, cc.unet_mask_channels)
    with torch.no_grad():  # MONAI zero-initialises these (ControlNet residuals, UNet output)
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters(),
                  *unet.out.parameters()]:
            p.normal_(0.0, 0.5)
    return GenerativeModels(
        vae=build_vae(cfg.model.vae, 3), unet=unet,
        controlnet=controlnet, scale_factor=1.0, scheduler_cfg=OmegaConf.to_container(cfg.scheduler),
        conditioning=cc, modalities=["t1", "t2", "flair"], vae_downsample=factor,
        provenance={"controlnet": {"kind": "source"}},
    ).eval()


def _sample(bundle: GenerativeModels, labels: torch.Tensor) -> torch.Tensor:
    side = labels.shape[-1] // bundle.vae_downsample
    noise = torch.randn((1, bundle.unet.in_channels - bundle.conditioning.unet_mask_channels, side, side, side),
                        generator=torch.Generator().manual_seed(1))
    return generate(bundle, labels, num_steps=2, noise=noise)


def test_concat_baseline_samples_as_the_backbone_with_the_controlnet_zeroed(models):
    labels = torch.zeros((1, 16, 16, 16), dtype=torch.long)
    labels[0, 5:10, 6:11, 4:9] = 2
    labels[0, 6:8, 7:9, 5:7] = 3
    concat = baseline_models(models, "concat")
    assert concat.controlnet is None and models.controlnet is not None  # the source bundle is untouched
    assert concat.provenance["baseline"] == "concat"
    zeroed = replace(models, controlnet=copy.deepcopy(models.controlnet))
    with torch.no_grad():
        for p in [*zeroed.controlnet.controlnet_down_blocks.parameters(),
                  *zeroed.controlnet.controlnet_mid_block.parameters()]:
            p.zero_()
    out_concat, out_zeroed = _sample(concat, labels), _sample(zeroed.eval(), labels)
    assert torch.allclose(out_concat, out_zeroed, atol=1e-6)
    # ... and the ControlNet of noadapt does change the output (the comparison can fail).
    noadapt = baseline_models(models, "noadapt")
    assert noadapt.controlnet is models.controlnet
    assert not torch.allclose(_sample(noadapt, labels), out_concat)


def test_the_compare_report_says_whether_concat_samples_a_trained_mode():
    from aldm_fed.evaluation.compare import concat_note

    assert "untrained mode" in concat_note(compose(["experiment=tiny"]))
    fair = concat_note(compose(["experiment=tiny", "+model.conditioning.residual_drop_prob=0.15"]))
    assert "in 15% of its conditioned steps" in fair and "untrained" not in fair


def test_baseline_models_refuse_what_they_cannot_compare(models):
    with pytest.raises(ValueError, match="source bundle"):
        baseline_models(replace(models, provenance={"controlnet": {"kind": "site"}}), "noadapt")
    no_concat = replace(models, conditioning=replace(models.conditioning, concat=False))
    with pytest.raises(ValueError, match="concat=false"):
        baseline_models(no_concat, "concat")
    with pytest.raises(ValueError, match="not a diffusion baseline"):
        baseline_models(models, "gan")


# --- evaluation with baseline sets and domain shift -------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny phantom sites A (2 source, 2 target, 2 test cases) and C (no source cases)."""
    root = tmp_path_factory.mktemp("baselines")
    cfg = compose(["experiment=tiny", "~phantom.sites.B"])
    make_cohort(root / "cohort", PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    return root


def site_cfg(root: Path, *extra: str) -> Any:
    return compose(["experiment=tiny", "device=cpu", f"paths.cohort={root / 'cohort'}",
                    f"paths.cache={root / 'cache'}", f"paths.runs={root / 'runs'}",
                    "classifier.regimes=[real_only,real_syn,syn_only]", "audit.exclude_flagged=false",
                    *TINY_CLASSIFIER, *extra])


def fake_set(cfg: Any, site: str, out: Path, n: int, flip_axis: int) -> None:
    """`n` synthetic cases in `out`: flipped copies of the site's target cases, same ids in every set."""
    target = load_split(cfg, "target", sites=[site], progress=False)
    modalities = list(target.modalities)
    records = []
    for i in range(n):
        j = i % len(target)
        sid, case = f"SYN-{site}-{i:05d}", target.case_ids[j]
        record = {"synth_id": sid, "index": i, "site": site, "source_case": case, "host_case": case,
                  "label": None, "files": case_files(sid, modalities), "extra": {"flip_axis": flip_axis}}
        write_synthetic_case(out, sid, np.flip(target.images[j], flip_axis), np.flip(target.segs[j], flip_axis - 1),
                             np.eye(4), modalities, record)
        records.append(record)
    write_syn_manifest(out, {"complete": True, "site": site, "model": {"modalities": modalities},
                             "settings": {"label_column": "grade"}}, records)
    write_labels_csv(out, records)


@pytest.fixture(scope="module")
def site_c(root: Path):
    cfg = site_cfg(root, "site=C")
    fake_set(cfg, "C", Path(str(cfg.paths.synthesis)), 3, 1)
    fake_set(cfg, "C", baseline_dir(cfg, "C", "noadapt"), 3, 2)
    return evaluate_site(cfg, progress=False, baselines=["noadapt", "concat"], shift_from=["A"])


def test_baseline_and_shift_rows_run_next_to_the_regimes(site_c, root):
    rows = {r["regime"]: r for r in site_c.rows}
    assert list(rows) == ["real_only", "real_syn", "syn_only", "real_syn_noadapt", "syn_only_noadapt",
                          "real_syn_concat", "syn_only_concat", "shift_from_A"]
    ok = {n for n, r in rows.items() if r["status"] == "ok"}
    assert ok == {"real_only", "real_syn", "syn_only", "real_syn_noadapt", "syn_only_noadapt", "shift_from_A"}
    assert any("no concat baseline set" in n for n in site_c.notes)  # its set was never made
    assert any("domain shift" in n and "single machine" in n for n in site_c.notes)
    assert rows["real_syn_noadapt"]["n_train_cases_syn"] == rows["real_syn"]["n_train_cases_syn"] == 2
    assert rows["syn_only_noadapt"]["n_train_cases_syn"] == 3
    # Paired: real_syn_noadapt draws the same synthetic ids as real_syn, from its own set.
    clf = root / "runs" / "sites" / "C" / "classifier"
    ident = {n: json.loads((clf / n / "seed_0" / "result.json").read_text())["identity"]
             for n in ("real_syn", "real_syn_noadapt")}
    assert ident["real_syn"]["train_groups"] == ident["real_syn_noadapt"]["train_groups"]
    assert ident["real_syn"]["train_content"] != ident["real_syn_noadapt"]["train_content"]


def test_domain_shift_trains_on_the_other_site_and_tests_on_this_sites_real_cases_only(site_c, root):
    manifests = {s: read_manifest(root / "cohort" / "manifests" / f"{s}.json") for s in ("A", "C")}
    clf = root / "runs" / "sites" / "C" / "classifier"
    result = json.loads((clf / "shift_from_A" / "seed_0" / "result.json").read_text())
    assert sorted(result["identity"]["train_groups"]) == sorted(manifests["A"].cases("target"))
    assert result["identity"]["augmentation"] is None  # the real_only recipe: no augmentation
    for regime in ("shift_from_A", "real_only"):
        groups = set(json.loads((clf / regime / "seed_0" / "predictions.json").read_text())["groups"])
        assert groups == set(manifests["C"].cases("test")), regime
    metrics = site_c.metrics()
    preds = [json.loads(p.read_text()) for p in sorted((clf / "shift_from_A").glob("seed_*/predictions.json"))]
    assert preds and metrics["shift_from_A.auc_mean"] == pytest.approx(
        np.mean([roc_auc_score(p["y_true"], p["y_score"]) for p in preds]))
    # Everything but the shift rows (and the differences naming them) is shareable under fixed names.
    assert all(METRIC_KEY_PATTERN.fullmatch(k) for k in metrics if "shift_from_" not in k)
    assert not METRIC_KEY_PATTERN.fullmatch("diff.real_only__shift_from_A.auc_mean")
    assert all(math.isfinite(v) for v in metrics.values())


def test_paired_differences_and_faithfulness_cover_each_baseline_set_that_exists(site_c):
    metrics = site_c.metrics()
    pairs = [(d["a"], d["b"]) for d in site_c.differences]
    assert pairs == [("real_syn", "real_only"), ("real_syn", "real_syn_noadapt"), ("syn_only", "syn_only_noadapt"),
                     ("real_only", "shift_from_A")]  # concat: its set was never made, its regimes skipped
    for a, b in pairs:
        assert metrics[f"diff.{a}__{b}.auc_mean"] == pytest.approx(metrics[f"{a}.auc_mean"] - metrics[f"{b}.auc_mean"])
    # One segmenter for the site; Dice on the real test cases, the ALDM set and the noadapt set.
    sets = {k.split(".")[1] for k in metrics if k.startswith("faithfulness.") and k.count(".") == 2}
    assert sets == {"real", "aldm", "noadapt"}
    assert metrics["faithfulness.aldm.n"] == metrics["faithfulness.noadapt.n"] == 3


def test_shift_and_baseline_arguments_are_checked(root):
    cfg = site_cfg(root, "site=C")
    with pytest.raises(ValueError, match="site under test"):
        evaluate_site(cfg, progress=False, shift_from=["C"])
    with pytest.raises(ValueError, match="unknown synthetic baseline"):
        evaluate_site(cfg, progress=False, baselines=["vae"])
    with pytest.raises(ValueError, match="baselines.enabled"):
        evaluate_site(site_cfg(root, "site=C", "baselines.enabled=[noadapt,noadapt]"), progress=False)


def test_the_report_compares_baselines_and_shift(site_c, tmp_path):
    paths = write_report(tmp_path, {"C": site_c.metrics()}, title="compare", context={"ci": 0.95})
    md = paths["md"].read_text()
    assert "## ALDM against the baselines, and the domain-shift gap (AUC)" in md
    assert "| real_syn - real_syn_noadapt |" in md and "| real_only - shift_from_A |" in md
    assert "## Anatomical faithfulness" in md and "| C | noadapt baseline synthetic |" in md
    cells = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in md.splitlines()
             if row.startswith(("| real_syn - real_syn_noadapt |", "| real_only - shift_from_A |"))}
    for a, b in (("real_syn", "real_syn_noadapt"), ("real_only", "shift_from_A")):
        d = next(x for x in site_c.differences if (x["a"], x["b"]) == (a, b))
        assert cells[f"{a} - {b}"].startswith(f"{d['auc_mean']:+.3f}"), cells  # the paired difference
    assert "**Domain shift**" in md and "**Baselines**" in md
    for regime in ("real_syn_noadapt", "syn_only_noadapt", "shift_from_A"):
        assert f"| {regime} |" in md, regime  # a row of the regime x site tables
    data = json.loads(paths["json"].read_text())
    assert data["regimes"][-1] == "shift_from_A" and "real_syn_noadapt" in data["sites"]["C"]["regimes"]
    csv_regimes = [line.split(",")[1] for line in paths["csv"].read_text().splitlines()[1:]]
    assert csv_regimes == data["regimes"]
    html = paths["html"].read_text()
    assert "shift_from_A" in html and "real_syn_noadapt" in html


# --- the one command, end to end --------------------------------------------------------------

@pytest.mark.slow
def test_compare_command_writes_one_report_with_every_regime(tmp_path, capsys):
    """The whole chain at tiny size for sites B and C (minutes on 2 shared cores)."""
    over = ["experiment=tiny", "device=cpu", f"paths.cohort={tmp_path / 'cohort'}", f"paths.cache={tmp_path / 'cache'}",
            f"paths.runs={tmp_path / 'runs'}", "synthesis.num_samples=4", "synthesis.num_steps=10",
            "baselines.enabled=[noadapt,concat,gan]", "train.gan.max_steps=4", "train.gan.ckpt_every=2",
            *TINY_CLASSIFIER]
    with pytest.raises(SystemExit) as info:
        main(["compare", *over, "--sites", "B", "C", "--no-progress"])
    out = capsys.readouterr().out
    assert info.value.code == 0, out
    report = json.loads((tmp_path / "runs" / "compare" / "report.json").read_text())
    expected = {"real_only", "real_aug", "real_syn", "syn_only", *BASELINE_REGIMES}
    for site, others in (("B", {"shift_from_A", "shift_from_C"}), ("C", {"shift_from_A", "shift_from_B"})):
        assert set(report["sites"][site]["regimes"]) >= expected | others, site
    assert "oracle" in report["sites"]["B"]["regimes"]  # B has source cases; C has none
    # The report says whether the concat baseline's mode was trained (here ALDM's recipe: it was not).
    md = (tmp_path / "runs" / "compare" / "report.md").read_text()
    assert "concat_baseline" in md and "samples an untrained mode" in md
    # The baseline sets are paired with the ALDM set: same masks, index by index.
    for site in ("B", "C"):
        syn = tmp_path / "runs" / "sites" / site / "synthesis"
        for b in SYNTHETIC_BASELINES:
            folder = tmp_path / "runs" / "sites" / site / "baselines" / b
            assert (folder / "synthesis.json").is_file() and (folder / "audit.json").is_file(), folder
            for i in range(4):
                ours = next(folder.glob(f"*-{site}-{i:05d}/*-seg.nii.gz"))
                aldm = next(syn.glob(f"SYN-{site}-{i:05d}/*-seg.nii.gz"))
                assert np.array_equal(np.asarray(nib.load(ours).dataobj), np.asarray(nib.load(aldm).dataobj)), ours
    # A rerun reads everything back.
    with pytest.raises(SystemExit) as info:
        main(["compare", *over, "--sites", "B,C", "--no-progress"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "train backbone: already done" in out and "synthesize (concat baseline): already done" in out
