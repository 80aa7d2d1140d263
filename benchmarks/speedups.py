"""The "ways to get there" of issue #7, each measured side by side on the same batch in one process.

For the two networks that dominate a demo run's wall time (the VAE at the image size; the backbone
UNet + ControlNet at the latent size) one training step (forward, loss, backward, AdamW) under:

| variant | what changes |
|---|---|
| `fp32` | plain float32, PyTorch's default AdamW (a Python loop over the parameters on CPU) |
| `bf16` | bf16 autocast (what `device=auto` picks on a CPU with native bf16) |
| `bf16+fused` | the same with the fused AdamW kernel (`training.optim.adam_optimizer`) |
| `bf16+fused+channels_last` | the same, model and batch in `torch.channels_last_3d` (`device.channels_last`): today's default on CPU |
| `bf16+compile` | `bf16`, the step's modules wrapped by `torch.compile` (`--compile`; compiling takes minutes on 2 cores and is timed apart) |
| `bf16+fused+channels_last+compile` | today's default, the modules wrapped by `torch.compile` (`--compile`) |
| `bf16, 1 thread` | `bf16` with one intra-op thread instead of all the process may use |

Each figure is the best of `--repeats` timed blocks after a warm-up, and the ratio to the `bf16`
row is what to compare: these machines' timing noise is large. `max_rel_err`
is the largest relative difference of the step's loss to fp32 over the timed steps' first batch.

    python benchmarks/speedups.py --size 64 --out bench-speedups.json
    python benchmarks/speedups.py --size 64 --compile --variants bf16 bf16+fused+channels_last \
        bf16+compile bf16+fused+channels_last+compile      # torch.compile, ~5 min
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aldm_fed.config import compose
from aldm_fed.diffusion import conditioning_config, diffusion_loss, encode_mask
from aldm_fed.diffusion.schedulers import build_scheduler
from aldm_fed.io import atomic_write_json
from aldm_fed.models import build_controlnet, build_unet, build_vae, vae_downsample_factor
from aldm_fed.training.optim import adam_optimizer

PRESET = {32: "tiny", 64: "demo", 96: "demo"}
VARIANTS = ("fp32", "bf16", "bf16+fused", "bf16+fused+channels_last", "bf16+compile",
            "bf16+fused+channels_last+compile", "bf16, 1 thread")
COMPILED = ("bf16+compile", "bf16+fused+channels_last+compile")


def _networks(size: int, seed: int = 0) -> dict[str, tuple[list[nn.Module], Callable[..., torch.Tensor], tuple]]:
    """network name -> (modules, loss function, its inputs), built fresh with a fixed seed."""
    p = PRESET[size]
    cfg = compose([f"model/vae={p}", f"model/unet={p}", f"model/controlnet={p}"])
    torch.manual_seed(seed)
    vae = build_vae(cfg.model.vae, 4)
    x = torch.rand(1, 4, size, size, size)

    def vae_loss(net: nn.Module, image: torch.Tensor) -> torch.Tensor:
        rec, _, _ = net(image)
        return (rec.float() - image).abs().mean()

    cond = conditioning_config(cfg.model.conditioning)
    f = vae_downsample_factor(cfg.model.vae)
    lc = int(cfg.model.vae.latent_channels)
    unet = build_unet(cfg.model.unet, lc, cond.unet_mask_channels)
    cn = build_controlnet(cfg.model.unet, cfg.model.controlnet, lc, f, mask_channels=cond.mask_channels,
                          unet_mask_channels=cond.unet_mask_channels)
    scheduler = build_scheduler(cfg.scheduler)
    z0 = torch.randn(1, lc, *(size // f,) * 3)
    seg = torch.zeros(1, size, size, size, dtype=torch.long)
    seg[:, size // 3: size // 2, size // 3: size // 2, size // 3: size // 2] = 2
    mask = encode_mask(seg, cond.encoding)

    def backbone_loss(u: nn.Module, c: nn.Module, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # the same noise and timesteps for every variant
        return diffusion_loss(u, c, scheduler, z, m, cond_drop_prob=0.0, tumour_weight=2.0)

    return {"vae": ([vae], vae_loss, (x,)), "backbone": ([unet, cn], backbone_loss, (z0, mask))}


def _to_channels_last(t: Any) -> Any:
    return t.contiguous(memory_format=torch.channels_last_3d) if isinstance(t, torch.Tensor) and t.dim() == 5 else t


def measure(name: str, size: int, variant: str, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    """Seconds per training step of network `name` under `variant` (best of `repeats` blocks)."""
    modules, loss_fn, inputs = _networks(size)[name]
    torch.set_num_threads(1 if variant == "bf16, 1 thread" else threads)
    dtype = None if variant == "fp32" else torch.bfloat16
    if "+channels_last" in variant:
        modules = [m.to(memory_format=torch.channels_last_3d) for m in modules]
        inputs = tuple(_to_channels_last(t) for t in inputs)
    call_modules = [torch.compile(m) for m in modules] if variant in COMPILED else modules
    params = [p for m in modules for p in m.parameters()]
    opt = adam_optimizer(params, lr=1e-4) if "+fused" in variant else torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(*call_modules, *inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    first_loss = step()  # warm-up: kernels, allocator; for compile, the compilation itself
    warmup_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps)
    return {"network": name, "size": size, "variant": variant, "s_per_step": best, "warmup_s": warmup_s,
            "first_loss": first_loss, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, choices=sorted(PRESET))
    ap.add_argument("--networks", nargs="+", default=["vae", "backbone"], choices=["vae", "backbone"])
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                    help="measure only these (bf16 is always measured: the ratios' reference)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    variants = [v for v in VARIANTS if (v not in COMPILED or args.compile)
                and (args.variants is None or v in args.variants or v == "bf16")]
    rows: list[dict[str, Any]] = []
    for name in args.networks:
        measured = {v: measure(name, args.size, v, args.steps, args.repeats, threads) for v in variants}
        ref = measured["bf16"]["s_per_step"]
        fp32 = measured["fp32"]["first_loss"] if "fp32" in measured else None
        for v, row in measured.items():
            row["ratio_to_bf16"] = row["s_per_step"] / ref
            row["loss_rel_err_to_fp32"] = (abs(row["first_loss"] - fp32) / max(abs(fp32), 1e-12)
                                           if fp32 is not None else float("nan"))
            rows.append(row)
            print(f"{name:9s} {args.size:3d}^3  {v:20s} {row['s_per_step']:7.3f} s/step  x{row['ratio_to_bf16']:5.2f}"
                  f" of bf16  warm-up {row['warmup_s']:6.1f} s  loss rel. err. {row['loss_rel_err_to_fp32']:.1e}",
                  flush=True)
    torch.set_num_threads(threads)
    result = {
        "benchmark": "speed-ups measured side by side (issue #7)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "torch_threads": threads},
        "steps": args.steps, "repeats": args.repeats, "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
