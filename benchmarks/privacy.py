"""What central DP costs: FedAvg rounds through the real `privacy.CentralDP` + `PhaseFedAvg`
aggregation on tensors of the real shapes (a phase's global weights), without training.

Each site pulls the model towards its own optimum (a quadratic loss 0.5 ||w - t_i||^2 whose
optimum lies at distance `--target-norm` from the initial weights, a shared direction plus a
site-specific one); one local step per round moves it half way (an update of norm ~ C). The server
clips, levels, averages and noises exactly as in a run. Printed per noise multiplier z: epsilon at
delta after all rounds (RDP, Flower's accountant), the final loss as a fraction of the initial one
(1.0 = no progress; noise can push it above 1), and the noise norm over the averaged update norm
in the first round. The loss is a surrogate (no network is trained), the shapes and the noise are real.

    python benchmarks/privacy.py experiment=tiny --phase vae --sites 2 --rounds 9 --noise 0 0.1 1.0
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from aldm_fed.config import compose
from aldm_fed.federation.global_models import initial_weights
from aldm_fed.federation.privacy import CentralDP, DPSettings, epsilon_after
from aldm_fed.federation.records import to_array_record
from aldm_fed.federation.strategy import PhaseFedAvg
from aldm_fed.io import atomic_write_json


def _reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n}),
    }), metadata=meta)


def _loss(w: dict[str, np.ndarray], targets: list[dict[str, np.ndarray]]) -> float:
    return float(np.mean([sum(0.5 * float(((w[k] - t[k]) ** 2).sum()) for k in w) for t in targets]))


def run(start: dict[str, np.ndarray], phase: str, n_sites: int, rounds: int, dp: DPSettings | None,
        target_norm: float, seed: int) -> dict[str, float]:
    """FedAvg rounds from `start` with central DP (`dp`) or plain FedAvg (None)."""
    rng = np.random.default_rng(seed)
    size = math.sqrt(sum(v.size for v in start.values()))

    def direction() -> dict[str, np.ndarray]:
        return {k: rng.normal(size=v.shape).astype(np.float32) / size for k, v in start.items()}

    shared = direction()
    targets = []
    for _ in range(n_sites):  # 70 % shared optimum, 30 % the site's own, norm ~ target_norm
        own = direction()
        targets.append({k: start[k] + target_norm * (0.95 * shared[k] + 0.31 * own[k]) for k in start})
    nodes = {i + 1: chr(ord("A") + i) for i in range(n_sites)}
    shapes = {k: tuple(v.shape) for k, v in start.items()}

    def build(callback: Any) -> PhaseFedAvg:
        return PhaseFedAvg(phase, nodes, expected=shapes, on_round=callback)

    strategy = (CentralDP(build, dp, lambda *a: None, population=n_sites) if dp is not None
                else build(lambda *a: None))
    w = dict(start)
    first = _loss(w, targets)
    ratio = 0.0
    for rnd in range(1, rounds + 1):
        record = ArrayRecord({k: Array(v) for k, v in w.items()})
        list(strategy.configure_train(rnd, record, ConfigRecord({}), grid=None))  # type: ignore[arg-type]
        local = [{k: w[k] + 0.5 * (t[k] - w[k]) for k in w} for t in targets]  # one step, lr 0.5
        arrays, _ = strategy.aggregate_train(rnd, [_reply(n, local[n - 1], 10) for n in nodes])
        assert arrays is not None
        new = {k: arrays[k].numpy() for k in w}
        mean_update = {k: np.mean([loc[k] for loc in local], axis=0) - w[k] for k in w}
        update_norm = math.sqrt(sum(float((u**2).sum()) for u in mean_update.values()))
        noise_norm = math.sqrt(sum(float(((new[k] - w[k] - mean_update[k]) ** 2).sum()) for k in w))
        if rnd == 1:  # the same start for every setting: comparable
            ratio = noise_norm / max(update_norm, 1e-12)
        w = new
    return {"loss_ratio": _loss(w, targets) / first, "noise_over_update": ratio}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=demo")
    ap.add_argument("--phase", default="vae", choices=["vae", "backbone"])
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="noised releases (demo: 4 vae + 5 backbone)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    ap.add_argument("--clipping-norm", type=float, default=1.0)
    ap.add_argument("--target-norm", type=float, default=2.0, help="distance of the optima (first updates ~ C)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower logs every aggregation
    cfg = compose(["experiment=tiny", *args.overrides])
    start = {k: a.numpy().astype(np.float32) for k, a in
             to_array_record(initial_weights(cfg, args.phase)).items()}
    n_params = sum(v.size for v in start.values())
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        setattr(TaskIdentity, name, value)  # Messages need a run id (normally the ServerApp's)
    print(f"{args.phase}: {n_params:,} parameters, {args.sites} sites, {args.rounds} rounds, "
          f"C={args.clipping_norm}, delta={args.delta}, {args.seeds} seeds")
    rows = []
    settings: list[DPSettings | None] = [None] + [
        DPSettings(True, z, args.clipping_norm, args.delta) for z in args.noise]
    for dp in settings:
        t0 = time.monotonic()
        runs = [run(start, args.phase, args.sites, args.rounds, dp, args.target_norm, s) for s in range(args.seeds)]
        eps = math.nan if dp is None else epsilon_after(dp, args.rounds, args.sites)
        row = {"setting": "fedavg (no DP)" if dp is None else f"dp z={dp.noise_multiplier:g}",
               "epsilon": eps, "final_loss_ratio": float(np.mean([r["loss_ratio"] for r in runs])),
               "final_loss_ratio_std": float(np.std([r["loss_ratio"] for r in runs])),
               "noise_over_update": float(np.mean([r["noise_over_update"] for r in runs])),
               "seconds_per_round": (time.monotonic() - t0) / (args.rounds * args.seeds)}
        rows.append(row)
        print(f"{row['setting']:>16}  epsilon {row['epsilon']:>9.4g}  final loss / initial "
              f"{row['final_loss_ratio']:>10.4g} ± {row['final_loss_ratio_std']:.2g}  noise/update "
              f"{row['noise_over_update']:>9.3g}  {row['seconds_per_round']:.2f} s/round")
    if args.out is not None:
        atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params,
                                     "rows": rows})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
