"""Synthesis (`aldm-fed synthesize`): new tumour masks from a site's own masks, MRI volumes
generated for them, written as BraTS-2023-style case folders with a manifest.

- `config`: the `synthesis` config group (`SynthesisConfig`, `MaskAugConfig`).
- `masks`: label-preserving mask augmentation and placement in a host brain (`make_masks`).
- `run`: the stage itself (`synthesize` -> `SynthesisSummary`).
- `site`: the stage for one site from a composed config (`synthesize_site`, what the CLI calls).
- `writer`: the output folder layout (case folders, `synthesis.json`, `labels.csv`).
- `montage`: the PNG of synthetic cases next to their real hosts.
- `audit`: the memorisation audit of a synthesis run (`audit_site`: nearest real case per volume,
  near-copies flagged in `audit.json`).
"""

from __future__ import annotations

from aldm_fed.synthesis.audit import AuditResult, AuditSettings, audit_site, audit_synthesis, read_audit
from aldm_fed.synthesis.config import MaskAugConfig, SynthesisConfig, mask_aug_config, synthesis_config
from aldm_fed.synthesis.errors import SynthesisError
from aldm_fed.synthesis.masks import (
    MaskAugmentationError,
    MaskTransform,
    PlacedTumour,
    SyntheticMask,
    assign_cases,
    augment_mask,
    make_masks,
)
from aldm_fed.synthesis.montage import MontageRow, write_synthesis_montage
from aldm_fed.synthesis.run import SynthesisSummary, sampling_settings, synth_id, synthesize
from aldm_fed.synthesis.site import site_config, synthesize_site
from aldm_fed.synthesis.writer import (
    LABELS_NAME,
    MANIFEST_NAME,
    MONTAGE_NAME,
    RECORD_NAME,
    case_files,
    modality_suffixes,
    read_record,
    write_labels_csv,
    write_manifest,
    write_synthetic_case,
)

__all__ = [
    "AuditResult",
    "AuditSettings",
    "LABELS_NAME",
    "MANIFEST_NAME",
    "MONTAGE_NAME",
    "RECORD_NAME",
    "MaskAugConfig",
    "MaskAugmentationError",
    "MaskTransform",
    "MontageRow",
    "PlacedTumour",
    "SynthesisConfig",
    "SynthesisError",
    "SynthesisSummary",
    "SyntheticMask",
    "assign_cases",
    "audit_site",
    "audit_synthesis",
    "augment_mask",
    "case_files",
    "make_masks",
    "mask_aug_config",
    "modality_suffixes",
    "read_audit",
    "read_record",
    "sampling_settings",
    "site_config",
    "synth_id",
    "synthesis_config",
    "synthesize",
    "synthesize_site",
    "write_labels_csv",
    "write_manifest",
    "write_synthesis_montage",
    "write_synthetic_case",
]
