"""Sampling speed against quality: a many-step reference sampler next to fast samplers in 10-50 steps.

Uses a trained run (`load_generative_models`), the masks of a site's few-shot cases and the same
starting noise for every sampler, then reports seconds per volume and, against the real volumes
of those cases (synthetic images masked to the real brain, as `aldm-fed synthesize` writes them):
MMD (MONAI, lower is closer) and the mean SSIM to the paired real case; and the mean SSIM of each
volume to the reference sampler's volume from the same noise (how far the shortcut strays from the
many-step solution; meaningful for a deterministic reference such as RFlow's Euler sampler or DDIM
with eta 0; DDPM adds fresh noise every step, so its volumes are other draws and this figure is low
by construction). A fast sampler earns its place only where its quality figures sit within the
spread of the reference's.

The first sampler of `--samplers` is the reference (speed-ups are against it). By default the list
follows the scheduler the backbone was trained with: DDPM/DDIM-trained backbones compare DDPM with
all 1000 steps (ALDM's default) with DDIM at 50/25/10 steps; rectified-flow backbones
(`scheduler=rflow`, which learn another target and cannot be sampled with DDPM/DDIM) compare
RFlow's Euler sampler at 1000 steps with RFlow at 50/25/10.

    python benchmarks/sampling.py experiment=demo run_name=demo-long --site C --n 4
    python benchmarks/sampling.py experiment=demo scheduler=rflow run_name=demo-rflow --site C --n 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import site_manifests
from aldm_fed.diffusion.pipeline import generate
from aldm_fed.evaluation.metrics import mmd, ssim_per_pair
from aldm_fed.io import atomic_write_json
from aldm_fed.synthesis.config import synthesis_config
from aldm_fed.synthesis.run import sample_noise, sampling_settings
from aldm_fed.training.artifacts import load_generative_models
from aldm_fed.training.device import autocast_context, resolve_device

# Per training scheduler: the many-step reference first, then the fast samplers.
DEFAULT_SAMPLERS = {
    "ddpm": "ddpm:1000,ddim:50,ddim:25,ddim:10",
    "ddim": "ddpm:1000,ddim:50,ddim:25,ddim:10",
    "rflow": "rflow:1000,rflow:50,rflow:25,rflow:10",
}


def parse_samplers(spec: str) -> list[tuple[str, int]]:
    """`name:steps,name:steps,...` -> [(name, steps), ...].

    Args:
        spec: the `--samplers` value.

    Raises:
        ValueError: an entry that is not `name:steps` with a positive integer step count.
    """
    out = []
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--samplers: expected name:steps (e.g. ddim:25), got {item!r}")
        out.append((name, int(steps)))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides naming the trained run")
    ap.add_argument("--site", required=True)
    ap.add_argument("--n", type=int, default=4, help="volumes per sampler (>= 2 for MMD)")
    ap.add_argument("--samplers", default=None,
                    help="comma-separated name:steps list, the reference first; default: "
                         f"{DEFAULT_SAMPLERS['ddpm']} (DDPM/DDIM-trained) or {DEFAULT_SAMPLERS['rflow']} (rflow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be >= 2 (MMD needs two volumes per set)")
    try:  # an explicit list is checked before any model is loaded
        samplers = parse_samplers(args.samplers) if args.samplers else None
    except ValueError as exc:
        ap.error(str(exc))

    cfg = compose(args.overrides)
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    models = load_generative_models(cfg, args.site, device=setup.device)
    _, manifest = site_manifests(str(cfg.paths.cohort), [args.site])[args.site]
    cache = CaseCache(str(cfg.paths.cache))
    cases = manifest.cases("target")[: args.n]
    real = [cache.load(c, mmap=False) for c in cases]
    labels = torch.stack([torch.from_numpy(r.seg.astype(np.int64)) for r in real])
    brain = torch.stack([torch.from_numpy(r.brain.astype(np.float32)) for r in real])[:, None]
    real_x = torch.stack([torch.from_numpy(r.image) for r in real])
    f = int(models.vae_downsample)
    shape = (int(models.unet.out_channels), *(cache.size // f,) * 3)
    noise = torch.stack([sample_noise(args.seed, i, shape) for i in range(len(cases))]).to(setup.device)

    trained = str(models.scheduler_cfg.get("name"))
    if samplers is None:
        if trained not in DEFAULT_SAMPLERS:
            ap.error(f"the backbone was trained with scheduler {trained!r}; pass --samplers")
        samplers = parse_samplers(DEFAULT_SAMPLERS[trained])

    rows, reference = [], None
    for name, steps in samplers:
        sampling = sampling_settings(models, synthesis_config({"sampler": name, "num_steps": int(steps)}))
        bundle = dataclasses.replace(models, scheduler_cfg=sampling["scheduler"])
        gen = torch.Generator(device=setup.device).manual_seed(args.seed)  # DDPM's per-step noise
        t = time.perf_counter()
        with autocast_context(setup):
            syn = generate(bundle, labels.to(setup.device), num_steps=int(steps), generator=gen, noise=noise)
        seconds = (time.perf_counter() - t) / len(cases)
        syn = syn.float().clamp(0, 1).cpu() * brain
        if reference is None:
            reference = syn  # the first sampler's volumes: what the others are compared with
        row = {"sampler": name, "steps": int(steps), "s_per_volume": seconds,
               "mmd_to_real": mmd(real_x, syn), "ssim_to_paired_real": float(np.mean(ssim_per_pair(real_x, syn))),
               "ssim_to_reference": float(np.mean(ssim_per_pair(reference, syn)))}
        rows.append(row)
        print(f"{name:5s} {int(steps):4d} steps  {seconds:7.2f} s/volume  MMD {row['mmd_to_real']:9.4f}"
              f"  SSIM {row['ssim_to_paired_real']:.3f}  SSIM to {samplers[0][0]}-{samplers[0][1]}"
              f" {row['ssim_to_reference']:.3f}", flush=True)
    for r in rows:
        r["speedup_vs_reference"] = rows[0]["s_per_volume"] / r["s_per_volume"]
    result = {
        "benchmark": "sampling speed vs quality",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": setup.description, "site": args.site, "cases": cases, "overrides": args.overrides,
        "trained_scheduler": trained, "reference": f"{samplers[0][0]}:{samplers[0][1]}", "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
