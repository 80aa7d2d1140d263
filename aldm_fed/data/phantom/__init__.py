"""Embedded multi-site phantom glioma cohort: realistic 3D multi-contrast MRI that installs offline.

Real anatomy (nilearn's MNI152 template and tissue maps) is deformed per case, a glioma is grown by
Fisher-Kolmogorov reaction-diffusion, four contrasts are rendered from tissue relaxation properties
with MRI signal equations, and each site's scanner adds its own field strength, timings, bias field,
noise, slice thickness and intensity scale. Modules, one concept each:

- ``anatomy``  reference brain in the BraTS box, per-case deformations
- ``tumour``   reaction-diffusion growth, compartments (NCR / ED / ET), mass effect
- ``contrast`` tissue T1 / T2 / PD and signal equations
- ``scanner``  site profiles and the acquisition chain
- ``fields``   grids and smooth random fields
- ``config``   ``PhantomConfig`` (the ``phantom`` Hydra group, validated)
- ``cohort``   ``simulate_case`` and ``make_cohort`` (files, manifests, resume)
- ``preview``  PNG montages

Example:
    >>> from pathlib import Path
    >>> from aldm_fed.data.phantom import PhantomConfig, make_cohort
    >>> cfg = PhantomConfig.from_mapping({"resolution_mm": 4.0})  # or compose(["phantom=tiny"]).phantom
    >>> summary = make_cohort(Path("cohort"), cfg, seed=0)
"""

from __future__ import annotations

from aldm_fed.data.phantom.cohort import CohortSummary, PhantomCase, case_grade, case_id, make_cohort, simulate_case
from aldm_fed.data.phantom.config import PhantomConfig, SiteSpec
from aldm_fed.data.phantom.scanner import DEFAULT_PROFILES, MODALITIES, ScannerProfile, Sequence

__all__ = [
    "DEFAULT_PROFILES",
    "MODALITIES",
    "CohortSummary",
    "PhantomCase",
    "PhantomConfig",
    "ScannerProfile",
    "Sequence",
    "SiteSpec",
    "case_grade",
    "case_id",
    "make_cohort",
    "simulate_case",
]
