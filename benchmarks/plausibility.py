"""Is the brain around each synthetic tumour plausible? A site's synthesis folder against the real cases.

For every volume of `aldm-fed synthesize`'s output (`paths.synthesis` of the site, or `--dir`): the
mean and std of each modality inside the host case's brain, outside the tumour dilated by the VAE's
downsampling factor, against the [min, max] the cohort's real cases span over the same region
(`aldm_fed.evaluation.plausibility`). A volume is plausible when no statistic lies more than
`--margin` outside that range. Prints one line per volume and the count; `--out` writes JSON.
`--range site` takes the site's own K target cases instead (the report's "brain plausible"
column); `--reconstructions` adds the run's VAE reconstructions of those cases, the best any
latent model decoded by that VAE can show.

    python benchmarks/plausibility.py experiment=demo run_name=demo-long --site C
    python benchmarks/plausibility.py experiment=demo run_name=demo-long --site C --range site --reconstructions
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
from aldm_fed.evaluation.image_quality import host_of
from aldm_fed.evaluation.plausibility import STAT_MARGIN, RealRange, brain_statistics
from aldm_fed.evaluation.tasks import items_from_synthesis
from aldm_fed.io import atomic_write_json
from aldm_fed.models import vae_downsample_factor
from aldm_fed.training.artifacts import load_generative_models


def _r(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]


def _check(name: str, host: str, stats: np.ndarray, real: RealRange, margin: float) -> dict[str, Any]:
    bad = real.outside(stats, margin)
    row = {"volume": name, "host": host, "mean": stats[:, 0].tolist(), "std": stats[:, 1].tolist(),
           "excess": real.excess(stats), "plausible": not bad}
    print(f"{name}: means {_r(stats[:, 0])} stds {_r(stats[:, 1])}"
          f"  beyond the real range by {row['excess']:+.3f}  {'ok' if not bad else 'NOT plausible'}")
    return row


def _summary(what: str, rows: list[dict[str, Any]], margin: float) -> int:
    n_ok = sum(r["plausible"] for r in rows)
    print(f"{what}: {n_ok}/{len(rows)} within the real range +- {margin}", flush=True)
    return n_ok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides naming the run and cohort")
    ap.add_argument("--site", required=True)
    ap.add_argument("--dir", type=Path, default=None, help="synthesis folder (default: the site's paths.synthesis)")
    ap.add_argument("--range", choices=("cohort", "site"), default="cohort",
                    help="real cases that span the range: every case of the cohort, or the site's K target "
                         "cases (what the report's 'brain plausible' column uses)")
    ap.add_argument("--reconstructions", action="store_true",
                    help="also check the run's VAE reconstructions of the site's target cases: the best a "
                         "latent model decoded by this VAE can show")
    ap.add_argument("--margin", type=float, default=STAT_MARGIN)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    cfg = compose([*args.overrides, f"site={args.site}"])
    syn_dir = args.dir or Path(str(cfg.paths.synthesis))
    items = items_from_synthesis(syn_dir)  # a clear error when the folder is missing or incomplete
    dilate = vae_downsample_factor(cfg.model.vae)

    # The real cases whose statistics span the range a plausible brain lies in.
    manifests = site_manifests(str(cfg.paths.cohort))
    if args.site not in manifests:
        ap.error(f"no site {args.site!r} in {cfg.paths.cohort} (sites: {sorted(manifests)})")
    wanted = {args.site: ("target",)} if args.range == "site" else {s: ("source", "target", "test") for s in manifests}
    cases = []
    for site, splits in wanted.items():
        for split in splits:
            if manifests[site][1].cases(split):
                load_split(cfg, split, sites=[site], progress=False)  # prepares what the cache lacks
                cases += manifests[site][1].cases(split)
    cache = CaseCache(str(cfg.paths.cache))
    real = RealRange.from_cases(((c.image, c.brain > 0, c.seg) for c in map(cache.load, cases)), dilate)
    print(f"real range ({args.range}, {real.n_cases} cases): means {_r(real.lo[:, 0])} .. {_r(real.hi[:, 0])}, "
          f"stds {_r(real.lo[:, 1])} .. {_r(real.hi[:, 1])}")

    rows = []
    for it in items:
        host = host_of(it)
        if host is None:
            raise ValueError(f"{syn_dir}: volume {it.group} names no host case in its record.json")
        rows.append(_check(it.group, host, brain_statistics(it.image, cache.load(host).brain > 0, it.seg, dilate),
                           real, args.margin))
    n_ok = _summary("synthetic volumes", rows, args.margin)

    recon_rows: list[dict[str, Any]] = []
    if args.reconstructions:
        vae = load_generative_models(cfg, args.site).vae  # the weights synthesis decodes with
        for case_id in manifests[args.site][1].cases("target"):  # prepared above, with the range's cases
            case = cache.load(case_id, mmap=False)
            with torch.no_grad():
                recon = vae.reconstruct(torch.from_numpy(case.image)[None])[0].float().numpy()  # posterior mean
            stats = brain_statistics(recon, case.brain > 0, case.seg, dilate)
            recon_rows.append(_check(f"VAE({case_id})", case_id, stats, real, args.margin))
        _summary("VAE reconstructions of the site's target cases", recon_rows, args.margin)

    result = {
        "benchmark": "brain plausibility of synthetic volumes",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "site": args.site, "dir": str(syn_dir), "overrides": args.overrides, "margin": args.margin,
        "dilate": dilate, "range": args.range,
        "real": {"n": real.n_cases, "lo": real.lo.tolist(), "hi": real.hi.tolist()},
        "n_plausible": n_ok, "n": len(rows), "rows": rows,
        "reconstructions": {"n_plausible": sum(r["plausible"] for r in recon_rows), "n": len(recon_rows),
                            "rows": recon_rows} if args.reconstructions else None,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
