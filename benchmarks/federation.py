"""The federation's own cost per round, at full and half precision and under secure aggregation:
`aldm-fed simulate` once per `fed.transfer_dtype` (and, with `--secagg`, once more at float32 with
`fed.privacy.secagg.enabled=true`), same cohort, same seed, separate run folders.

For each run it reads the server's `rounds.jsonl` (each round's "cost": wall time at the server,
each site's compute-seconds, weight bytes sent to and received from each site; see
docs/contracts.md) and prints, per FedAvg phase, the means over rounds of

- round wall s, max local compute s (the slowest site's time inside its training function),
  overhead fraction = (wall - max compute) / wall: process and message handling, casting,
  signing, serialisation, transfer, checks and aggregation;
- bytes sent / received per site per round (`ArrayRecord.count_bytes`: the arrays' payload with
  NumPy headers and key names; under SecAgg+ also its keys, encrypted shares and the int64 masked
  update, over its four stages), the shared parameters' size at float32, and the ratio of each
  run's bytes to the first run's (float32);

and the final quality figures the run reports, to show that the cheaper transfer did not cost
quality: the last round's training loss of the VAE and of the backbone, each site's ControlNet
adaptation loss, the mean AUC of `real_syn` and `real_only` over the sites, and the largest
difference of the global VAE and backbone weights from the first run's. Writes everything as JSON.

    python benchmarks/federation.py --workdir /tmp/bench-fed --out bench-federation.json     # tiny: ~2 x 2 min
    python benchmarks/federation.py --experiment demo --workdir /tmp/bench-fed-demo           # LONG: ~2 x 30 min
    python benchmarks/federation.py --dtypes float32 --secagg --workdir /tmp/bench-fed        # plain vs SecAgg+

Extra arguments are config overrides for both runs (e.g. `fed.phases.vae.rounds=3`). The run
folders `<workdir>/runs/bench-fed-<dtype>` are the benchmark's own and are replaced on each call;
the cohort in `<workdir>/cohort` is made once and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from aldm_fed.checkpoints import load_checkpoint
from aldm_fed.federation.coordinator import cost_summary
from aldm_fed.federation.records import TRANSFER_DTYPES
from aldm_fed.io import atomic_write_json

PHASES = ("vae", "backbone")


def _aldm_fed() -> str:
    exe = Path(sys.executable).with_name("aldm-fed")
    found = str(exe) if exe.is_file() else shutil.which("aldm-fed")
    if not found:
        raise SystemExit("aldm-fed is not installed in this environment (pip install -e .)")
    return found


def run_simulation(
    workdir: Path, experiment: str, dtype: str, overrides: list[str], secure: bool = False
) -> dict[str, Any]:
    """One `aldm-fed simulate` with `fed.transfer_dtype=dtype` (and SecAgg+ if `secure`); its
    folders and wall time."""
    name = f"bench-fed-{dtype}" + ("-secagg" if secure else "")
    run_dir = workdir / "runs" / name
    if run_dir.exists():  # the benchmark's own folder: a resumed run would train nothing
        shutil.rmtree(run_dir)
    cmd = [_aldm_fed(), "simulate", f"experiment={experiment}", f"run_name={name}",
           f"paths.cohort={workdir / 'cohort'}", f"fed.transfer_dtype={dtype}",
           *(["fed.privacy.secagg.enabled=true"] if secure else []), *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)  # a failure is reported below, with the log
    seconds = time.monotonic() - t0
    (workdir / f"{name}.log").write_text(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}); log: {workdir / f'{name}.log'}\n"
                         + "\n".join(done.stdout.splitlines()[-20:]))
    label = f"{dtype} + SecAgg+" if secure else dtype
    return {"dtype": label, "run": name, "run_dir": run_dir, "seconds": seconds}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, int | float)]
    return sum(values) / len(values) if values else None


def quality(run_dir: Path) -> dict[str, Any]:
    """The final quality figures a federated run reports (see the module docstring)."""
    state = run_dir / "federation"
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {}
    for phase in PHASES:
        last = [r for r in rounds if r["phase"] == phase]
        out[f"{phase}_loss"] = last[-1]["metrics"].get("loss") if last else None
    report = json.loads((state / "report.json").read_text())
    sites = report.get("sites", {})
    out["adapt_loss"] = {s: v.get("work", {}).get("adapt.loss") for s, v in sorted(sites.items())}
    for regime in ("real_syn", "real_only"):
        out[f"auc_{regime}"] = _mean([v.get("regimes", {}).get(regime, {}).get("auc_mean") for v in sites.values()])
    return out


def _max_abs_difference(a: Path, b: Path) -> float:
    """Largest |w_a - w_b| over the floating tensors of two checkpoints."""
    ta, tb = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return max((float((ta[g][k].float() - tb[g][k].float()).abs().max())
                for g in ta for k in ta[g] if ta[g][k].is_floating_point()), default=0.0)


def weight_difference(run_dir: Path, reference: Path) -> dict[str, float]:
    """Largest |w - w_reference| of the global VAE and backbone finals (float32 on disk), and of
    the first VAE round's global weights ("vae_round1", while the server still keeps that round):
    both runs start it from the same
    weights and their sites train the same way, so it shows the transfer's own error (half
    precision, SecAgg+'s quantisation) before training dynamics amplify it in later rounds."""
    out = {stage: _max_abs_difference(run_dir / stage / "final", reference / stage / "final") for stage in PHASES}
    first = Path("federation") / "rounds" / "vae" / "round_0001"  # ServerState.round_dir
    if (run_dir / first).is_dir() and (reference / first).is_dir():
        out["vae_round1"] = _max_abs_difference(run_dir / first, reference / first)
    return out


def measure(run: dict[str, Any]) -> dict[str, Any]:
    state = run["run_dir"] / "federation"
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return {"dtype": run["dtype"], "seconds": round(run["seconds"], 1), "phases": cost_summary(rounds),
            "quality": quality(run["run_dir"]), "rounds": [{k: r[k] for k in ("phase", "round", "cost") if k in r}
                                                            for r in rounds]}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: list[dict[str, Any]]) -> str:
    """The per-phase cost table and the quality table (Markdown)."""
    base = results[0]
    lines = ["| phase | transfer | round wall s | max local compute s | overhead fraction | bytes sent / site / round "
             "| bytes received / site / round | shared params bytes (fp32) | bytes vs " + base["dtype"] + " |",
             "|---|---|---|---|---|---|---|---|---|"]
    for phase in PHASES:
        for r in results:
            c = r["phases"].get(phase)
            if not c:
                continue
            ref = base["phases"].get(phase, {}).get("bytes_sent_per_site")
            ratio = c["bytes_sent_per_site"] / ref if ref and c.get("bytes_sent_per_site") else None
            lines.append(f"| {phase} | {r['dtype']} | {_fmt(c['wall_s'])} | {_fmt(c['max_compute_s'])} | "
                         f"{_fmt(c['overhead_fraction'], 2)} | {_fmt(c['bytes_sent_per_site'])} | "
                         f"{_fmt(c['bytes_received_per_site'])} | {_fmt(c['params_bytes_fp32'])} | {_fmt(ratio, 3)} |")
    lines += ["", "| transfer | run s | VAE loss (last round) | backbone loss (last round) | ControlNet adaptation loss "
              "per site | AUC real_syn (mean over sites) | AUC real_only | max abs weight diff vs " + base["dtype"]
              + " (VAE / backbone) | same, VAE after round 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        q, d = r["quality"], r.get("weight_diff", {})
        adapt = ", ".join(f"{s} {_fmt(v, 4)}" for s, v in q["adapt_loss"].items())
        lines.append(f"| {r['dtype']} | {_fmt(r['seconds'])} | {_fmt(q['vae_loss'], 4)} | {_fmt(q['backbone_loss'], 4)} | "
                     f"{adapt} | {_fmt(q['auc_real_syn'])} | {_fmt(q['auc_real_only'])} | "
                     f"{_fmt(d.get('vae'), 2)} / {_fmt(d.get('backbone'), 2)} | {_fmt(d.get('vae_round1'), 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. fed.phases.vae.rounds=3")
    ap.add_argument("--experiment", default="tiny", help="tiny (minutes) or demo (LONG: ~30 min per run on 2 cores)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=sorted(TRANSFER_DTYPES),
                    help="transfer dtypes, one run each; the first is the reference")
    ap.add_argument("--secagg", action="store_true",
                    help="one more run at float32 with secure aggregation (fed.privacy.secagg.enabled=true)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-federation"),
                    help="folder of the cohort and the runs (made if missing)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "cohort" / "manifests").is_dir():  # made once, outside the timed runs
        subprocess.run([_aldm_fed(), "data", "phantom", "--out", str(workdir / "cohort"),
                        f"experiment={args.experiment}"], cwd=workdir, check=True)
    runs = [run_simulation(workdir, args.experiment, dtype, list(args.overrides)) for dtype in args.dtypes]
    if args.secagg:
        runs.append(run_simulation(workdir, args.experiment, "float32", list(args.overrides), secure=True))
    results = [measure(run) for run in runs]
    for run, result in zip(runs[1:], results[1:], strict=True):
        result["weight_diff"] = weight_difference(run["run_dir"], runs[0]["run_dir"])
    print(table(results))
    if args.out is not None:
        atomic_write_json(args.out, {
            "benchmark": "federation", "experiment": args.experiment, "overrides": list(args.overrides),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "results": results,
        })
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
