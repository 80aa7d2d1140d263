"""Per-step cost of every training stage next to the bare MONAI forward+backward, side by side.

Stages: `vae` (`train_vae`), `backbone` (`train_backbone`: UNet + source ControlNet),
`controlnet` (`train_controlnet`: a site's ControlNet against a frozen backbone),
`classifier_slice` and `classifier_volume` (`train_classifier` with configs/classifier/{slice,
volume}.yaml). For each volume size, on the same synthetic batch, device and precision (bf16
autocast where the CPU has it, as `device=auto` picks):

- ours: the real stage function for N1 and then N2 steps; the per-step time is
  (t(N2) - t(N1)) / (N2 - N1), each t the best of the repeats, which cancels the fixed costs
  (network build, run folder, final checkpoint) and keeps everything a step really pays
  (batching, loss, grad clip, EMA, metrics log, progress);
- bare: the same networks (MONAI's, or the plain-torch AlexLite of the slice classifier), forward +
  loss (the diffusion stages' tumour-weighted one) + backward + AdamW step on one fixed batch
  (its mask encoded once) in a plain loop, with the same optimizer kernel
  (fused AdamW) and memory layout (`device.channels_last`) as ours, so that the ratio is our
  loop's overhead alone (`benchmarks/speedups.py` measures what those two choices gain).

Each (stage, size, ours|bare) runs in a fresh child process, one after the other, so that its peak
memory can be read honestly: `peak_mb` is the child's peak resident set (`ru_maxrss`, which
includes the interpreter, torch and MONAI) and `stage_mb` its growth from the peak before the
first step (after imports and the synthetic data), i.e. what the stage itself adds; on CUDA also
`torch.cuda.max_memory_allocated`. Voxels per second count the image voxels a step trains on
(batch x size^3; batch x size^2 for slices), also for the latent stages.

Timing noise on shared 2-core machines is large: each figure is the best of `--repeats` runs after
a warm-up pass; compare the ratio of the two columns. Sizes: 32 -> `tiny` networks, 64 and 96 ->
`demo` networks; at 96^3 the defaults are one repeat and N1, N2 = 1, 3 (a demo VAE step took
18-20 s there on a loaded 2-core machine).

    python benchmarks/steps.py --sizes 32 64 96 --out bench-steps.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PRESET = {32: "tiny", 64: "demo", 96: "demo"}
STAGES = ("vae", "backbone", "controlnet", "classifier_slice", "classifier_volume")
# A 96^3 demo VAE step took 18-20 s (bf16, 2 threads, on a loaded 2-core machine, 2.3 GB peak):
# there, by default, one timed repeat after the warm-up and N1, N2 = 1, 3.
DEFAULT_REPEATS = {96: 1}
DEFAULT_STEPS = {96: (1, 3)}


def _volumes(size: int, channels: int, n: int = 2) -> Any:
    import numpy as np

    from aldm_fed.data.volumes import VolumeSet

    rng = np.random.default_rng(0)
    segs = []
    for _ in range(n):
        seg = np.zeros((size,) * 3, np.uint8)
        c = size // 2
        seg[c - size // 8 : c + size // 8, c - size // 8 : c + size // 8, c - 2 : c + 2] = 2
        segs.append(seg)
    images = [rng.random((channels, size, size, size), dtype=np.float32) for _ in range(n)]
    return VolumeSet([f"B{i}" for i in range(n)], images, segs, ["X"] * n, ("t1", "t1c", "t2", "flair"), size, "bench")


def _cfg(size: int, steps: int, run: Path, task: str = "slice") -> Any:
    from aldm_fed.config import compose

    p = PRESET[size]
    over = [f"model/vae={p}", f"model/unet={p}", f"model/controlnet={p}", f"paths.runs={run}",
            f"classifier={task}", "train.vae.kl_warmup_steps=0"]
    for stage in ("vae", "backbone", "controlnet"):
        over += [f"train.{stage}.max_steps={steps}", f"train.{stage}.ckpt_every={steps}",
                 f"train.{stage}.progress=false"]
    return compose(over)


def _task(stage: str) -> str:
    return stage.removeprefix("classifier_") if stage.startswith("classifier_") else "slice"


def _latents(cfg: Any, vols: Any, size: int) -> Any:
    import torch

    from aldm_fed.models import vae_downsample_factor
    from aldm_fed.training.latents import LatentSet

    f = vae_downsample_factor(cfg.model.vae)
    z = torch.randn(len(vols), int(cfg.model.vae.latent_channels), *(size // f,) * 3)
    return LatentSet(vols.case_ids, z, vols.segs, vols.sites)


def _classifier_data(cfg: Any, size: int) -> tuple[Any, Any]:
    """(settings, TaskData): a slice task (both classes) or a volume task of `batch_size` volumes."""
    from aldm_fed.evaluation.regimes import ClassifierSettings
    from aldm_fed.evaluation.tasks import CaseItem, make_task

    settings = ClassifierSettings.from_mapping(cfg.classifier)
    n = max(2, settings.train.batch_size) if settings.task == "volume" else 2
    vols = _volumes(size, 4, n=n)
    items = [CaseItem(image=img, group=cid, seg=seg, label=i % 2)
             for i, (cid, img, seg) in enumerate(zip(vols.case_ids, vols.images, vols.segs, strict=True))]
    return settings, make_task(settings.task, items, min_brain_fraction=settings.min_brain_fraction,
                               axis=settings.slice_axis)


def batch_voxels(stage: str, size: int) -> int:
    """Image voxels one training step of `stage` sees at `size`^3 (batch x sample voxels).

    Args:
        stage: one of STAGES.
        size: the volume side.
    """
    cfg = _cfg(size, 1, Path("."), _task(stage))
    if stage.startswith("classifier_"):
        batch = int(cfg.classifier.train.batch_size)
        return batch * (size**2 if stage == "classifier_slice" else size**3)
    return int(cfg.train[stage].batch_size) * size**3


def _run_ours(stage: str, size: int, steps: int, run: Path) -> Callable[[], Any]:
    """A callable that runs our stage function for `steps` steps in `run`."""
    cfg = _cfg(size, steps, run, _task(stage))
    if stage == "vae":
        from aldm_fed.training.vae import train_vae

        vols = _volumes(size, 4)
        return lambda: train_vae(cfg, vols, run / "vae", progress=False)
    if stage == "backbone":
        from aldm_fed.training.backbone import train_backbone

        lat = _latents(cfg, _volumes(size, 4), size)
        return lambda: train_backbone(cfg, lat, run / "bb", scale_factor=1.0, progress=False)
    if stage == "controlnet":
        from aldm_fed.diffusion import conditioning_config
        from aldm_fed.models import build_unet
        from aldm_fed.training.controlnet import train_controlnet

        lat = _latents(cfg, _volumes(size, 4), size)
        cond = conditioning_config(cfg.model.conditioning)
        unet = build_unet(cfg.model.unet, lat.latent_channels, cond.unet_mask_channels)
        return lambda: train_controlnet(cfg, lat, run / "cn", unet=unet, scale_factor=1.0, site="X",
                                        progress=False)
    from aldm_fed.models.classifier import build_classifier
    from aldm_fed.training.classifier import train_classifier
    from aldm_fed.training.device import resolve_device

    settings, data = _classifier_data(cfg, size)
    train = dataclasses.replace(settings.train, steps=steps, ckpt_every=steps, progress=False)
    setup = resolve_device(str(cfg.device.spec), str(cfg.device.precision))
    return lambda: train_classifier(build_classifier(settings.network, data.in_channels), data, run / "clf",
                                    train, seed=0, device=setup)


def ours_per_step(stage: str, size: int, n1: int, n2: int, repeats: int) -> float:
    """Seconds per step of our stage function: (t(N2) - t(N1)) / (N2 - N1), each t the best of `repeats`.

    Args:
        stage: one of STAGES.
        size: the volume side (a PRESET key).
        n1, n2: the two step counts (0 < n1 < n2).
        repeats: timed repeats after one warm-up pass.
    """
    # Best of each count separately, then the difference: noise only ever adds time, so each
    # minimum is the cleanest run of that count (a difference per repeat would keep the noise).
    best = {n1: float("inf"), n2: float("inf")}
    for rep in range(repeats + 1):  # the first pass only warms up (kernels, allocator, imports)
        for n in (n1, n2):
            with tempfile.TemporaryDirectory() as tmp:
                fn = _run_ours(stage, size, n, Path(tmp))
                t = time.perf_counter()
                fn()
                if rep:
                    best[n] = min(best[n], time.perf_counter() - t)
    return (best[n2] - best[n1]) / (n2 - n1)


def _bare_step(stage: str, size: int) -> tuple[Callable[[], Any], list[Any]]:
    """(step() -> loss, trainable parameters) of the bare networks on one fixed batch."""
    import torch

    from aldm_fed.diffusion import conditioning_config, diffusion_loss, encode_mask
    from aldm_fed.diffusion.schedulers import build_scheduler
    from aldm_fed.models import (
        build_controlnet,
        build_unet,
        build_vae,
        vae_downsample_factor,
    )
    from aldm_fed.training.common import device_setup
    from aldm_fed.training.device import autocast_context, training_layout

    cfg = _cfg(size, 1, Path("."), _task(stage))
    setup = device_setup(cfg)
    dev = setup.device
    if stage.startswith("classifier_"):
        from aldm_fed.models.classifier import build_classifier

        settings, data = _classifier_data(cfg, size)
        net = build_classifier(settings.network, data.in_channels).to(dev).train()
        idx = list(range(min(settings.train.batch_size, len(data))))
        x = torch.from_numpy(data.inputs(idx)).to(dev)
        y = torch.as_tensor(data.labels[idx], dtype=torch.float32, device=dev)

        def step() -> torch.Tensor:
            with autocast_context(setup):
                logits = net(x)
            return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)

        return step, list(net.parameters())
    vols = _volumes(size, 4, n=1)
    x = torch.from_numpy(vols.images[0])[None].to(dev)
    if stage == "vae":
        net = training_layout(build_vae(cfg.model.vae, 4), setup)

        def step() -> torch.Tensor:
            with autocast_context(setup):
                rec, _, _ = net(x)
            return (rec.float() - x).abs().mean()

        return step, list(net.parameters())
    cond = conditioning_config(cfg.model.conditioning)
    f = vae_downsample_factor(cfg.model.vae)
    lc = int(cfg.model.vae.latent_channels)
    unet = training_layout(build_unet(cfg.model.unet, lc, cond.unet_mask_channels), setup)
    cn = build_controlnet(cfg.model.unet, cfg.model.controlnet, lc, f, mask_channels=cond.mask_channels,
                          unet_mask_channels=cond.unet_mask_channels)
    training_layout(cn, setup)
    scheduler = build_scheduler(cfg.scheduler)
    z0 = torch.randn(1, lc, *(size // f,) * 3, device=dev)
    mask = encode_mask(torch.from_numpy(vols.segs[0])[None].long(), cond.encoding).to(dev)
    if stage == "controlnet":  # the backbone is frozen: only the ControlNet learns
        unet.eval().requires_grad_(False)
        params = list(cn.parameters())
    else:
        params = [*unet.parameters(), *cn.parameters()]

    def step() -> torch.Tensor:
        with autocast_context(setup):
            # the stages' loss: tumour-weighted as `model.conditioning` says (ALDM: 2x on tumour)
            return diffusion_loss(unet, cn, scheduler, z0, mask, cond_drop_prob=0.0,
                                  tumour_weight=cond.tumour_weight, weight_pool=cond.weight_pool)

    return step, params


def bare_per_step(stage: str, size: int, steps: int, repeats: int) -> float:
    """Seconds per step of the bare forward + loss + backward + AdamW step (best of `repeats`).

    Args:
        stage: one of STAGES.
        size: the volume side.
        steps: timed steps per repeat (N2 - N1, as many as ours differences over).
        repeats: timed repeats, each after one warm-up step.
    """
    from aldm_fed.training.optim import adam_optimizer

    step, params = _bare_step(stage, size)
    opt = adam_optimizer(params, lr=1e-4)
    best = float("inf")
    for _ in range(repeats):
        step().backward()  # warm-up (allocator, oneDNN kernels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        for _ in range(steps):
            step().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(kind: str, stage: str, size: int, n1: int, n2: int, repeats: int) -> dict[str, Any]:
    """Time one (kind, stage, size) in this process and read its memory (see the module docstring).

    Args:
        kind: "ours" or "bare".
        stage: one of STAGES.
        size: the volume side.
        n1, n2: ours' step counts; bare times n2 - n1 steps.
        repeats: timed repeats.
    """
    import importlib

    import torch

    from aldm_fed.training.device import resolve_device

    # Imports (torch, MONAI, our stages) and first allocations happen before the baseline is read.
    for mod in ("aldm_fed.training.vae", "aldm_fed.training.backbone", "aldm_fed.training.controlnet",
                "aldm_fed.training.classifier", "aldm_fed.models.classifier", "aldm_fed.evaluation.regimes"):
        importlib.import_module(mod)
    _cfg(size, 1, Path("."), _task(stage))  # Hydra's first compose
    _volumes(size, 4)
    cuda = resolve_device("auto", "auto").device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = _peak_mb()
    if kind == "ours":
        seconds = ours_per_step(stage, size, n1, n2, repeats)
    elif kind == "bare":
        seconds = bare_per_step(stage, size, n2 - n1, repeats)
    else:
        raise ValueError(f"kind must be 'ours' or 'bare', got {kind!r}")
    peak = _peak_mb()
    return {"s_per_step": seconds, "peak_mb": peak, "stage_mb": peak - before,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "torch_threads": torch.get_num_threads()}


def measure_in_child(kind: str, stage: str, size: int, n1: int, n2: int, repeats: int) -> dict[str, Any]:
    """`measure` in a fresh interpreter (this file with `--child`), so its peak memory is its own.

    Raises:
        RuntimeError: the child failed; the message carries the end of its stderr.
    """
    spec = {"kind": kind, "stage": stage, "size": size, "n1": n1, "n2": n2, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
                               "--out", str(out)], check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmarks/steps.py child {spec} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def machine() -> dict[str, Any]:
    """Platform, CPU count, torch version and threads, and the device `device=auto` picks."""
    import os

    import torch

    from aldm_fed.training.device import resolve_device

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": resolve_device("auto", "auto").description}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = ("| stage | size | ours s/step | bare s/step | ratio | ours Mvox/s | ours peak MB (+stage) "
            "| bare peak MB (+stage) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    def mem(r: dict[str, Any], p: str) -> str:
        return "-" if r.get(f"{p}_peak_mb") is None else f"{r[f'{p}_peak_mb']:.0f} (+{r[f'{p}_stage_mb']:.0f})"

    for r in rows:
        lines.append(f"| {r['stage']} | {r['size']}^3 ({r['preset']}) | {r['ours_s_per_step']:.3f} "
                     f"| {r['bare_monai_s_per_step']:.3f} | {r['overhead_ratio']:.2f} "
                     f"| {r['voxels_per_s'] / 1e6:.2f} | {mem(r, 'ours')} | {mem(r, 'bare')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], choices=sorted(PRESET))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N1", "N2"),
                    help=f"step counts of the differencing (default 2 12; by size: {DEFAULT_STEPS})")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed repeats (default 2; by size: {DEFAULT_REPEATS})")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="measure in this process (faster to start; no peak-memory columns)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args(argv)
    if args.child is not None:
        result = measure(**json.loads(args.child))
        if args.out:
            args.out.write_text(json.dumps(result))
        return result
    if args.steps is not None and not 0 < args.steps[0] < args.steps[1]:
        ap.error("--steps needs 0 < N1 < N2")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    from aldm_fed.io import atomic_write_json

    rows = []
    for size in args.sizes:
        repeats = args.repeats or DEFAULT_REPEATS.get(size, 2)
        n1, n2 = args.steps or DEFAULT_STEPS.get(size, (2, 12))
        for stage in args.stages:
            m: dict[str, dict[str, Any]] = {}
            for kind in ("ours", "bare"):
                if args.isolate:
                    m[kind] = measure_in_child(kind, stage, size, n1, n2, repeats)
                else:
                    s = ours_per_step(stage, size, n1, n2, repeats) if kind == "ours" else \
                        bare_per_step(stage, size, n2 - n1, repeats)
                    m[kind] = {"s_per_step": s, "peak_mb": None, "stage_mb": None, "cuda_peak_mb": None}
            ours, bare = m["ours"]["s_per_step"], m["bare"]["s_per_step"]
            vox = batch_voxels(stage, size)
            row = {"stage": stage, "size": size, "preset": PRESET[size], "repeats": repeats, "steps": [n1, n2],
                   "ours_s_per_step": ours, "bare_monai_s_per_step": bare, "overhead_ratio": ours / bare,
                   "voxels_per_step": vox, "voxels_per_s": vox / ours, "bare_voxels_per_s": vox / bare}
            for kind in ("ours", "bare"):
                row |= {f"{kind}_{k}": m[kind][k] for k in ("peak_mb", "stage_mb", "cuda_peak_mb")}
            rows.append(row)
            if ours <= 0:
                print(f"warning: {stage} {size}^3: t(N2) - t(N1) <= 0, timing noise exceeds the step time; "
                      "raise --steps N2 or --repeats", file=sys.stderr)
            mem = "" if row["ours_peak_mb"] is None else \
                f"  peak MB ours {row['ours_peak_mb']:.0f} bare {row['bare_peak_mb']:.0f}"
            print(f"{stage:17s} {size:3d}^3  ours {ours:7.3f} s/step  bare {bare:7.3f} s/step"
                  f"  ratio {ours / bare:5.2f}  {vox / ours / 1e6:7.2f} Mvox/s{mem}", flush=True)
    result = {
        "benchmark": "training step overhead vs bare MONAI",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "memory": "peak RSS (ru_maxrss) of a fresh child process per measurement; stage_mb = its growth "
                  "from before the first step" if args.isolate else "not measured (--no-isolate)",
        "rows": rows,
    }
    print(format_table(rows), flush=True)
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
