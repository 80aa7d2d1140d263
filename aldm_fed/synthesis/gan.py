"""Synthetic volumes of the GAN baseline, in exactly the layout of `aldm-fed synthesize`.

```python
summary = synthesize_gan_site(cfg, "C")   # runs/<run>/sites/C/baselines/gan/ (cfg.paths.gan_synthesis)
```

For a fair comparison with ALDM the GAN gets the SAME inputs: sample i takes the mask and host
that ALDM's sample i takes (`make_masks` with the same `synthesis` settings and seed: the same
mask source, augmentation and host brain), the same number of samples (`synthesis.num_samples` /
`per_mask`), and its volume is zeroed outside the host brain and saved with the host's affine as
ALDM's are. Only the generator differs: one forward pass of the site's pix2pix generator
(`runs/<run>/sites/<site>/gan/final`, `aldm-fed train gan --site C`) instead of guided diffusion
sampling. Its noise channels come from `sample_noise(seed, index)`, so a sample does not depend on
its batch; the generator runs in eval mode (no dropout), so a case is reproducible.

The folder is what `synthesize` writes (`aldm_fed.synthesis.writer`): `<id>/<id>-{t1n,...,seg}.nii.gz`
+ `record.json`, `synthesis.json`, `labels.csv`, `montage.png`, then the memorisation audit
(`audit.json`/`.csv`, `audit_site`). Differences, all recorded: ids are `GAN-<site>-<index>` (never
an ALDM id), `synthesis.json` and each record carry `"generator": "gan"`, the record's sampler is
`"gan"` (1 step, no guidance), and `model.provenance.gan` names the generator checkpoint. So
`aldm_fed.evaluation.tasks.items_from_synthesis` and `audit_site(cfg, site, out=...)` read it
unchanged. Resumable like `synthesize`: complete case folders made with the same settings are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.synthesis.audit import audit_site
from aldm_fed.synthesis.config import synthesis_config
from aldm_fed.synthesis.errors import SynthesisError
from aldm_fed.synthesis.masks import make_masks
from aldm_fed.synthesis.run import SynthesisSummary, finish_synthesis, manifest_header, sample_noise, synth_id
from aldm_fed.synthesis.site import site_config
from aldm_fed.synthesis.writer import (
    case_files,
    modality_suffixes,
    resume_records,
    write_manifest,
    write_synthetic_case,
)
from aldm_fed.training.artifacts import RunLayout, checkpoint_info, load_final
from aldm_fed.training.device import autocast_context, resolve_device
from aldm_fed.training.gan import load_gan_generator

__all__ = ["GAN_GENERATOR", "GAN_ID_PREFIX", "gan_synthesis_dir", "synthesize_gan_site"]

log = logging.getLogger(__name__)

GAN_GENERATOR = "gan"  # the "generator" entry of synthesis.json and of every record.json
GAN_ID_PREFIX = "GAN"  # ids GAN-<site>-<index:05d>: never confused with ALDM's SYN-<site>-<index>


def gan_synthesis_dir(cfg: Any, site: str) -> Path:
    """The GAN baseline's output folder of a site: `cfg.paths.gan_synthesis`
    (default `runs/<run>/sites/<site>/baselines/gan`).

    Args:
        cfg: the composed config.
        site: the site.
    """
    cfg, _ = site_config(cfg, site, needed_for="the GAN baseline's folder is per site")
    paths = cfg.get("paths")
    if paths is None or paths.get("gan_synthesis") is None:
        return Path(str(cfg.paths.runs)) / "sites" / site / "baselines" / GAN_GENERATOR
    return Path(str(paths.gan_synthesis))


def synthesize_gan_site(
    cfg: Any, site: str | None = None, *, out: Path | None = None, progress: bool = True
) -> SynthesisSummary:
    """GAN-baseline volumes for a site's augmented masks, then their memorisation audit.

    Args:
        cfg: the composed config (reads `paths`, `data`, `device`, `seed`, `synthesis`, `audit`).
        site: the site whose masks and GAN to use; None = `cfg.site`.
        out: output folder; None = `gan_synthesis_dir(cfg, site)`.
        progress: show progress bars.

    Returns:
        The `SynthesisSummary` (with `audit`, None when `audit.enabled` is false).

    Raises:
        ValueError: no site; `SynthesisError` for a bad input or an output folder holding cases made
            with other settings (or another generator).
        MissingStageError: the site's GAN has not been trained (`aldm-fed train gan --site X`).
    """
    t0 = time.perf_counter()
    cfg, site_name = site_config(cfg, site, needed_for="the site's target cases give the masks")
    syn = synthesis_config(cfg.synthesis)
    seed = syn.seed if syn.seed is not None else int(cfg.seed)
    _, manifest = site_manifests(str(cfg.paths.cohort), [site_name])[site_name]
    cases = manifest.cases("target")
    labels = {c: manifest.label(c) for c in cases if manifest.label(c) is not None}
    mask_labels = {c: (None if labels.get(c) is None else str(labels[c])) for c in cases}

    # 1. The site's few-shot cases in the cache, and its trained generator.
    load_split(cfg, "target", sites=[site_name], progress=progress)
    cache = CaseCache(str(cfg.paths.cache))
    ckpt = load_final(RunLayout.from_cfg(cfg), "gan", site_name, needed_by="GAN synthesis")
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    generator = load_gan_generator(ckpt).to(setup.device)
    modalities = [str(m) for m in ckpt.meta["modalities"]]
    modality_suffixes(modalities)
    if list(cache.modalities) != modalities or int(ckpt.meta.get("size", cache.size)) != cache.size:
        raise SynthesisError(
            f"the GAN at {ckpt.path} was trained on {modalities} at {ckpt.meta.get('size')}^3, the cache "
            f"{cache.root} holds {list(cache.modalities)} at {cache.size}^3; retrain it (`aldm-fed train gan "
            f"--site {site_name} --overwrite`)")

    # 2. The plan: the same indices, masks and hosts as ALDM's synthesis; the settings hash.
    n_total = syn.total(len(cases))
    ids = [synth_id(GAN_ID_PREFIX, site_name, i) for i in range(n_total)]
    settings = {**syn.to_dict(), "id_prefix": GAN_ID_PREFIX}
    # The diffusion sampler's keys do not apply; what is kept decides the masks and the output.
    identity = {k: v for k, v in settings.items() if k in ("seed", "id_prefix", "label_column", "host",
                                                            "mask_outside_brain", "masks")}
    model_info = {
        "generator": GAN_GENERATOR,
        "modalities": modalities,
        "gan": ckpt.meta["model"]["gan"],
        "provenance": {"gan": {**checkpoint_info(ckpt), "site": site_name,
                               "train_cases": list(ckpt.meta.get("train_cases", []))}},
    }
    sampling = {"sampler": GAN_GENERATOR, "num_steps": 1, "guidance_scale": None}
    settings_hash = hashlib.sha256(json.dumps({
        "generator": GAN_GENERATOR, "settings": identity, "seed": seed, "site": site_name, "mask_cases": cases,
        "host_cases": cases, "labels": mask_labels, "weights": ckpt.meta["weights"]["sha256"],
        "prep_hash": cache.prep_hash,
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    header = manifest_header(site=site_name, seed=seed, settings_hash=settings_hash, settings=settings,
                             sampling=sampling, model=model_info, cache=cache, mask_cases=cases,
                             host_cases=cases, labels=mask_labels, n_planned=n_total, generator=GAN_GENERATOR)
    out_dir = Path(out) if out is not None else gan_synthesis_dir(cfg, site_name)

    # 3. What is already there (a resumed run keeps it; other settings are refused).
    records = resume_records(out_dir, ids, modalities, settings_hash,
                             what_changed="seed, masks, cases or the GAN's weights")
    n_skipped = len(records)

    # 4. The missing ones, in batches: masks -> one generator pass -> host brain -> NIfTI.
    from tqdm.auto import tqdm

    missing = [i for i in range(n_total) if i not in records]
    size = cache.size
    n_made = 0
    bar = tqdm(total=n_total, initial=n_skipped, desc=f"GAN synthesis {site_name}", unit="case",
               disable=not progress)
    try:
        for start in range(0, len(missing), syn.batch_size):
            batch = missing[start : start + syn.batch_size]
            masks = make_masks(cache, cases, cases, mask_labels, syn.masks, seed=seed, indices=batch, host=syn.host)
            hosts = [cache.load(m.host_case) for m in masks]
            brain = torch.from_numpy(np.stack([(np.asarray(h.brain) > 0) for h in hosts]).astype(np.float32))
            seg = torch.from_numpy(np.stack([m.seg for m in masks]).astype(np.uint8))
            noise = None
            if generator.cfg.noise_channels:
                shape = (generator.cfg.noise_channels, size, size, size)
                noise = torch.stack([sample_noise(seed, i, shape) for i in batch]).to(setup.device)
            with torch.no_grad(), autocast_context(setup):
                cond = generator.condition(seg.to(setup.device), brain[:, None].to(setup.device))
                images = generator(cond, noise)
            images = images.float().clamp(0.0, 1.0).cpu().numpy()
            for k, m in enumerate(masks):
                image = images[k] * brain[k].numpy()[None] if syn.mask_outside_brain else images[k]
                sid = ids[m.index]
                mask_rec = m.to_record()
                record = {
                    "synth_id": sid,
                    "index": m.index,
                    "site": site_name,
                    "synthetic": True,
                    "generator": GAN_GENERATOR,
                    "source_case": m.source_case,
                    "host_case": m.host_case,
                    "label": m.label,
                    "label_column": syn.label_column,
                    "mask": {k2: v for k2, v in mask_rec.items()
                             if k2 not in ("index", "source_case", "host_case", "label")},
                    "seed": seed,
                    "noise": {"seed_sequence": [seed, m.index]},  # sample_noise(seed, index)
                    **sampling,
                    "mask_outside_brain": syn.mask_outside_brain,
                    "affine": np.asarray(hosts[k].affine, dtype=np.float64).tolist(),
                    "files": case_files(sid, modalities),
                    "settings_hash": settings_hash,
                    "extra": {},
                }
                write_synthetic_case(out_dir, sid, image, m.seg, hosts[k].affine, modalities, record)
                records[m.index] = record
                n_made += 1
                bar.update(1)
            # keep the manifest in step with the folders, so a kill leaves a consistent one
            write_manifest(out_dir, {**header, "complete": False}, [records[i] for i in sorted(records)])
    finally:
        bar.close()

    # 5. Manifest, labels, montage; then the memorisation audit of the folder.
    summary = finish_synthesis(out_dir, header, records, ids=ids, n_made=n_made, n_skipped=n_skipped, t0=t0,
                               cache=cache, modalities=modalities, label_column=syn.label_column,
                               montage_rows=syn.montage_rows, title=f"{site_name} (GAN baseline)")
    return replace(summary, audit=audit_site(cfg, site_name, out=out_dir, progress=progress))
