"""Start-up cost of the processes Flower starts: import time of our apps, in fresh interpreters.

In a deployment every message starts a new `flwr-clientapp` process, which imports our ClientApp
(client/app.py -> `aldm_fed.federation.apps`) before it can run the message's phase. For each
target module this spawns `--repeats` fresh interpreters and reports the best wall time of the
import alone (measured inside the child) and of the whole process (interpreter start included,
measured from here), and which heavy packages the import loaded. Reference rows give the floor:
the bare interpreter, torch, Flower's `flwr.app` and MONAI's networks.

`--compare DIR` measures a second copy of `aldm_fed` side by side (DIR holds its `aldm_fed/`
folder, put first on the child's sys.path), e.g. the last commit before a change:

    git archive HEAD aldm_fed | tar -x -C /tmp/before
    python benchmarks/imports.py --compare /tmp/before --out bench-imports.json

Threads are pinned to 1 (OMP_NUM_THREADS) in the children, as a loaded machine would see them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# (label, module); the first four are the floor every aldm-fed process stands on.
TARGETS: tuple[tuple[str, str], ...] = (
    ("python (no import)", ""),
    ("torch", "torch"),
    ("flwr.app", "flwr.app"),
    ("monai.networks.nets", "monai.networks.nets"),
    ("aldm_fed.cli (aldm-fed --help)", "aldm_fed.cli"),
    ("aldm_fed.federation.apps (Flower loads the app)", "aldm_fed.federation.apps"),
    ("aldm_fed.federation.site (a phase runs)", "aldm_fed.federation.site"),
)
HEAVY = ("torch", "monai", "flwr", "sklearn", "scipy", "matplotlib", "nibabel", "PIL", "pandas", "hydra",
         "omegaconf", "numpy")

_CHILD = """
import json, sys, time
if {path!r}:
    sys.path.insert(0, {path!r})
t = time.perf_counter()
if {module!r}:
    __import__({module!r})
dt = time.perf_counter() - t
print(json.dumps({{"import_s": dt, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def time_import(module: str, repeats: int, path: str = "") -> dict[str, Any]:
    """Best-of-`repeats` import time of `module` in fresh interpreters.

    Args:
        module: dotted module name ("" = the bare interpreter).
        repeats: fresh interpreters to start.
        path: a folder put first on the child's sys.path ("" = none).

    Raises:
        RuntimeError: the import failed in the child (its stderr is in the message).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = _CHILD.format(path=path, module=module, heavy=HEAVY)
    best_import, best_process, loaded = float("inf"), float("inf"), []
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"importing {module!r} failed in a fresh interpreter:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        best_import, best_process = min(best_import, out["import_s"]), min(best_process, wall)
        loaded = out["loaded"]
    return {"import_s": best_import, "process_s": best_process, "loaded": loaded}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| import | which | best import s | best process s | heavy packages loaded |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['which']} | {r['import_s']:.2f} | {r['process_s']:.2f} "
                     f"| {', '.join(r['loaded']) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh interpreters per target (best of)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="a folder holding another aldm_fed/ to measure side by side (e.g. from git archive)")
    ap.add_argument("--targets", nargs="+", default=None, help="modules to time (default: the TARGETS table)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.compare is not None and not (args.compare / "aldm_fed" / "__init__.py").is_file():
        ap.error(f"--compare {args.compare}: no aldm_fed/__init__.py there")
    targets = [(m, m) for m in args.targets] if args.targets else list(TARGETS)
    rows = []
    for label, module in targets:
        copies = [("this tree", "")]
        if args.compare is not None and module.startswith("aldm_fed"):
            copies.append((f"--compare {args.compare}", str(args.compare.resolve())))
        for which, path in copies:
            row = {"target": label, "module": module, "which": which, **time_import(module, args.repeats, path)}
            rows.append(row)
            print(f"{label:50s} {which:28s} import {row['import_s']:6.2f} s  process {row['process_s']:6.2f} s"
                  f"  loaded: {', '.join(row['loaded']) or '-'}", flush=True)
    result = {
        "benchmark": "import time of fresh processes",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "threads": 1},
        "repeats": args.repeats, "rows": rows,
    }
    print(format_table(rows), flush=True)
    if args.out:
        from aldm_fed.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
