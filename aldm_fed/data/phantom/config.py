"""Phantom cohort settings: a typed, validated view of the `phantom` Hydra config group.

`PhantomConfig.from_mapping` accepts the OmegaConf node (or a plain dict), fills unspecified keys
from the defaults below, and raises ValueError naming the offending key (as a Hydra override path,
e.g. ``phantom.sites.C.n_target``) for anything invalid, unknown keys included (catches typos).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aldm_fed.data.phantom.anatomy import AnatomyConfig
from aldm_fed.data.phantom.scanner import DEFAULT_PROFILES, ScannerProfile
from aldm_fed.data.phantom.tumour import GRADES, GradeSpec, TumourConfig

__all__ = ["PhantomConfig", "SiteSpec"]

_ROOT = "phantom"
_SITE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class SiteSpec:
    """One simulated hospital.

    Args:
        name: site name (letters, digits, underscore; used in folder names and case ids).
        profile: name of its scanner profile.
        n_source: source-domain cases (pre-training data).
        n_target: few-shot target cases (the K of K-shot fine-tuning).
        n_test: held-out test cases.
        n_val: validation cases (every setting is chosen on them).
        n_oracle: extra real cases for the `oracle` regime only.
    """

    name: str
    profile: str
    n_source: int
    n_target: int
    n_test: int
    n_val: int = 0
    n_oracle: int = 0

    @property
    def n_cases(self) -> int:
        return self.n_source + self.n_target + self.n_val + self.n_test + self.n_oracle


def _default_sites() -> tuple[SiteSpec, ...]:
    return (
        SiteSpec("A", "A", n_source=12, n_target=8, n_val=8, n_test=16),
        SiteSpec("B", "B", n_source=12, n_target=8, n_val=8, n_test=16),
        SiteSpec("C", "C", n_source=0, n_target=8, n_val=8, n_test=16, n_oracle=12),
    )


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that decides a phantom cohort (with the seed passed to `make_cohort`).

    Args:
        sites: the simulated hospitals.
        k: default few-shot budget (a site's n_target when it does not set one).
        resolution_mm: voxel size; 1.0 is BraTS geometry (240 x 240 x 155), 4.0 is 60 x 60 x 39.
        hgg_fraction: share of high grade cases at every site (grades alternate so any prefix of
            a site's cases is balanced).
        anatomy: per-case anatomical variation.
        tumour: tumour model.
        profiles: every known scanner profile (defaults A, B, C plus configured ones).
        preview_cases: cases shown per site in the PNG montage.
    """

    sites: tuple[SiteSpec, ...] = field(default_factory=_default_sites)
    k: int = 8
    resolution_mm: float = 2.0
    hgg_fraction: float = 0.5
    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)
    tumour: TumourConfig = field(default_factory=TumourConfig)
    profiles: dict[str, ScannerProfile] = field(default_factory=lambda: dict(DEFAULT_PROFILES))
    preview_cases: int = 4

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def profile_of(self, site: str) -> ScannerProfile:
        return self.profiles[self.site(site).profile]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for cohort.json and hashing); `from_mapping` reads it back."""
        return {
            "sites": {
                s.name: {"profile": s.profile, "n_source": s.n_source, "n_target": s.n_target, "n_val": s.n_val,
                         "n_test": s.n_test, "n_oracle": s.n_oracle}
                for s in self.sites
            },
            "k": self.k,
            "resolution_mm": self.resolution_mm,
            "hgg_fraction": self.hgg_fraction,
            "anatomy": dataclasses.asdict(self.anatomy),
            "tumour": {
                **{f.name: getattr(self.tumour, f.name) for f in dataclasses.fields(TumourConfig) if f.name != "grades"},
                **{g: _grade_dict(spec) for g, spec in self.tumour.grades.items()},
            },
            "profiles": {name: {k: v for k, v in p.to_dict().items() if k != "name"} for name, p in self.profiles.items()},
            "preview_cases": self.preview_cases,
        }

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | Any | None = None) -> PhantomConfig:
        """Validate settings; missing keys take the defaults.

        Args:
            raw: the `phantom` config node (OmegaConf DictConfig or a plain mapping); None for defaults.

        Raises:
            ValueError: a bad value or unknown key; the message names it (``phantom.<key>``).
        """
        raw = _plain(raw)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{_ROOT}: must be a mapping, got {type(raw).__name__}")
        # A group file loaded without Hydra still has its defaults list; the code defaults equal
        # default.yaml (tested), so ignoring it gives what Hydra would compose.
        raw = {k: v for k, v in raw.items() if k != "defaults"}
        allowed = {"sites", "k", "resolution_mm", "hgg_fraction", "anatomy", "tumour", "profiles", "preview_cases"}
        _no_unknown(raw, allowed, _ROOT)
        base = cls()
        k = _int(raw, "k", base.k, _ROOT, minimum=0)
        resolution = _float(raw, "resolution_mm", base.resolution_mm, _ROOT, low=1.0, high=8.0)
        hgg = _float(raw, "hgg_fraction", base.hgg_fraction, _ROOT, low=0.0, high=1.0)
        preview = _int(raw, "preview_cases", base.preview_cases, _ROOT, minimum=0)
        anatomy = _anatomy(_section(raw, "anatomy"), f"{_ROOT}.anatomy")
        tumour = _tumour(_section(raw, "tumour"), f"{_ROOT}.tumour")
        profiles = _profiles(_section(raw, "profiles"), f"{_ROOT}.profiles")
        sites = _sites(raw.get("sites"), k, profiles, base.sites)
        return cls(
            sites=sites,
            k=k,
            resolution_mm=resolution,
            hgg_fraction=hgg,
            anatomy=anatomy,
            tumour=tumour,
            profiles=profiles,
            preview_cases=preview,
        )


def _grade_dict(spec: GradeSpec) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _plain(raw: Any) -> Any:
    if raw is None:
        return {}
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(raw, DictConfig | ListConfig):
            return OmegaConf.to_container(raw, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return raw


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    val = raw.get(key)
    if val is None:
        return {}
    if not isinstance(val, Mapping):
        raise ValueError(f"{_ROOT}.{key}: must be a mapping, got {val!r}")
    return val


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; expected one of {sorted(allowed)}")


def _int(raw: Mapping[str, Any], key: str, default: int, where: str, *, minimum: int = 0) -> int:
    val = raw.get(key, default)
    if val is None:
        val = default
    if isinstance(val, bool) or not isinstance(val, int) and not (isinstance(val, float) and val.is_integer()):
        raise ValueError(f"{where}.{key}: must be an integer, got {val!r}")
    if int(val) < minimum:
        raise ValueError(f"{where}.{key}: must be >= {minimum}, got {val!r}")
    return int(val)


def _float(
    raw: Mapping[str, Any], key: str, default: float, where: str, *, low: float | None = None, high: float | None = None
) -> float:
    val = raw.get(key, default)
    if val is None:
        val = default
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ValueError(f"{where}.{key}: must be a number, got {val!r}")
    if (low is not None and val < low) or (high is not None and val > high):
        raise ValueError(f"{where}.{key}: must be in [{low}, {high}], got {val!r}")
    return float(val)


def _range(raw: Mapping[str, Any], key: str, default: tuple[float, float], where: str, *, low: float = 0.0) -> tuple[float, float]:
    val = raw.get(key, default)
    if isinstance(val, int | float) and not isinstance(val, bool):
        val = (val, val)
    if not isinstance(val, list | tuple) or len(val) != 2 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in val
    ):
        raise ValueError(f"{where}.{key}: must be a [low, high] pair of numbers, got {val!r}")
    lo, hi = float(val[0]), float(val[1])
    if lo < low or hi < lo:
        raise ValueError(f"{where}.{key}: need {low} <= low <= high, got {list(val)!r}")
    return lo, hi


def _anatomy(raw: Mapping[str, Any], where: str) -> AnatomyConfig:
    base = AnatomyConfig()
    names = [f.name for f in dataclasses.fields(AnatomyConfig)]
    _no_unknown(raw, set(names), where)
    vals = {n: _float(raw, n, getattr(base, n), where, low=0.0) for n in names}
    if vals["deform_spacing_mm"] < 8.0:
        raise ValueError(f"{where}.deform_spacing_mm: must be >= 8 (smooth deformations), got {vals['deform_spacing_mm']!r}")
    if vals["scale"] >= 0.3:
        raise ValueError(f"{where}.scale: must be < 0.3, got {vals['scale']!r}")
    return AnatomyConfig(**vals)


def _tumour(raw: Mapping[str, Any], where: str) -> TumourConfig:
    base = TumourConfig()
    scalars = ("grid_mm", "d_ratio", "oedema_threshold", "core_threshold")
    _no_unknown(raw, set(scalars) | set(GRADES), where)
    grid_mm = _float(raw, "grid_mm", base.grid_mm, where, low=1.0, high=8.0)
    d_ratio = _float(raw, "d_ratio", base.d_ratio, where, low=1.0)
    t_ed = _float(raw, "oedema_threshold", base.oedema_threshold, where, low=0.01, high=0.99)
    t_core = _float(raw, "core_threshold", base.core_threshold, where, low=0.01, high=0.99)
    if t_core <= t_ed:
        raise ValueError(f"{where}.core_threshold: must exceed oedema_threshold ({t_ed}), got {t_core}")
    grades = {}
    for g in GRADES:
        spec = base.grades[g]
        sub = raw.get(g) or {}
        w = f"{where}.{g}"
        if not isinstance(sub, Mapping):
            raise ValueError(f"{w}: must be a mapping")
        _no_unknown(sub, {f.name for f in dataclasses.fields(GradeSpec)}, w)
        radius = _range(sub, "radius_mm", spec.radius_mm, w, low=3.0)
        if radius[1] > 50.0:
            raise ValueError(f"{w}.radius_mm: must be <= 50 mm (the tumour must fit in the brain), got {list(radius)}")
        grades[g] = GradeSpec(
            radius_mm=radius,
            infiltration_mm=_range(sub, "infiltration_mm", spec.infiltration_mm, w, low=0.5),
            oedema_mm=_range(sub, "oedema_mm", spec.oedema_mm, w),
            necrosis=_range(sub, "necrosis", spec.necrosis, w),
            mass_effect=_range(sub, "mass_effect", spec.mass_effect, w),
            enhancing_prob=_float(sub, "enhancing_prob", spec.enhancing_prob, w, low=0.0, high=1.0),
            enhancing_fraction=_range(sub, "enhancing_fraction", spec.enhancing_fraction, w),
        )
        for key in ("necrosis", "enhancing_fraction"):
            if getattr(grades[g], key)[1] > 1.0:
                raise ValueError(f"{w}.{key}: must lie in [0, 1], got {list(getattr(grades[g], key))}")
        if grades[g].mass_effect[1] > 1.5:
            raise ValueError(f"{w}.mass_effect: must be <= 1.5, got {list(grades[g].mass_effect)}")
    return TumourConfig(grid_mm=grid_mm, d_ratio=d_ratio, oedema_threshold=t_ed, core_threshold=t_core, grades=grades)


def _profiles(raw: Mapping[str, Any], where: str) -> dict[str, ScannerProfile]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must map profile names to settings")
    profiles = dict(DEFAULT_PROFILES)
    for name, settings in raw.items():
        w = f"{where}.{name}"
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ValueError(f"{w}: must be a mapping of profile settings")
        base_name = settings.get("base", name if name in profiles else None)
        if base_name is not None and base_name not in profiles:
            raise ValueError(f"{w}.base: unknown profile {base_name!r}; known: {sorted(profiles)}")
        base = profiles[base_name] if base_name is not None else None
        profiles[str(name)] = ScannerProfile.from_mapping(str(name), settings, base, w)
    return profiles


def _sites(
    raw: Any, k: int, profiles: Mapping[str, ScannerProfile], defaults: tuple[SiteSpec, ...]
) -> tuple[SiteSpec, ...]:
    where = f"{_ROOT}.sites"
    if raw is None:
        # As in default.yaml: n_target follows k.
        raw = {s.name: {"profile": s.profile, "n_source": s.n_source, "n_target": None, "n_val": s.n_val,
                        "n_test": s.n_test, "n_oracle": s.n_oracle} for s in defaults}
    # Sites are a mapping name -> settings (Hydra overrides then read phantom.sites.C.n_test=4);
    # a list of {name: ..., ...} is accepted too.
    if isinstance(raw, list | tuple):
        items = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ValueError(f"{where}.{i}.name: each listed site needs a name")
            items.append((str(entry["name"]), {k2: v for k2, v in entry.items() if k2 != "name"}))
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: duplicate site names {names}")
    elif isinstance(raw, Mapping):
        items = [(str(n), v) for n, v in raw.items()]
    else:
        raise ValueError(f"{where}: must map site names to settings")
    if not items:
        raise ValueError(f"{where}: at least one site is needed")
    sites = []
    for name, settings in items:
        w = f"{where}.{name}"
        if not _SITE_NAME.match(name):
            raise ValueError(f"{w}: site names may hold letters, digits and '_' only (they go into case ids)")
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ValueError(f"{w}: must be a mapping of site settings")
        _no_unknown(settings, {"profile", "n_source", "n_target", "n_val", "n_test", "n_oracle", "n_cases"}, w)
        profile = settings.get("profile", name)
        if profile not in profiles:
            raise ValueError(f"{w}.profile: unknown profile {profile!r}; known: {sorted(profiles)}")
        n_source = _int(settings, "n_source", 0, w)
        n_target = _int(settings, "n_target", k, w)  # null / missing: the global k
        n_val = _int(settings, "n_val", 0, w)
        n_oracle = _int(settings, "n_oracle", 0, w)
        fixed = n_source + n_target + n_val + n_oracle
        n_cases = settings.get("n_cases")
        if settings.get("n_test") is None and n_cases is None:
            raise ValueError(f"{w}.n_test: give n_test (or n_cases, and the test split takes the rest)")
        if n_cases is not None:
            n_cases = _int(settings, "n_cases", 0, w)
            rest = n_cases - fixed
            if rest < 0:
                key = f"{w}.n_target" if settings.get("n_target") is not None else f"{_ROOT}.k"
                raise ValueError(
                    f"{key}: k={n_target} target + {n_source} source + {n_val} val + {n_oracle} oracle cases "
                    f"exceed {w}.n_cases={n_cases}"
                )
            n_test = _int(settings, "n_test", rest, w)
            if fixed + n_test != n_cases:
                raise ValueError(f"{w}.n_cases: {n_cases} != n_source + n_target + n_val + n_test + n_oracle = "
                                 f"{fixed + n_test}")
        else:
            n_test = _int(settings, "n_test", 0, w)
        if fixed + n_test == 0:
            raise ValueError(f"{w}: the site has no cases (n_source + n_target + n_val + n_test + n_oracle = 0)")
        if fixed + n_test > 9999:
            raise ValueError(f"{w}: at most 9999 cases per site (case ids have 4 digits)")
        sites.append(SiteSpec(name=name, profile=str(profile), n_source=n_source, n_target=n_target, n_test=n_test,
                              n_val=n_val, n_oracle=n_oracle))
    return tuple(sites)
