"""Settings of `aldm-fed synthesize`: the `synthesis` config group, validated once.

Config group `synthesis` (configs/synthesis/default.yaml); every key is optional and defaults to
the values below.

| key | meaning |
|---|---|
| `num_samples` | synthetic cases to make (ignored when `per_mask` is set) |
| `per_mask` | synthetic cases per source mask (N = per_mask x number of mask cases); null = use `num_samples` |
| `seed` | seed of the masks and the sampling noise; null = the run's top-level `seed` |
| `id_prefix` | synthetic case ids are `<id_prefix>-<site>-<index:05d>` (never a real case id) |
| `label_column` | header of the case-level label in `labels.csv` (e.g. `grade`) |
| `host` | brain receiving a tumour: `other` (a host other than the mask's case, if any), `same`, `any` |
| `sampler` | `auto` (the model's own scheduler; a DDPM model samples with DDIM), `ddim`, `rflow`, `ddpm` |
| `num_steps` | sampling steps (DDIM / RFlow: 10-50; DDPM: all T); null = the scheduler's default |
| `eta` | DDIM stochasticity (0 = deterministic); null = the model's scheduler value |
| `guidance_scale` | classifier-free guidance (ALDM 3.0); null = the conditioning config's |
| `batch_size` | volumes per sampling call |
| `mask_outside_brain` | set voxels outside the host brain mask to 0 |
| `montage_rows` | samples shown in `montage.png` (0 = no montage) |
| `masks.*` | mask augmentation, see `MaskAugConfig` |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aldm_fed.models._cfg import as_plain_dict, check_keys, get_bool, get_float, get_int, get_str

__all__ = [
    "HOST_MODES",
    "PLACEMENTS",
    "SAMPLERS",
    "MaskAugConfig",
    "SynthesisConfig",
    "mask_aug_config",
    "synthesis_config",
]

GROUP = "synthesis"
MASK_GROUP = "synthesis.masks"
HOST_MODES: tuple[str, ...] = ("other", "same", "any")
SAMPLERS: tuple[str, ...] = ("auto", "ddim", "rflow", "ddpm")
PLACEMENTS: tuple[str, ...] = ("random", "keep")


@dataclass(frozen=True)
class MaskAugConfig:
    """How a site's tumour mask becomes a new one (label-preserving augmentation).

    Args:
        placement: `random`: the tumour centre is drawn among the host positions where the whole
            (transformed) tumour lies inside the host brain; `keep`: the tumour keeps its position
            relative to the brain's bounding box (+- `translate_mm`).
        max_tries: augmentations drawn per sample before giving up with an error.
        min_inside: fraction of tumour voxels that must lie inside the host brain (1.0 = all).
        min_voxels: fewer tumour voxels than this after the transform = the tumour vanished.
        keep_labels: reject a transform that loses a sub-region label (e.g. a thin ET rim).
        flip_prob: probability of a left-right mirror across the brain's mid-sagittal plane.
        rotate_deg: rotation about each axis, uniform in [-rotate_deg, rotate_deg].
        scale: (min, max) isotropic size factor, log-uniform.
        translate_mm: shift per axis, uniform in [-translate_mm, translate_mm] (placement `keep`).
        elastic_mm: largest elastic displacement (drawn uniform in [0, elastic_mm]); 0 = off.
        elastic_sigma_mm: smoothness (control-point spacing) of the elastic field.
    """

    placement: str = "random"
    max_tries: int = 50
    min_inside: float = 1.0
    min_voxels: int = 20
    keep_labels: bool = True
    flip_prob: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_mm: float = 5.0
    elastic_mm: float = 2.0
    elastic_sigma_mm: float = 8.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        return d


@dataclass(frozen=True)
class SynthesisConfig:
    """The validated `synthesis` group (meaning of each key in the module docstring)."""

    num_samples: int = 8
    per_mask: int | None = None
    seed: int | None = None
    id_prefix: str = "SYN"
    label_column: str = "grade"
    host: str = "other"
    sampler: str = "auto"
    num_steps: int | None = 25
    eta: float | None = None
    guidance_scale: float | None = None
    batch_size: int = 1
    mask_outside_brain: bool = True
    montage_rows: int = 8
    masks: MaskAugConfig = field(default_factory=MaskAugConfig)

    def total(self, n_mask_cases: int) -> int:
        """Number of synthetic cases for `n_mask_cases` source masks."""
        return self.num_samples if self.per_mask is None else self.per_mask * n_mask_cases

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["masks"] = self.masks.to_dict()
        return d


_MASK_DEFAULTS = MaskAugConfig().to_dict()
_DEFAULTS = {k: v for k, v in SynthesisConfig().to_dict().items() if k != "masks"}


def _opt_int(c: Mapping[str, Any], key: str, group: str, minimum: int) -> int | None:
    return None if c[key] is None else get_int(c, key, group, minimum=minimum)


def _opt_float(c: Mapping[str, Any], key: str, group: str, **kw: Any) -> float | None:
    return None if c[key] is None else get_float(c, key, group, **kw)


def mask_aug_config(cfg: Mapping[str, Any] | MaskAugConfig | None = None) -> MaskAugConfig:
    """Validate a `synthesis.masks` group (all keys optional).

    Args:
        cfg: mapping, DictConfig, a `MaskAugConfig` (returned as is) or None (defaults).

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    if isinstance(cfg, MaskAugConfig):
        return cfg
    c = {**_MASK_DEFAULTS, **(as_plain_dict(cfg, MASK_GROUP) if cfg is not None else {})}
    check_keys(c, MASK_GROUP, (), _MASK_DEFAULTS)
    scale = c["scale"]
    if (
        isinstance(scale, (str, bytes))
        or not hasattr(scale, "__len__")
        or len(scale) != 2
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scale)
        or scale[0] > scale[1]
    ):
        raise ValueError(f"{MASK_GROUP}.scale: expected [min, max] with 0 < min <= max, got {scale!r}")
    return MaskAugConfig(
        placement=get_str(c, "placement", MASK_GROUP, PLACEMENTS),
        max_tries=get_int(c, "max_tries", MASK_GROUP, minimum=1),
        min_inside=get_float(c, "min_inside", MASK_GROUP, minimum=0.0, maximum=1.0, inclusive_min=False),
        min_voxels=get_int(c, "min_voxels", MASK_GROUP, minimum=1),
        keep_labels=get_bool(c, "keep_labels", MASK_GROUP),
        flip_prob=get_float(c, "flip_prob", MASK_GROUP, minimum=0.0, maximum=1.0),
        rotate_deg=get_float(c, "rotate_deg", MASK_GROUP, minimum=0.0, maximum=180.0),
        scale=(float(scale[0]), float(scale[1])),
        translate_mm=get_float(c, "translate_mm", MASK_GROUP, minimum=0.0),
        elastic_mm=get_float(c, "elastic_mm", MASK_GROUP, minimum=0.0),
        elastic_sigma_mm=get_float(c, "elastic_sigma_mm", MASK_GROUP, minimum=0.0, inclusive_min=False),
    )


def synthesis_config(cfg: Mapping[str, Any] | SynthesisConfig | None = None) -> SynthesisConfig:
    """Validate a `synthesis` config group (all keys optional).

    Args:
        cfg: mapping, DictConfig (e.g. `cfg.synthesis`), a `SynthesisConfig` (returned as is) or
            None (defaults).

    Raises:
        ValueError: an unknown key or an invalid value (the message names it).
    """
    if isinstance(cfg, SynthesisConfig):
        return cfg
    raw = as_plain_dict(cfg, GROUP) if cfg is not None else {}
    masks = mask_aug_config(raw.pop("masks", None))
    c = {**_DEFAULTS, **raw}
    check_keys(c, GROUP, (), [*_DEFAULTS, "masks"])
    prefix = c["id_prefix"]
    if not isinstance(prefix, str) or not prefix or not all(ch.isalnum() or ch in "_-" for ch in prefix):
        raise ValueError(f"{GROUP}.id_prefix: expected letters, digits, '-' or '_', got {prefix!r}")
    column = c["label_column"]
    if not isinstance(column, str) or not column or any(ch in column for ch in ",\n\r\""):
        raise ValueError(f"{GROUP}.label_column: expected a CSV column name, got {column!r}")
    return SynthesisConfig(
        num_samples=get_int(c, "num_samples", GROUP, minimum=1),
        per_mask=_opt_int(c, "per_mask", GROUP, 1),
        seed=_opt_int(c, "seed", GROUP, 0),
        id_prefix=prefix,
        label_column=column,
        host=get_str(c, "host", GROUP, HOST_MODES),
        sampler=get_str(c, "sampler", GROUP, SAMPLERS),
        num_steps=_opt_int(c, "num_steps", GROUP, 1),
        eta=_opt_float(c, "eta", GROUP, minimum=0.0, maximum=1.0),
        guidance_scale=_opt_float(c, "guidance_scale", GROUP, minimum=0.0),
        batch_size=get_int(c, "batch_size", GROUP, minimum=1),
        mask_outside_brain=get_bool(c, "mask_outside_brain", GROUP),
        montage_rows=get_int(c, "montage_rows", GROUP, minimum=0),
        masks=masks,
    )
