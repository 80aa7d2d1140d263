"""`aldm-fed synthesize` as a library function: new tumour masks -> MRI volumes -> BraTS folders.

Per site, in order:

1. Check the inputs (cases in the cache, known modalities, grid size, sampler) and plan N sample
   indices; sample i takes the mask of `mask_cases[i mod M]` and a host drawn by (seed, i).
2. Skip every sample whose folder is already complete (same settings); refuse to mix in folders
   made with other settings.
3. For the rest, in batches of `batch_size` missing indices: make the masks (`masks.make_masks`),
   draw each sample's initial noise, sample images with `aldm_fed.diffusion.pipeline.generate`
   (DDIM / RFlow, classifier-free guidance), clip to [0, 1], zero outside the host brain, and write
   each case folder atomically.
4. Write `synthesis.json`, `labels.csv` and `montage.png` from every complete folder.

Why the host's brain mask and affine: the generator draws a whole brain from the tumour mask alone
(it is not conditioned on anatomy), and the mask was placed inside the host's brain on the host's
cached grid. Saving with the host's affine puts the synthetic case in the host's space (it overlays
the cached real host voxel for voxel, and the host's source scans in world mm); zeroing voxels
outside the host brain gives it the host's skull-stripped extent, like every cached case (0
outside the brain). The tumour lies inside the host brain by construction, so it is never cut.
Turn it off with `synthesis.mask_outside_brain=false`.

Determinism: masks depend only on (seed, index), and so does each sample's initial latent noise
(`sample_noise`: `SeedSequence([seed, index])`, drawn on the CPU). With the deterministic samplers
(DDIM with eta = 0, the default, and RFlow) a case is therefore the same whatever the batch size,
the device's batch composition or which cases a resumed run still had to make. The stochastic ones
(DDPM, DDIM with eta > 0) also draw noise at every step, from a generator seeded by the batch's
first index: their cases are reproducible for the same batches only.

Each `record.json` (and `synthesis.json`'s `samples`) holds an `extra` object, empty here. The
memorisation audit (`aldm_fed.synthesis.audit`, run by `synthesize_site`) does NOT write there: a
record's hash identifies the case in classifier runs, so the audit keeps its per-sample results in
`audit.json` / `audit.csv` beside the cases instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.data.cache import CacheError, CachedCase, CaseCache
from aldm_fed.diffusion.pipeline import GenerativeModels, generate
from aldm_fed.diffusion.schedulers import default_num_steps
from aldm_fed.models._cfg import as_plain_dict
from aldm_fed.synthesis.audit import AuditResult
from aldm_fed.synthesis.config import SynthesisConfig, synthesis_config
from aldm_fed.synthesis.errors import SynthesisError
from aldm_fed.synthesis.masks import SyntheticMask, make_masks
from aldm_fed.synthesis.montage import MontageRow, write_synthesis_montage
from aldm_fed.synthesis.writer import (
    MONTAGE_NAME,
    case_files,
    modality_suffixes,
    resume_records,
    write_labels_csv,
    write_manifest,
    write_synthetic_case,
)

__all__ = [
    "MANIFEST_VERSION",
    "SynthesisSummary",
    "finish_synthesis",
    "manifest_header",
    "sample_noise",
    "sampling_settings",
    "synth_id",
    "synthesize",
]

MANIFEST_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class SynthesisSummary:
    """What `synthesize` did.

    Args:
        out_dir: the output folder.
        n_made: cases written by this call.
        n_skipped: cases already complete (from an earlier, interrupted or shorter run).
        ids: every synthetic id of the run, in index order.
        seconds: wall time of the call.
        manifest: `synthesis.json`.
        labels_csv: `labels.csv`.
        montage: `montage.png`, or None when `montage_rows` is 0.
        audit: the memorisation audit of the folder (`aldm_fed.synthesis.audit`), when one ran
            (`synthesize_site` runs it; `synthesize` alone does not).
    """

    out_dir: Path
    n_made: int
    n_skipped: int
    ids: list[str]
    seconds: float
    manifest: Path | None = None
    labels_csv: Path | None = None
    montage: Path | None = None
    audit: AuditResult | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        audit = self.audit
        d = asdict(replace(self, audit=None))
        for key in ("out_dir", "manifest", "labels_csv", "montage"):
            d[key] = None if d[key] is None else str(d[key])
        # The audit in short (local output: the ids of flagged volumes included); audit.json has the rest.
        if audit is not None:
            numbers = audit.summary()
            d["audit"] = {"file": str(audit.path), **{k: numbers.get(f"audit.{k}") for k in (
                "n_audited", "n_flagged", "threshold", "ratio_min", "ratio_median")}, "flagged": audit.flagged_ids}
        return d


def synth_id(prefix: str, site: str, index: int) -> str:
    """Id of synthetic sample `index`: `<prefix>-<site>-<index:05d>` (e.g. SYN-A-00003)."""
    return f"{prefix}-{site}-{index:05d}"


def sampling_settings(models: GenerativeModels, cfg: SynthesisConfig) -> dict[str, Any]:
    """The scheduler config, step count and guidance scale that `cfg` asks for on `models`.

    `auto` samples with the scheduler the model was trained with, except DDPM, which samples with
    DDIM (same training schedule, 10-50 steps instead of T). DDPM/DDIM models cannot be sampled
    with RFlow or the other way round: they learn different targets.

    Args:
        models: the bundle (its `scheduler_cfg` is the training scheduler).
        cfg: validated synthesis settings.

    Returns:
        {"sampler", "scheduler" (full config for `build_scheduler`), "num_steps", "guidance_scale"}.

    Raises:
        SynthesisError: a sampler that does not fit the model's training scheduler.
        ValueError: an invalid step count for that sampler (message names the key).
    """
    base = as_plain_dict(models.scheduler_cfg, "scheduler")
    trained = base.get("name")
    if trained not in ("ddpm", "ddim", "rflow"):
        raise SynthesisError(f"model scheduler_cfg.name: unknown training scheduler {trained!r}")
    name = ("ddim" if trained == "ddpm" else trained) if cfg.sampler == "auto" else cfg.sampler
    if (name == "rflow") != (trained == "rflow"):
        raise SynthesisError(
            f"synthesis.sampler={cfg.sampler!r}: the model was trained with {trained!r}; "
            f"{'rflow models sample with rflow' if trained == 'rflow' else 'DDPM/DDIM models sample with ddim or ddpm'}"
        )
    sched = {k: v for k, v in base.items() if k not in ("name", "eta", "variance_type", "num_inference_steps")}
    sched["name"] = name
    if name == "ddim":
        sched["eta"] = cfg.eta if cfg.eta is not None else float(base.get("eta", 0.0))
    elif name == "ddpm":
        sched["variance_type"] = base.get("variance_type", "fixed_small")
    if cfg.num_steps is not None:
        sched["num_inference_steps"] = cfg.num_steps
    try:
        steps = default_num_steps(sched)  # validates the whole config, the step count included
    except ValueError as exc:
        raise SynthesisError(f"synthesis sampler {name!r}: {exc}") from None
    sched["num_inference_steps"] = steps
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else models.conditioning.guidance_scale
    return {"sampler": name, "scheduler": sched, "num_steps": steps, "guidance_scale": float(guidance)}


def _jsonable(obj: Any) -> Any:
    """A JSON round trip (unknown objects as strings): provenance may hold paths or numpy values."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _seed_of(*entropy: int) -> int:
    state = np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def sample_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The initial latent noise of synthetic sample `index`: float32 on the CPU, a function of
    (seed, index) only (`SeedSequence([seed, index])`), so no sample depends on its batch.

    Args:
        seed: the synthesis seed.
        index: the sample index.
        shape: the latent shape of one sample (latent_channels, d, h, w).
    """
    generator = torch.Generator().manual_seed(_seed_of(seed, index))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def _check_inputs(
    cache: CaseCache,
    mask_cases: Sequence[str],
    host_cases: Sequence[str],
    cfg: SynthesisConfig,
    models: GenerativeModels,
    site: str,
    seed: int,
) -> None:
    if not isinstance(site, str) or not site or not all(ch.isalnum() or ch in "_-" for ch in site):
        raise SynthesisError(f"site: expected letters, digits, '-' or '_', got {site!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthesisError(f"seed: expected an integer >= 0, got {seed!r}")
    if not mask_cases:
        raise SynthesisError(
            f"site {site!r}: mask_cases is empty; synthesis needs at least one case with a tumour mask"
        )
    if not host_cases and cfg.host != "same":
        raise SynthesisError(f"site {site!r}: host_cases is empty; give host brains or set synthesis.host=same")
    for what, cases in (("mask", mask_cases), ("host", host_cases)):
        seen: set[str] = set()
        for case in cases:
            if case in seen:
                raise SynthesisError(f"{what} case {case!r} is listed twice")
            seen.add(case)
            if case not in cache:
                raise SynthesisError(f"{what} case {case!r} is not in the cache {cache.root} ({len(cache)} cases)")
    modality_suffixes(models.modalities)  # unknown modality -> SynthesisError naming it
    f = int(models.vae_downsample)
    if f < 1 or cache.size % f:
        raise SynthesisError(f"cache size {cache.size} is not divisible by the VAE downsampling {f}")


def _settings_hash(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def synthesize(
    models: GenerativeModels,
    cache: CaseCache,
    mask_cases: list[str],
    host_cases: list[str],
    labels: dict[str, str] | None,
    out_dir: Path,
    syn_cfg: Mapping[str, Any] | SynthesisConfig,
    *,
    site: str,
    seed: int,
    progress: bool = True,
) -> SynthesisSummary:
    """Make synthetic cases for one site: augmented masks -> generated volumes -> BraTS folders.

    Resumable: a rerun with the same settings skips complete case folders and makes the rest;
    raising `num_samples` (or `per_mask`) and rerunning adds cases without touching earlier ones.

    Args:
        models: the site's generative bundle (networks stay on their device; put them there first).
        cache: the preprocessed cache holding every mask and host case.
        mask_cases: cases whose tumour masks are augmented (the CLI passes the site's few-shot
            target cases).
        host_cases: cases whose brains receive the tumours (the CLI passes the same cases).
        labels: case id -> case-level label (e.g. grade) of the mask cases, or None; a synthetic
            case carries the label of its mask's case.
        out_dir: output folder (created if missing).
        syn_cfg: the `synthesis` config group (mapping, DictConfig or `SynthesisConfig`).
        site: site name (in ids, records and `labels.csv`).
        seed: the run seed (`cfg.seed`); `synthesis.seed`, when set, takes precedence so a synthetic
            set can be redrawn without changing the training seed.
        progress: show a progress bar over samples.

    Returns:
        A `SynthesisSummary`.

    Raises:
        SynthesisError: a bad input (empty case list, case not in the cache, unknown modality,
            sampler not fitting the model), an impossible mask augmentation, or an output folder
            holding cases made with other settings; the message names the culprit.
        ValueError: an invalid `synthesis` setting (named).
    """
    t0 = time.perf_counter()
    cfg = synthesis_config(syn_cfg)
    seed = cfg.seed if cfg.seed is not None else seed
    mask_cases, host_cases = list(mask_cases), list(host_cases)
    # 1. inputs, plan and settings
    _check_inputs(cache, mask_cases, host_cases, cfg, models, site, seed)
    modalities = list(models.modalities)
    sampling = sampling_settings(models, cfg)
    n_total = cfg.total(len(mask_cases))
    ids = [synth_id(cfg.id_prefix, site, i) for i in range(n_total)]
    clash = sorted(set(ids) & set(cache.ids))
    if clash:
        raise SynthesisError(f"synthetic id {clash[0]!r} is a real case id in the cache; change synthesis.id_prefix")
    mask_labels = {c: (None if labels is None or labels.get(c) is None else str(labels[c])) for c in mask_cases}
    model_info = {
        "modalities": modalities,
        "scale_factor": float(models.scale_factor),
        "vae_downsample": int(models.vae_downsample),
        "conditioning": asdict(models.conditioning),
        "provenance": _jsonable(models.provenance),
    }
    settings = cfg.to_dict()
    # Keys that change how many cases are made or how they are shown, not what a case is.
    identity = {k: v for k, v in settings.items() if k not in ("num_samples", "per_mask", "batch_size", "montage_rows")}
    settings_hash = _settings_hash({
        "settings": identity, "seed": seed, "site": site, "mask_cases": mask_cases, "host_cases": host_cases,
        "labels": mask_labels, "sampling": sampling, "model": model_info, "prep_hash": cache.prep_hash,
        "noise": "per-index",  # sample_noise(seed, index); folders of the older per-batch noise differ
    })
    header = manifest_header(site=site, seed=seed, settings_hash=settings_hash, settings=settings,
                             sampling=sampling, model=model_info, cache=cache, mask_cases=mask_cases,
                             host_cases=host_cases, labels=mask_labels, n_planned=n_total)
    out_dir = Path(out_dir)

    # 2. what is already there (the folder is made when missing)
    records = resume_records(out_dir, ids, modalities, settings_hash,
                             what_changed="seed, masks, sampler, cases or model")
    n_skipped = len(records)
    if n_skipped:
        log.info("synthesize %s: %d of %d cases already complete in %s", site, n_skipped, n_total, out_dir)

    # 3. the missing ones, in batches of missing indices (each sample's noise is its own)
    param = next(models.unet.parameters())
    device = param.device
    f = int(models.vae_downsample)
    latent_shape = (int(models.unet.out_channels), *(cache.size // f,) * 3)
    sampling_models = replace(models, scheduler_cfg=sampling["scheduler"])  # same networks, sampler swapped
    hosts: dict[str, CachedCase] = {}
    n_made = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=n_total, initial=n_skipped, desc=f"synthesize {site}", unit="case", disable=not progress)
    try:
        B = cfg.batch_size
        missing = [i for i in range(n_total) if i not in records]
        for start in range(0, len(missing), B):
            batch = missing[start : start + B]
            masks = make_masks(cache, mask_cases, host_cases, mask_labels, cfg.masks, seed=seed,
                               indices=batch, host=cfg.host)
            noise = torch.stack([sample_noise(seed, i, latent_shape) for i in batch])
            # per-step noise of the stochastic samplers only (DDPM, DDIM with eta > 0)
            generator = torch.Generator(device=device).manual_seed(_seed_of(seed, batch[0], 0x5EED))
            seg_t = torch.from_numpy(np.stack([m.seg for m in masks]).astype(np.int64)).to(device)
            images = generate(
                sampling_models,
                seg_t,
                num_steps=sampling["num_steps"],
                guidance_scale=sampling["guidance_scale"],
                generator=generator,
                noise=noise.to(device=device, dtype=param.dtype),
            )
            low = torch.is_autocast_enabled(device.type)
            images = images.detach().float().cpu().numpy()
            if not np.isfinite(images).all():  # before anything of the batch is written
                raise SynthesisError(
                    f"synthetic case(s) {[ids[i] for i in batch]}: the generated volume holds NaN or inf "
                    + (f"under {torch.get_autocast_dtype(device.type)} autocast; nothing of this batch was "
                       "written; rerun with device.precision=fp32 to avoid it" if low else
                       "in fp32; nothing of this batch was written; the generative models' weights may be damaged")
                )
            if images.shape[1] != len(modalities):
                raise SynthesisError(
                    f"the model generated {images.shape[1]} channels but lists modalities {modalities}"
                )
            for k, m in enumerate(masks):
                if m.host_case not in hosts:
                    hosts[m.host_case] = cache.load(m.host_case)
                host = hosts[m.host_case]
                image = np.clip(images[k], 0.0, 1.0)
                if cfg.mask_outside_brain:
                    image = image * (np.asarray(host.brain) > 0)[None]
                record = _record(m, ids[m.index], site, seed, sampling, cfg, settings_hash, modalities,
                                 host.affine)
                write_synthetic_case(out_dir, ids[m.index], image, m.seg, host.affine, modalities, record)
                records[m.index] = record
                n_made += 1
                bar.update(1)
            # keep the manifest in step with the folders, so a kill leaves a consistent one
            write_manifest(out_dir, {**header, "complete": False}, [records[i] for i in sorted(records)])
    finally:
        bar.close()

    # 4. manifest, label table and montage from every complete case
    return finish_synthesis(out_dir, header, records, ids=ids, n_made=n_made, n_skipped=n_skipped, t0=t0,
                            cache=cache, modalities=modalities, label_column=cfg.label_column,
                            montage_rows=cfg.montage_rows, title=site)


def manifest_header(
    *,
    site: str,
    seed: int,
    settings_hash: str,
    settings: Mapping[str, Any],
    sampling: Mapping[str, Any],
    model: Mapping[str, Any],
    cache: CaseCache,
    mask_cases: Sequence[str],
    host_cases: Sequence[str],
    labels: Any,
    n_planned: int,
    generator: str | None = None,
) -> dict[str, Any]:
    """The header of a synthesis folder's manifest (synthesis.json), the same for every generator.

    Args:
        generator: the generator's name for a baseline (e.g. the GAN's); None = ALDM, which
            writes no "generator" key (folders made before the baselines existed have none).
        Others: what the run used (see `synthesize`).
    """
    header: dict[str, Any] = {"version": MANIFEST_VERSION}
    if generator is not None:
        header["generator"] = generator
    return header | {
        "site": site,
        "seed": seed,
        "settings_hash": settings_hash,
        "settings": settings,
        "sampling": sampling,
        "model": model,
        "cache": {"root": str(cache.root), "prep_hash": cache.prep_hash, "size": cache.size,
                  "modalities": list(cache.modalities)},
        "mask_cases": mask_cases,
        "host_cases": host_cases,
        "labels": labels,
        "n_planned": n_planned,
    }


def finish_synthesis(
    out_dir: Path,
    header: Mapping[str, Any],
    records: Mapping[int, Mapping[str, Any]],
    *,
    ids: Sequence[str],
    n_made: int,
    n_skipped: int,
    t0: float,
    cache: CaseCache,
    modalities: Sequence[str],
    label_column: str,
    montage_rows: int,
    title: str,
) -> SynthesisSummary:
    """The last step of a synthesis run (ours or a baseline's): the complete manifest, the label
    table and the montage from every case, in order.

    Args:
        out_dir: the output folder.
        header: the manifest header (settings, sampling, model, cache, ...).
        records: index -> record of every case (all of `ids` must be there).
        ids, n_made, n_skipped, t0: for the summary (`t0` from `time.perf_counter()`).
        cache, modalities: where the montage's real host cases come from.
        label_column: the case-level label column of `labels.csv`.
        montage_rows: cases in the montage (0 = none).
        title: the montage's title.
    """
    ordered = [records[i] for i in range(len(ids))]
    manifest = write_manifest(out_dir, {**header, "complete": True}, ordered)
    labels_csv = write_labels_csv(out_dir, ordered, label_column)
    montage = None
    if montage_rows > 0:
        montage = _write_montage(out_dir, ordered[:montage_rows], cache, modalities, title)
    return SynthesisSummary(out_dir=out_dir, n_made=n_made, n_skipped=n_skipped, ids=list(ids),
                            seconds=time.perf_counter() - t0, manifest=manifest, labels_csv=labels_csv,
                            montage=montage)


def _record(
    mask: SyntheticMask,
    sid: str,
    site: str,
    seed: int,
    sampling: Mapping[str, Any],
    cfg: SynthesisConfig,
    settings_hash: str,
    modalities: Sequence[str],
    host_affine: np.ndarray,
) -> dict[str, Any]:
    """The per-sample record (record.json and synthesis.json); `extra` is for later audits."""
    mask_rec = mask.to_record()
    return {
        "synth_id": sid,
        "index": mask.index,
        "site": site,
        "synthetic": True,
        "source_case": mask.source_case,
        "host_case": mask.host_case,
        "label": mask.label,
        "label_column": cfg.label_column,
        "mask": {k: v for k, v in mask_rec.items() if k not in ("index", "source_case", "host_case", "label")},
        "seed": seed,
        "noise": {"seed_sequence": [seed, mask.index]},  # the initial latent noise (sample_noise)
        "sampler": sampling["sampler"],
        "num_steps": sampling["num_steps"],
        "guidance_scale": sampling["guidance_scale"],
        "mask_outside_brain": cfg.mask_outside_brain,
        "affine": np.asarray(host_affine, dtype=np.float64).tolist(),
        "files": case_files(sid, modalities),
        "settings_hash": settings_hash,
        "extra": {},
    }


def _write_montage(
    out_dir: Path, records: Sequence[Mapping[str, Any]], cache: CaseCache, modalities: Sequence[str], site: str
) -> Path:
    import nibabel as nib

    rows: list[MontageRow] = []
    for rec in records:
        folder = out_dir / rec["synth_id"]
        files = rec["files"]
        synthetic = np.stack(
            [np.asarray(nib.load(str(folder / files[m])).dataobj, dtype=np.float32) for m in modalities]
        )
        seg = np.asarray(nib.load(str(folder / files["seg"])).dataobj)
        host_img: list[np.ndarray | None] | None = None
        try:
            host = cache.load(rec["host_case"])
            host_img = [host.image[cache.modalities.index(m)] if m in cache.modalities else None for m in modalities]
        except CacheError as exc:  # the montage must not fail a finished run
            log.warning("montage: host %s not shown (%s)", rec["host_case"], exc)
        label = f" {rec['label']}" if rec.get("label") else ""
        rows.append(MontageRow(f"{rec['synth_id']}{label}\n{rec['source_case']} -> {rec['host_case']}",
                               synthetic, seg, host_img))
    return write_synthesis_montage(out_dir / MONTAGE_NAME, rows, modalities,
                                   title=f"site {site}: synthetic vs real host")
