"""Is the brain around each synthetic tumour plausible? A site's synthesis folder against the real cases.

For every volume of `aldm-fed synthesize`'s output (`paths.synthesis` of the site, or `--dir`): the
mean and std of each modality inside the host case's brain, outside the tumour dilated by the VAE's
downsampling factor, against the [min, max] the cohort's real cases span over the same region
(`aldm_fed.evaluation.plausibility`). A volume is plausible when no statistic lies more than
`--margin` outside that range. Prints one line per volume and the count; `--out` writes JSON.

    python benchmarks/plausibility.py experiment=demo run_name=demo-long --site C
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.evaluation.image_quality import host_of
from aldm_fed.evaluation.plausibility import STAT_MARGIN, RealRange, brain_statistics
from aldm_fed.evaluation.tasks import items_from_synthesis
from aldm_fed.io import atomic_write_json
from aldm_fed.models import vae_downsample_factor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides naming the run and cohort")
    ap.add_argument("--site", required=True)
    ap.add_argument("--dir", type=Path, default=None, help="synthesis folder (default: the site's paths.synthesis)")
    ap.add_argument("--margin", type=float, default=STAT_MARGIN)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    cfg = compose([*args.overrides, f"site={args.site}"])
    syn_dir = args.dir or Path(str(cfg.paths.synthesis))
    items = items_from_synthesis(syn_dir)  # a clear error when the folder is missing or incomplete
    dilate = vae_downsample_factor(cfg.model.vae)

    # Every real case of the cohort (any site, any split): the range a plausible brain lies in.
    cases = []
    for site, (_, manifest) in site_manifests(str(cfg.paths.cohort)).items():
        for split in ("source", "target", "test"):
            if manifest.cases(split):
                load_split(cfg, split, sites=[site], progress=False)  # prepares what the cache lacks
                cases += manifest.cases(split)
    cache = CaseCache(str(cfg.paths.cache))
    real = RealRange.from_cases(((c.image, c.brain > 0, c.seg) for c in map(cache.load, cases)), dilate)

    rows = []
    for it in items:
        host = host_of(it)
        if host is None:
            raise ValueError(f"{syn_dir}: volume {it.group} names no host case in its record.json")
        stats = brain_statistics(it.image, cache.load(host).brain > 0, it.seg, dilate)
        bad = real.outside(stats, args.margin)
        rows.append({"volume": it.group, "host": host, "mean": stats[:, 0].tolist(), "std": stats[:, 1].tolist(),
                     "excess": real.excess(stats), "plausible": not bad})
        print(f"{it.group}: means {[round(v, 3) for v in stats[:, 0]]} stds {[round(v, 3) for v in stats[:, 1]]}"
              f"  beyond the real range by {rows[-1]['excess']:+.3f}  {'ok' if not bad else 'NOT plausible'}")
    n_ok = sum(r["plausible"] for r in rows)
    print(f"{n_ok}/{len(rows)} volumes within the real range +- {args.margin} "
          f"({real.n_cases} real cases: means {real.lo[:, 0].round(3).tolist()} .. {real.hi[:, 0].round(3).tolist()})",
          flush=True)
    result = {
        "benchmark": "brain plausibility of synthetic volumes",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "site": args.site, "dir": str(syn_dir), "overrides": args.overrides, "margin": args.margin,
        "dilate": dilate, "real": {"n": real.n_cases, "lo": real.lo.tolist(), "hi": real.hi.tolist()},
        "n_plausible": n_ok, "n": len(rows), "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
