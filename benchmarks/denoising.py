"""How well a trained backbone recovers the clean latent at each noise level.

Why: a sampler fixes the brain's global layout in its first, noisiest steps. There the clean latent
a network implies (`predicted_clean`) must be close to a brain, or the sample is a blotch however
long the later steps refine it. An epsilon-predicting network's implied latent at t is
(z_t - sqrt(1 - a) eps) / sqrt(a): at ALDM's t = 990, sqrt(a) ~ 0.007, so any error in eps is
multiplied ~150x. v-prediction and rectified flow do not divide.

For a site's held-out test cases (their real images encoded with the run's VAE, their own masks,
the site's ControlNet or the source one; `--split target` takes the few-shot training cases, which
the site's ControlNet has seen and so scores better on), the table gives, per noise level, the mean squared error of
the implied clean latent relative to the latents' variance: 1.0 is no better than guessing the
average latent value, and a useful model stays well below 1 at every level.

    python benchmarks/denoising.py experiment=demo run_name=demo-long --site C --n 4
    python benchmarks/denoising.py experiment=demo scheduler=rflow run_name=demo-rflow --site C --n 4
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.diffusion import (
    build_scheduler,
    denoise,
    encode,
    encode_mask,
    predicted_clean,
    prepare_mask,
)
from aldm_fed.io import atomic_write_json
from aldm_fed.training.artifacts import load_generative_models
from aldm_fed.training.device import autocast_context, resolve_device

# Noise levels as fractions of T (t = round(f * T), at most T - 1): from nearly clean to pure noise.
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


@torch.no_grad()
def relative_errors(
    models: Any, z0: torch.Tensor, mask: torch.Tensor, levels: tuple[float, ...], seed: int, setup: Any
) -> list[dict[str, Any]]:
    """Per noise level: MSE(implied z0, z0) / Var(z0), over the batch, with fixed noise per level.

    Args:
        models: the `GenerativeModels` bundle (conditioned as in sampling, no guidance).
        z0: (B, C, d, h, w) scaled clean latents.
        mask: (B, C, D, H, W) encoded masks at image resolution.
        levels: fractions of T.
        seed: noise seed (level i uses seed + i).
        setup: device and autocast.
    """
    scheduler = build_scheduler(models.scheduler_cfg)
    T = int(scheduler.num_train_timesteps)
    prepared = prepare_mask(models.unet, models.controlnet, mask, int(models.vae_downsample))
    var = float(z0.float().var())
    rows = []
    for i, f in enumerate(levels):
        t = torch.full((z0.shape[0],), min(T - 1, round(f * T)), dtype=torch.long, device=z0.device)
        g = torch.Generator(device=z0.device).manual_seed(seed + i)
        noise = torch.randn(z0.shape, generator=g, device=z0.device)
        z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        with autocast_context(setup):
            pred = denoise(models.unet, models.controlnet, z_t, t, prepared,
                           conditioning_scale=models.conditioning_scale)
        implied = predicted_clean(scheduler, pred.float(), z_t, t)
        rows.append({"level": f, "t": int(t[0]), "relative_mse": float(((implied - z0) ** 2).mean()) / var})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides naming the trained run")
    ap.add_argument("--site", required=True, help="the site whose cases (and ControlNet) to use")
    ap.add_argument("--split", default="test", choices=("test", "target", "source"), help="which of its cases")
    ap.add_argument("--n", type=int, default=4, help="cases (the first N of the split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")

    cfg = compose(args.overrides)
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    models = load_generative_models(cfg, args.site, device=setup.device).eval()
    _, manifest = site_manifests(str(cfg.paths.cohort), [args.site])[args.site]
    cases = manifest.cases(args.split)[: args.n]
    if not cases:
        ap.error(f"site {args.site} has no {args.split!r} cases in {cfg.paths.cohort}")
    load_split(cfg, args.split, sites=[args.site], progress=False)  # prepares what the cache lacks
    cache = CaseCache(str(cfg.paths.cache))
    real = [cache.load(c, mmap=False) for c in cases]
    x = torch.stack([torch.from_numpy(r.image) for r in real]).to(setup.device)
    labels = torch.stack([torch.from_numpy(r.seg.astype(np.int64)) for r in real]).to(setup.device)
    with torch.no_grad(), autocast_context(setup):
        z0 = encode(models.vae, x, models.scale_factor).float()
    mask = encode_mask(labels, models.conditioning.encoding)

    rows = relative_errors(models, z0, mask, LEVELS, args.seed, setup)
    sched = models.scheduler_cfg
    kind = "rflow velocity" if sched.get("name") == "rflow" else str(sched.get("prediction_type"))
    print(f"backbone trained as {sched.get('name')} ({kind}); ControlNet: "
          f"{models.provenance.get('controlnet', {}).get('kind', '?')}; "
          f"{len(cases)} {args.split} cases of site {args.site}")
    print("noise level (t)    " + "  ".join(f"{r['t']:>6d}" for r in rows))
    print("relative x0 MSE    " + "  ".join(f"{r['relative_mse']:6.3f}" for r in rows), flush=True)
    result = {
        "benchmark": "clean-latent error per noise level",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": setup.description, "site": args.site, "split": args.split, "cases": cases,
        "overrides": args.overrides,
        "scheduler": dict(sched), "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
