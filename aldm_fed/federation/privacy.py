"""Privacy options of the shared phases (vae, backbone): central differential privacy, and the
settings of secure aggregation (`SecAggSettings`; the protocol itself runs in `secure`).

Central DP (`fed.privacy.dp`) follows Flower's server-side fixed clipping
(`flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`; McMahan et al. 2018): each
site's update (its weights minus the global weights it started from) is clipped to an L2 norm of
`clipping_norm`, the clipped updates are averaged with EQUAL weights, and Gaussian noise of standard
deviation `noise_multiplier * clipping_norm / n` (n = sites averaged) is added to the global model.
The noise protects each SITE's whole contribution (site-level DP, add/remove one site), and the
privacy budget epsilon at `delta` is accounted over every noised release of the run (vae rounds,
then backbone rounds) with Flower's RDP accountant (`flwr[dp]`, Google's dp-accounting). Sites are
not sampled, so there is no amplification by sampling.

Why a wrapper of our own instead of Flower's: its wrapper (flwr/serverapp/strategy/
dp_fixed_clipping.py) would (1) let `PhaseFedAvg` checkpoint the aggregate BEFORE the noise is
added (`on_round` runs inside `aggregate_train`), (2) refuse its accountant for any strategy that
overrides `aggregate_train`, (3) average with `num-examples` weights, for which `z*C/n` is not the
sensitivity, (4) skip the whole round on one failed site and calibrate the noise to the number of
sites asked rather than averaged. `CentralDP` reuses Flower's clipping and noise functions and its
accountant, and fixes those four.

Cost: the noise norm is `z*C/n * sqrt(#parameters)` against an averaged update of norm <= C, so
with a few sites and millions of parameters a meaningful epsilon (z >= 1) drowns the update
(`benchmarks/privacy.py` measures it). What the epsilon does NOT cover: the scale phase's latent
sums and every metric a site sends are released without noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    clip_inputs_inplace,
    compute_stdv,
)

__all__ = [
    "CentralDP",
    "DPSettings",
    "PrivacySettings",
    "SecAggSettings",
    "epsilon_after",
    "releases_before",
    "run_privacy",
]

log = logging.getLogger(__name__)

# (global round, aggregated arrays, aggregated metrics, sites averaged): `strategy.RoundCallback`
RoundCallback = Callable[[int, ArrayRecord, MetricRecord, list[str]], None]

@dataclass(frozen=True)
class DPSettings:
    """Central differential privacy of the shared phases (`fed.privacy.dp`).

    Args:
        enabled: clip, level and noise every aggregate of the vae and backbone phases.
        noise_multiplier: z, the noise std in units of `clipping_norm / n`; 0 clips only (no privacy).
        clipping_norm: C, the largest L2 norm of one site's update (all its groups together).
        delta: the delta at which epsilon is reported (well below 1 / number of sites).
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5


MODULUS_RANGE = 2**32  # SecAgg+'s modulus (Flower's default and its maximum): masked sums wrap at it


@dataclass(frozen=True)
class SecAggSettings:
    """Secure aggregation with Flower's SecAgg+ (`fed.privacy.secagg`; the protocol: `secure`).

    Each site masks its update so that the server learns only the weighted mean of the updates
    of the sites that finished the round. Names and rules are Flower's `SecAggPlusWorkflow`'s.

    Args:
        enabled: run the vae and backbone rounds with SecAgg+ (needs >= 2 sites per phase).
        num_shares: shares of each site's secret; a float is a fraction of the round's sites,
            an int must be > 2.
        reconstruction_threshold: shares needed to rebuild a secret (a float: a fraction of
            `num_shares`); higher is more private, lower survives more dropped sites.
        clipping_range: each value of a site's (weighted) update is clipped to +-this before
            quantisation; the update of one round is far smaller than this.
        quantization_range: quantisation levels over [-clipping_range, clipping_range]: the step
            is 2 x clipping_range / quantization_range (3.8e-6 at the defaults). The masked sum
            lives modulo 2**32, so sites x quantization_range must stay below 2**32.
    """

    enabled: bool = False
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 1.0
    clipping_range: float = 8.0
    quantization_range: int = 4194304

    def check(self) -> None:
        """Flower's rules for these options, named by option (Flower's own errors name none).

        Raises:
            ValueError: an option out of range.
        """
        def bad(option: str, why: str) -> ValueError:
            return ValueError(f"fed.privacy.secagg.{option}: {why}")

        numeric = (int, float)
        if isinstance(self.num_shares, bool) or not isinstance(self.num_shares, numeric):
            raise bad("num_shares", f"a number is needed, got {self.num_shares!r}")
        if isinstance(self.num_shares, int) and self.num_shares != 1 and self.num_shares <= 2:
            raise bad("num_shares", f"an integer must be > 2 (a float is a fraction of the sites), got {self.num_shares}")
        if isinstance(self.num_shares, float) and not self.num_shares > 0:
            raise bad("num_shares", f"a fraction must be > 0, got {self.num_shares}")
        threshold = self.reconstruction_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numeric):
            raise bad("reconstruction_threshold", f"a number is needed, got {threshold!r}")
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise bad("reconstruction_threshold", f"a fraction must be in (0, 1], got {threshold}")
        if isinstance(threshold, int) and threshold != 1 and isinstance(self.num_shares, int) \
                and threshold >= self.num_shares:
            raise bad("reconstruction_threshold", f"{threshold} must be below num_shares={self.num_shares}")
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise bad("clipping_range", f"must be > 0, got {self.clipping_range}")
        if isinstance(self.quantization_range, bool) or not isinstance(self.quantization_range, int) \
                or not 0 < self.quantization_range < MODULUS_RANGE:
            raise bad("quantization_range", f"an integer in (0, 2**32) is needed, got {self.quantization_range!r}")


@dataclass(frozen=True)
class PrivacySettings:
    """`fed.privacy`, checked."""

    dp: DPSettings
    secagg: SecAggSettings

    @classmethod
    def from_config(cls, cfg: Any) -> PrivacySettings:
        """Read and check `cfg.fed.privacy` (absent: both off).

        Raises:
            ValueError: an unknown key, a value out of range (naming the option), or options that
                cannot go together.
        """
        block = _plain(cfg.fed.get("privacy")) or {}
        dp = _section(block, "dp", DPSettings)
        secagg = _section(block, "secagg", SecAggSettings)
        unknown = sorted(set(block) - {"dp", "secagg"})
        if unknown:
            raise ValueError(f"fed.privacy: unknown option(s) {unknown}; expected dp, secagg")
        if not (math.isfinite(dp.noise_multiplier) and dp.noise_multiplier >= 0):
            raise ValueError(f"fed.privacy.dp.noise_multiplier must be >= 0, got {dp.noise_multiplier}")
        if not (math.isfinite(dp.clipping_norm) and dp.clipping_norm > 0):
            raise ValueError(f"fed.privacy.dp.clipping_norm must be > 0, got {dp.clipping_norm}")
        if not 0 < dp.delta < 1:
            raise ValueError(f"fed.privacy.dp.delta must be in (0, 1), got {dp.delta}")
        secagg.check()
        aggregation = str(cfg.fed.get("aggregation") or "fedavg")
        if dp.enabled and aggregation != "fedavg":
            # The noise is calibrated to the mean of clipped updates (sensitivity C/n); a median or
            # trimmed mean has another sensitivity, so the reported epsilon would be wrong.
            raise ValueError(f"fed.privacy.dp.enabled=true needs fed.aggregation=fedavg, got {aggregation!r}")
        if secagg.enabled and dp.enabled:
            raise ValueError("fed.privacy.secagg.enabled=true cannot be combined with fed.privacy.dp.enabled=true: "
                             "central DP clips each site's update at the server, which under secure aggregation "
                             "sees only their sum; choose one")
        if secagg.enabled and aggregation != "fedavg":
            raise ValueError(f"fed.privacy.secagg.enabled=true needs fed.aggregation=fedavg, got {aggregation!r}: "
                             f"a median or trimmed mean needs every site's update, and the server sees only their sum")
        return cls(dp, secagg)

    def describe(self) -> dict[str, Any]:
        """The settings as plain data (for phase inputs, the report and status.json)."""
        return {"dp": asdict(self.dp), "secagg": asdict(self.secagg)}


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _section(block: Mapping[str, Any], name: str, kind: type) -> Any:
    values = dict(block.get(name) or {})
    fields = set(kind.__dataclass_fields__)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"fed.privacy.{name}: unknown option(s) {unknown}; expected {sorted(fields)}")
    try:
        return kind(**values)
    except TypeError as exc:  # pragma: no cover - dataclass arguments are checked above
        raise ValueError(f"fed.privacy.{name}: {exc}") from None


# ------------------------------------------------------------------------------- accounting


def epsilon_after(dp: DPSettings, releases: int, population: int) -> float:
    """Epsilon at `dp.delta` after `releases` noised aggregates (RDP, Flower's accountant).

    Args:
        dp: the settings (z and delta).
        releases: noised global models released so far.
        population: the sites that may contribute.

    Returns:
        0.0 before any release, inf when `noise_multiplier` is 0 (clipping alone is not private).
    """
    if releases <= 0:
        return 0.0
    if dp.noise_multiplier == 0:
        return math.inf
    from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)

    accountant = RdpAccountant(PrivacyConfig(
        target_delta=dp.delta, population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,  # every site trains every round
    ))
    accountant.compose(GaussianPrivacyEvent(dp.noise_multiplier, population, population), releases)
    return float(accountant.get_privacy_spent().epsilon)


def releases_before(cfg: Any, phase: str) -> int:
    """Noised releases of the run before `phase` starts: the backbone's rounds follow the VAE's on
    the same sites' source cases, so their privacy losses compose."""
    return int(cfg.fed.phases.vae.rounds) if phase == "backbone" else 0


def run_privacy(cfg: Any, population: int) -> dict[str, Any]:
    """The run's privacy settings and, with DP, epsilon over all its planned releases."""
    settings = PrivacySettings.from_config(cfg)
    out = settings.describe()
    if settings.dp.enabled:
        releases = int(cfg.fed.phases.vae.rounds) + int(cfg.fed.phases.backbone.rounds)
        eps = epsilon_after(settings.dp, releases, population)
        out["dp"] |= {"releases": releases, "sites": population,
                      "epsilon": eps if math.isfinite(eps) else "inf"}
    return out


# ------------------------------------------------------------------------------- the wrapper


class CentralDP(Strategy):
    """Central DP around a phase's FedAvg strategy: clip, level, average, noise, account, save.

    Args:
        build: makes the inner strategy given the round callback it must call after averaging
            (`lambda cb: PhaseFedAvg(..., on_round=cb)`); CentralDP adds the noise before the
            real `on_round` sees the model.
        dp: the settings (enabled or not, the wrapper always applies them).
        on_round: the server's checkpoint callback, given the NOISED aggregate; its metrics gain
            `dp-epsilon` (when z > 0), `dp-delta` and `dp-noise-std`.
        population: the sites of the phase (for the accountant).
        releases_before: noised releases earlier in the run (`releases_before`).
    """

    def __init__(
        self,
        build: Callable[[RoundCallback], Strategy],
        dp: DPSettings,
        on_round: RoundCallback,
        *,
        population: int,
        releases_before: int = 0,
    ) -> None:
        super().__init__()
        self.dp = dp
        self.on_round = on_round
        self.population = population
        self.releases_before = releases_before
        self._held: tuple[int, list[str]] | None = None
        self._current: dict[str, np.ndarray] = {}
        self.strategy = build(self._hold)

    def _hold(self, rnd: int, arrays: ArrayRecord, metrics: MetricRecord, used: list[str]) -> None:
        self._held = (rnd, list(used))

    def summary(self) -> None:
        log.info("central DP: noise multiplier %s, clipping norm %s, delta %g",
                 self.dp.noise_multiplier, self.dp.clipping_norm, self.dp.delta)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: a.numpy() for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            self._clip_and_level(reply)
        self._held = None
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self._held is None:
            return arrays, metrics
        rnd, used = self._held
        noised, std = self.add_noise(arrays, len(used))
        eps = epsilon_after(self.dp, self.releases_before + rnd, self.population)
        extra = {"dp-delta": self.dp.delta, "dp-noise-std": std}
        if math.isfinite(eps):
            extra["dp-epsilon"] = eps
        metrics = MetricRecord({**dict(metrics or {}), **extra})
        log.info("central DP round %d: clipped to %g, noise std %.3g over %d site(s); epsilon %.4g at "
                 "delta %g after %d release(s)", rnd, self.dp.clipping_norm, std, len(used), eps,
                 self.dp.delta, self.releases_before + rnd)
        self.on_round(rnd, noised, metrics, used)
        return noised, metrics

    def _clip_and_level(self, reply: Message) -> None:
        """Clip the update of a well-formed reply in place and give it weight 1.

        A reply with an error or other keys/shapes than the global model is left alone: the inner
        strategy rejects it by name.
        """
        if reply.has_error() or "arrays" not in reply.content or "metrics" not in reply.content:
            return
        record = reply.content["arrays"]
        if set(record) != set(self._current) or any(
            tuple(record[k].shape) != self._current[k].shape for k in record
        ):
            return
        keys = list(record)
        update = [record[k].numpy().astype(np.float64) - self._current[k] for k in keys]
        clip_inputs_inplace(update, self.dp.clipping_norm)  # Flower's FlatClip
        reply.content["arrays"] = ArrayRecord({
            k: Array(np.asarray(self._current[k] + u, dtype=self._current[k].dtype)) for k, u in zip(keys, update)
        })
        # Equal weights: with num-examples weights one site could move the average by more than C/n.
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), weight_key: 1})

    def add_noise(self, arrays: ArrayRecord, n: int) -> tuple[ArrayRecord, float]:
        """Gaussian noise of std z*C/n on every floating array (Flower's functions).

        Args:
            arrays: the average of n clipped updates (plus the global model).
            n: the number of sites averaged.
        """
        std = compute_stdv(self.dp.noise_multiplier, self.dp.clipping_norm, max(n, 1))
        keys = list(arrays)
        values = [arrays[k].numpy().copy() for k in keys]
        floating = [v for v in values if v.dtype.kind == "f"]
        if std > 0:
            add_gaussian_noise_inplace(floating, std)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, values)}), std
