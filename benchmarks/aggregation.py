"""FedAvg, coordinate-wise median and trimmed mean side by side, with and without one poisoned site.

On the VAE of an experiment (its real state dict, `initial_weights`, as the global weights G):

- each honest site i sends G + c + n_i, where c is a step shared by all sites (what they agree
  on) and n_i the site's own deviation, both N(0, sigma^2) per weight (sigma = `--step`, default
  1e-3: roughly what 50 AdamW steps at lr 1e-4 move a weight), weighted by num-examples;
- the last site is honest ("clean") or poisoned: its update (c + n) scaled x100, sign-flipped,
  or with 1 % of its weights NaN.

For every aggregator it prints the distance of the aggregate to the clean FedAvg (every site
honest), relative to the norm of the clean FedAvg update (so 1.0 = an error as large as the whole
update), once for the aggregator alone ("raw") and once after the server's checks
(`sharing.check_reply`: keys, shapes, NaN/Inf; `aggregation.norm_outliers` with
`fed.robust.norm_factor`), and the aggregation time (best of `--repeats`).

    python benchmarks/aggregation.py --experiment demo --sites 4 --out bench-aggregation.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from aldm_fed.config import compose
from aldm_fed.federation.aggregation import (
    AGGREGATIONS,
    RobustSettings,
    aggregate_arrays,
    norm_outliers,
    update_norms,
)
from aldm_fed.federation.global_models import initial_weights
from aldm_fed.federation.records import to_array_record
from aldm_fed.federation.sharing import SharingError, check_reply
from aldm_fed.io import atomic_write_json

ATTACKS = ("clean", "x100", "sign-flip", "nan")
EXAMPLES = (12, 12, 8, 16, 10, 14, 9, 11)  # num-examples of sites 1, 2, ... (source cases)


def _flat(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy().astype(np.float64) for k, a in arrays.items()}


def _record(values: dict[str, np.ndarray], n: int) -> RecordDict:
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in values.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})


def make_updates(glob: dict[str, np.ndarray], sites: int, step: float, seed: int) -> list[dict[str, np.ndarray]]:
    """Each site's honest update (c + n_i), per tensor, float64."""
    rng = np.random.default_rng(seed)
    common = {k: rng.normal(0.0, step, v.shape) for k, v in glob.items()}
    return [{k: common[k] + rng.normal(0.0, step, v.shape) for k, v in glob.items()} for _ in range(sites)]


def poison(update: dict[str, np.ndarray], attack: str, seed: int) -> dict[str, np.ndarray]:
    if attack == "clean":
        return update
    if attack == "x100":
        return {k: 100.0 * v for k, v in update.items()}
    if attack == "sign-flip":
        return {k: -v for k, v in update.items()}
    if attack == "nan":
        rng = np.random.default_rng(seed)
        return {k: np.where(rng.random(v.shape) < 0.01, np.nan, v) for k, v in update.items()}
    raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")


def server_checks(
    contents: list[RecordDict], glob: ArrayRecord, expected: dict[str, tuple[int, ...]], factor: float
) -> list[int]:
    """Indices of the replies PhaseFedAvg would aggregate (allow-list/NaN check, then norm rule)."""
    valid = []
    for i, content in enumerate(contents):
        try:
            check_reply("vae", content, expected)
        except SharingError:
            continue
        valid.append(i)
    norms = {str(i): update_norms(contents[i]["arrays"], glob) for i in valid}
    outliers = norm_outliers(norms, factor)
    return [i for i in valid if str(i) not in outliers]


def distance(agg: ArrayRecord, ref: dict[str, np.ndarray]) -> float:
    total = 0.0
    for key, value in _flat(agg).items():
        d = (value - ref[key]).ravel()
        total += float(np.dot(d, d))
    return float(np.sqrt(total))


def run(experiment: str, sites: int, step: float, repeats: int, seed: int) -> dict[str, Any]:
    cfg = compose([f"experiment={experiment}"])
    settings = RobustSettings.from_cfg(cfg.fed)
    glob_record = to_array_record(initial_weights(cfg, "vae"))
    glob = _flat(glob_record)
    expected = {k: tuple(a.shape) for k, a in glob_record.items()}
    n_params = int(sum(v.size for v in glob.values()))
    weights = [EXAMPLES[i % len(EXAMPLES)] for i in range(sites)]
    honest = make_updates(glob, sites, step, seed)

    clean = aggregate_arrays([_record({k: glob[k] + u[k] for k in glob}, n) for u, n in zip(honest, weights)], "fedavg")
    clean_flat = _flat(clean)
    clean_norm = distance(clean, glob)  # ||clean FedAvg - G||

    rows = []
    for attack in ATTACKS:
        updates = honest[:-1] + [poison(honest[-1], attack, seed + 1)]
        contents = [_record({k: glob[k] + u[k] for k in glob}, n) for u, n in zip(updates, weights)]
        kept = server_checks(contents, glob_record, expected, float(settings.norm_factor or 0.0))
        for method in AGGREGATIONS:
            kwargs = {"trim_fraction": settings.trim_fraction}
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                raw = aggregate_arrays(contents, method, **kwargs)
                best = min(best, time.perf_counter() - t0)
            checked = aggregate_arrays([contents[i] for i in kept], method, **kwargs)
            rows.append({
                "attack": attack, "method": method,
                "raw_rel_distance": distance(raw, clean_flat) / clean_norm,
                "checked_rel_distance": distance(checked, clean_flat) / clean_norm,
                "kept_sites": len(kept), "seconds": best,
            })
    return {
        "experiment": experiment, "sites": sites, "step": step, "params": n_params,
        "norm_factor": settings.norm_factor, "trim_fraction": settings.trim_fraction,
        "clean_update_norm": clean_norm, "rows": rows,
        "machine": platform.platform(), "python": sys.version.split()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _fmt(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="demo", help="whose VAE (tiny | demo | ...)")
    parser.add_argument("--sites", type=int, default=4, help="sites sending updates; the last may be poisoned")
    parser.add_argument("--step", type=float, default=1e-3, help="std of the honest per-weight update parts")
    parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.sites < 2:
        parser.error("--sites must be at least 2")
    result = run(args.experiment, args.sites, args.step, args.repeats, args.seed)
    print(f"VAE of experiment={result['experiment']}: {result['params']:,} weights, {result['sites']} sites "
          f"(the last one attacked), norm_factor={result['norm_factor']}, trim_fraction={result['trim_fraction']}")
    print("distance to the clean FedAvg / norm of the clean FedAvg update; raw = aggregator alone, "
          "checked = after the server's checks\n")
    print("| attack | method | raw | checked | sites kept | time (ms) |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['attack']} | {r['method']} | {_fmt(r['raw_rel_distance'])} | {_fmt(r['checked_rel_distance'])} "
              f"| {r['kept_sites']} of {result['sites']} | {1000 * r['seconds']:.1f} |")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
