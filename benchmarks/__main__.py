"""Every benchmark from one command: print each table and write one JSON file.

    python -m benchmarks --quick    # 32^3 steps of every stage, tiny sampling, imports: minutes
    python -m benchmarks --full     # 32/64/96^3 steps, demo sampling, imports, federation: hours

Run from the repository root. Parts:

- `steps` (benchmarks/steps.py): per training stage (VAE, backbone, ControlNet, slice and volume
  classifier) seconds per step, voxels per second and peak memory, ours next to bare MONAI.
- `sampling` (benchmarks/sampling.py): seconds per volume and quality of DDPM-1000 vs fast
  samplers, on a trained run (`--sampling-overrides`; quick: `experiment=tiny`, full:
  `experiment=demo`). Without a trained run it is recorded as skipped, with the reason and the
  commands that train one.
- `imports` (benchmarks/imports.py): start-up cost of the processes Flower starts per message.
- `federation` (benchmarks/federation.py, full only, when present): run in a subprocess with
  `--federation-args`; `--extra NAME` runs any other benchmarks/NAME.py the same way.

The JSON holds the date, the machine (platform, CPU count, torch version and threads, device) and
each part's result (or `{"skipped": reason}` / `{"error": ...}`): one failing part does not lose
the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import imports as imports_bench
from benchmarks import steps as steps_bench

HERE = Path(__file__).resolve().parent
PARTS = ("steps", "sampling", "imports", "federation")
MODES: dict[str, dict[str, Any]] = {
    "quick": {"sizes": [32], "sampling": ["experiment=tiny"], "n": 2, "import_repeats": 3, "federation": False},
    "full": {"sizes": [32, 64, 96], "sampling": ["experiment=demo"], "n": 4, "import_repeats": 5,
             "federation": True},
}


def run_sampling(overrides: list[str], site: str, n: int, out: Path) -> dict[str, Any]:
    """benchmarks/sampling.py on a trained run; `{"skipped": ...}` when the run has no models."""
    from benchmarks import sampling as sampling_bench

    try:
        return sampling_bench.main([*overrides, "--site", site, "--n", str(n), "--out", str(out)])
    except FileNotFoundError as exc:  # MissingStageError and a missing cohort/cache
        return {"skipped": f"no trained run for {overrides} ({exc}); train one first: "
                           f"aldm-fed data phantom --out cohort {' '.join(overrides)}, then aldm-fed train "
                           f"vae / scale / backbone / controlnet --site {site} with the same overrides"}


def run_script(name: str, extra: list[str]) -> dict[str, Any]:
    """benchmarks/<name>.py in a subprocess with `--out`, its JSON read back (or the error)."""
    script = HERE / f"{name}.py"
    if not script.is_file():
        return {"skipped": f"{script} does not exist"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        proc = subprocess.run([sys.executable, str(script), *extra, "--out", str(out)], check=False,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(proc.stdout, flush=True)
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"{script.name} exited {proc.returncode}", "output_tail": proc.stdout[-3000:]}
        return json.loads(out.read_text())


def _sampling_table(result: dict[str, Any]) -> str:
    lines = ["| sampler | steps | s/volume | speed-up | MMD to real | SSIM to paired real |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['s_per_volume']:.2f} | {r['speedup_vs_reference']:.1f}x "
                     f"| {r['mmd_to_real']:.4g} | {r['ssim_to_paired_real']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default: bench-<mode>.json)")
    ap.add_argument("--skip", nargs="+", default=[], choices=PARTS, help="parts to leave out")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, choices=sorted(steps_bench.PRESET),
                    help="steps: volume sizes (default: quick 32, full 32 64 96)")
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N1", "N2"), help="steps: N1 N2")
    ap.add_argument("--repeats", type=int, default=None, help="steps: timed repeats")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="steps: measure in this process (no peak-memory columns)")
    ap.add_argument("--sampling-overrides", nargs="+", default=None,
                    help="Hydra overrides naming the trained run (default: quick experiment=tiny, full experiment=demo)")
    ap.add_argument("--site", default="C", help="sampling: the site whose masks are sampled")
    ap.add_argument("--federation-args", default="", help="federation: its arguments, one string (e.g. '--experiment demo')")
    ap.add_argument("--extra", nargs="+", default=[], help="more benchmarks/NAME.py scripts to run (with --out)")
    args = ap.parse_args(argv)
    preset = MODES[args.mode]
    out = args.out or Path(f"bench-{args.mode}.json")
    parts: dict[str, Any] = {}

    if "steps" not in args.skip:
        sv = ["--sizes", *map(str, args.sizes or preset["sizes"])]
        sv += ["--steps", *map(str, args.steps)] if args.steps else []
        sv += ["--repeats", str(args.repeats)] if args.repeats else []
        sv += [] if args.isolate else ["--no-isolate"]
        print("== training steps ==", flush=True)
        parts["steps"] = steps_bench.main(sv)
    if "sampling" not in args.skip:
        print("== sampling ==", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            parts["sampling"] = run_sampling(args.sampling_overrides or preset["sampling"], args.site,
                                             preset["n"], Path(tmp) / "sampling.json")
        print(parts["sampling"]["skipped"] if "skipped" in parts["sampling"] else _sampling_table(parts["sampling"]),
              flush=True)
    if "imports" not in args.skip:
        print("== process start-up (imports) ==", flush=True)
        parts["imports"] = imports_bench.main(["--repeats", str(preset["import_repeats"])])
    if "federation" not in args.skip and preset["federation"]:
        print("== federation ==", flush=True)
        parts["federation"] = run_script("federation", args.federation_args.split())
    for name in args.extra:
        print(f"== {name} ==", flush=True)
        parts[name] = run_script(name, [])

    result = {"benchmark": "aldm-fed benchmarks (issue #7)", "mode": args.mode,
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": steps_bench.machine(),
              "parts": parts}
    from aldm_fed.io import atomic_write_json

    atomic_write_json(out, result)
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
