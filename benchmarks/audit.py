"""The memorisation audit's ratios and the cost of its mirror (issue #8), on the tiny phantom.

Builds the tiny phantom and its cache in `--workdir`, takes site A's target + source cases as the
reference, and audits with `audit.mirror` on and off: noisy copies (sigma 0.02 / 0.1) and
one-voxel-shifted copies of each reference case, the same of its left-right mirror, and the other
sites' real patients. Prints the image-ratio range and the number flagged per kind, then the
audit's wall time with the mirror on vs off (8 volumes, alternated, median of `--repeats`).

    python benchmarks/audit.py --workdir /tmp/bench-audit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from aldm_fed.config import compose
from aldm_fed.data.cache import CaseCache
from aldm_fed.data.phantom import PhantomConfig, make_cohort
from aldm_fed.data.volumes import load_split, site_manifests
from aldm_fed.synthesis.audit import AuditSettings, AuditVolume, audit_volumes, mirror_volume


def _cases(cohort: Path, site: str, *splits: str) -> list[str]:
    _, manifest = site_manifests(str(cohort), [site])[site]
    return [c for s in splits for c in manifest.cases(s)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cohort, cache_dir = args.workdir / "cohort", args.workdir / "cache"
    cfg = compose(["experiment=tiny", "device=cpu", f"paths.cohort={cohort}", f"paths.cache={cache_dir}"])
    if not (cohort / "manifests").is_dir():
        make_cohort(cohort, PhantomConfig.from_mapping(cfg.phantom), seed=0, progress=False)
    for site in "ABC":
        for split in ("source", "target", "test"):
            if _cases(cohort, site, split):
                load_split(cfg, split, sites=[site], progress=False)  # fills the cache
    cache = CaseCache(str(cache_dir))

    def volume(case_id: str) -> AuditVolume:
        case = cache.load(case_id)
        return AuditVolume(case_id, np.asarray(case.image), np.asarray(case.brain))

    def noisy(v: AuditVolume, sid: str, sigma: float, seed: int) -> AuditVolume:
        brain = np.asarray(v.mask()) > 0
        img = np.clip(v.image + np.random.default_rng(seed).normal(0, sigma, v.image.shape), 0, 1) * brain
        return AuditVolume(sid, img.astype(np.float32))

    reference = [volume(c) for c in _cases(cohort, "A", "target", "source")]
    copies = []
    for i, v in enumerate(reference):
        for form, base in (("plain", v), ("mirrored", mirror_volume(v))):
            copies += [noisy(base, f"{form}:noise0.02:{i}", 0.02, i), noisy(base, f"{form}:noise0.1:{i}", 0.1, i),
                       AuditVolume(f"{form}:shift1:{i}", np.roll(base.image * (np.asarray(base.mask()) > 0), 1, axis=1))]
    others = [AuditVolume(c, volume(c).image) for c in
              _cases(cohort, "A", "test") + _cases(cohort, "B", "source", "target", "test") + _cases(cohort, "C", "target", "test")]
    print(f"reference: site A, {len(reference)} cases; other patients: {len(others)}")
    for mirror in (True, False):
        settings = AuditSettings(mirror=mirror)
        result = audit_volumes(copies, reference, settings)
        kinds: dict[str, list] = {}
        for s in result.samples:
            kinds.setdefault(s.synth_id.rsplit(":", 1)[0], []).append(s)
        for kind, samples in kinds.items():
            r = [s.ratio for s in samples]
            print(f"mirror={mirror!s:5s} {kind:22s} ratio {min(r):.2f}-{max(r):.2f}  flagged {sum(s.flagged for s in samples)}/{len(r)}")
        r = [s.ratio for s in audit_volumes(others, reference, settings).samples]
        print(f"mirror={mirror!s:5s} {'other patients':22s} ratio {min(r):.2f}-{max(r):.2f}  "
              f"flagged {sum(x < settings.threshold for x in r)}/{len(r)}")
    timed = copies[:4] + others[:4]
    times: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.repeats + 1):
        for mirror in (True, False):
            t = time.perf_counter()
            audit_volumes(timed, reference, AuditSettings(mirror=mirror))
            if rep:  # the first round warms up
                times[mirror].append(time.perf_counter() - t)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"audit of {len(timed)} volumes: mirror on {on:.2f} s, off {off:.2f} s, on/off {on / off:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
