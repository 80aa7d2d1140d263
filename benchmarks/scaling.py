"""End-to-end scaling (issue #7): wall time and peak memory of `aldm-fed simulate` against the
number of sites (1..6) and the volume size, each run a fresh process in its own empty folder.

Sites are made by the phantom (`phantom.sites` replaced wholesale): site i gets scanner profile
A, B, C, A, B, C, ... in turn; the A- and B-profile sites hold source cases (they train the
shared VAE and backbone), C-profile sites only few-shot target and test cases, as in the embedded
cohort. So 1 site = one source site alone, 3 sites = the embedded cohort's shape, 6 = two of each.

Memory is the peak of the summed resident set of the whole process tree (the driver, Ray and every
simulated site), sampled every 0.2 s from /proc: what the machine must hold, not one process's.

    python benchmarks/scaling.py --sites 1 2 3 4 5 6 --out bench-scaling.json          # tiny, ~10 min
    python benchmarks/scaling.py --experiment demo --as-is --out bench-demo.json       # the README's main job
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aldm_fed.io import atomic_write_json

PROFILES = ("A", "B", "C")
SITE_NAMES = "ABCDEFGH"
# Cases per site by experiment (the phantom presets' budgets): source sites hold source cases.
CASES = {"tiny": {"n_source": 2, "n_test": 2}, "demo": {"n_source": 12, "n_test": 4}}


def site_overrides(n_sites: int, experiment: str) -> list[str]:
    """Hydra overrides that replace the phantom's sites with `n_sites` sites (see module doc).

    Args:
        n_sites: 1 to 8.
        experiment: "tiny" or "demo" (case counts per site).
    """
    if not 1 <= n_sites <= len(SITE_NAMES):
        raise ValueError(f"--sites: 1 to {len(SITE_NAMES)} sites, got {n_sites}")
    c = CASES[experiment]
    specs = []
    for i in range(n_sites):
        profile = PROFILES[i % len(PROFILES)]
        n_source = c["n_source"] if profile != "C" else 0
        specs.append(f"{SITE_NAMES[i]}:{{profile:{profile},n_source:{n_source},n_target:null,n_test:{c['n_test']}}}")
    return ["~phantom.sites", "+phantom.sites={" + ",".join(specs) + "}"]


def _tree_rss_mb(root: int) -> float:
    """Summed VmRSS (MB) of `root` and every descendant, read from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "status").read_text()
        except OSError:
            continue  # the process ended meanwhile
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        pid = int(entry.name)
        parents[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
    total = 0
    for pid, kb in rss.items():
        p, seen = pid, 0
        while p and p != root and seen < 64:
            p, seen = parents.get(p, 0), seen + 1
        if p == root:
            total += kb
    return total / 1024


def run_once(n_sites: int | None, experiment: str, size: int | None, workdir: Path, extra: list[str]) -> dict[str, Any]:
    """One `aldm-fed simulate` in `workdir`: wall time, exit code and peak tree RSS.

    Args:
        n_sites: sites to make (`site_overrides`); None = the experiment's own cohort as it is.
    """
    cli = shutil.which("aldm-fed") or str(Path(sys.executable).with_name("aldm-fed"))
    sites = site_overrides(n_sites, experiment) if n_sites is not None else []
    overrides = [f"experiment={experiment}", *sites,
                 *([f"data.size={size}"] if size else []), *extra]
    log = workdir / "simulate.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([cli, "simulate", *overrides, "--no-progress"], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    row = {"n_sites": n_sites, "experiment": experiment, "size": size, "wall_s": round(wall, 1),
           "peak_tree_rss_mb": round(peak[0]), "exit_code": code}
    if code != 0:
        row["log_tail"] = log.read_text(errors="replace")[-2000:]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--experiment", default="tiny", choices=sorted(CASES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[None],
                    help="volume sizes (data.size); default: the experiment's own")
    ap.add_argument("--as-is", action="store_true",
                    help="one run on the experiment's own cohort (the README's main job), instead of --sites")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: deleted)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. fed.phases.vae.rounds=1")
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes:
        for n in [None] if args.as_is else args.sites:
            with tempfile.TemporaryDirectory(prefix="aldm-scaling-") as tmp:
                workdir = Path(tmp)
                row = run_once(n, args.experiment, size, workdir, args.overrides)
                if args.keep:
                    shutil.copytree(workdir, args.keep / f"{args.experiment}-{size or 'default'}-{n or 'as-is'}sites",
                                    dirs_exist_ok=True)
            rows.append(row)
            print(f"{args.experiment} size {size or 'default'}  {n or 'as-is'} site(s): {row['wall_s']:7.1f} s  "
                  f"peak {row['peak_tree_rss_mb']:6d} MB (all processes)  exit {row['exit_code']}", flush=True)
    result = {
        "benchmark": "end-to-end simulate scaling with sites and volume size (issue #7)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
