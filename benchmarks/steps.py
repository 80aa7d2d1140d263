"""Per-step cost of our training stages next to the bare MONAI forward+backward, side by side.

For each volume size, on the same synthetic batch, device and precision (bf16 autocast where the
CPU has it, as `device=auto` picks):

- ours: the real stage function (`train_vae`, `train_backbone`) for N1 and then N2 steps; the
  per-step time is (t(N2) - t(N1)) / (N2 - N1), which cancels the fixed costs (network build,
  run folder, final checkpoint) and keeps everything a step really pays (batching, loss, grad clip,
  EMA, metrics log, progress);
- bare: the same MONAI networks, forward + L1 / MSE loss + backward + AdamW step in a plain loop.

Prints a table and writes JSON. Timing noise on shared 2-core machines is large: each figure is the
best of `--repeats` runs, and only the ratio of the two columns, measured in one process, is
meant to be compared.

    python benchmarks/steps.py --sizes 32 64 --out bench-steps.json
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aldm_fed.config import compose
from aldm_fed.data.volumes import VolumeSet
from aldm_fed.diffusion import conditioning_config, diffusion_loss, encode_mask
from aldm_fed.diffusion.schedulers import build_scheduler
from aldm_fed.io import atomic_write_json
from aldm_fed.models import build_controlnet, build_unet, build_vae, vae_downsample_factor
from aldm_fed.training.backbone import train_backbone
from aldm_fed.training.device import autocast_context, resolve_device
from aldm_fed.training.latents import LatentSet
from aldm_fed.training.vae import train_vae

PRESET = {32: "tiny", 64: "demo", 96: "demo"}


def _volumes(size: int, channels: int, n: int = 2) -> VolumeSet:
    rng = np.random.default_rng(0)
    segs = []
    for _ in range(n):
        seg = np.zeros((size,) * 3, np.uint8)
        c = size // 2
        seg[c - size // 8 : c + size // 8, c - size // 8 : c + size // 8, c - 2 : c + 2] = 2
        segs.append(seg)
    images = [rng.random((channels, size, size, size), dtype=np.float32) for _ in range(n)]
    return VolumeSet([f"B{i}" for i in range(n)], images, segs, ["X"] * n, ("t1", "t1c", "t2", "flair"), size, "bench")


def _cfg(size: int, steps: int, run: Path) -> Any:
    p = PRESET[size]
    return compose([
        f"model/vae={p}", f"model/unet={p}", f"model/controlnet={p}", f"paths.runs={run}",
        f"train.vae.max_steps={steps}", f"train.vae.ckpt_every={steps}", "train.vae.kl_warmup_steps=0",
        f"train.backbone.max_steps={steps}", f"train.backbone.ckpt_every={steps}",
        "train.vae.progress=false", "train.backbone.progress=false",
    ])


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ours_per_step(stage: str, size: int, n1: int, n2: int, repeats: int) -> float:
    best = float("inf")
    for rep in range(repeats + 1):  # the first pass only warms up (kernels, allocator, imports)
        times = []
        for n in (n1, n2):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = _cfg(size, n, Path(tmp))
                vols = _volumes(size, 4)
                if stage == "vae":
                    times.append(_timed(lambda: train_vae(cfg, vols, Path(tmp) / "vae", progress=False)))
                else:
                    f = vae_downsample_factor(cfg.model.vae)
                    lat = LatentSet(vols.case_ids, torch.randn(len(vols), int(cfg.model.vae.latent_channels),
                                                              *(size // f,) * 3), vols.segs, vols.sites)
                    times.append(_timed(lambda: train_backbone(cfg, lat, Path(tmp) / "bb", scale_factor=1.0,
                                                               progress=False)))
        if rep:
            best = min(best, (times[1] - times[0]) / (n2 - n1))
    return best


def bare_per_step(stage: str, size: int, steps: int, repeats: int) -> float:
    cfg = _cfg(size, steps, Path("."))
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    vols = _volumes(size, 4, n=1)
    x = torch.from_numpy(vols.images[0])[None]
    if stage == "vae":
        net = build_vae(cfg.model.vae, 4)
        nets = [net]

        def step() -> torch.Tensor:
            with autocast_context(setup):
                rec, _, _ = net(x)
            return (rec.float() - x).abs().mean()
    else:
        cond = conditioning_config(cfg.model.conditioning)
        f = vae_downsample_factor(cfg.model.vae)
        lc = int(cfg.model.vae.latent_channels)
        unet = build_unet(cfg.model.unet, lc, cond.unet_mask_channels)
        cn = build_controlnet(cfg.model.unet, cfg.model.controlnet, lc, f, mask_channels=cond.mask_channels,
                              unet_mask_channels=cond.unet_mask_channels)
        nets = [unet, cn]
        scheduler = build_scheduler(cfg.scheduler)
        z0 = torch.randn(1, lc, *(size // f,) * 3)
        mask = encode_mask(torch.from_numpy(vols.segs[0])[None].long(), cond.encoding)

        def step() -> torch.Tensor:
            with autocast_context(setup):
                return diffusion_loss(unet, cn, scheduler, z0, mask, cond_drop_prob=0.0, tumour_weight=1.0)
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    best = float("inf")
    for _ in range(repeats):
        step().backward()  # warm-up (allocator, oneDNN kernels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], choices=sorted(PRESET))
    ap.add_argument("--stages", nargs="+", default=["vae", "backbone"], choices=["vae", "backbone"])
    ap.add_argument("--steps", type=int, nargs=2, default=[2, 12], metavar=("N1", "N2"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n1, n2 = args.steps
    if not 0 < n1 < n2:
        ap.error("--steps needs 0 < N1 < N2")
    rows = []
    for size in args.sizes:
        for stage in args.stages:
            ours = ours_per_step(stage, size, n1, n2, args.repeats)
            bare = bare_per_step(stage, size, n2 - n1, args.repeats)
            rows.append({"stage": stage, "size": size, "preset": PRESET[size], "ours_s_per_step": ours,
                         "bare_monai_s_per_step": bare, "overhead_ratio": ours / bare,
                         "voxels_per_s": size**3 / ours})
            print(f"{stage:9s} {size:3d}^3  ours {ours:7.3f} s/step  bare MONAI {bare:7.3f} s/step"
                  f"  ratio {ours / bare:5.2f}", flush=True)
    setup = resolve_device("auto", "auto")
    result = {
        "benchmark": "training step overhead vs bare MONAI",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "device": setup.description},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": [n1, n2], "repeats": args.repeats, "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
