"""Suite-wide settings: deterministic property tests in CI, few threads on 2-core machines."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

# CI replays the same examples every run (a red build is then reproducible); locally hypothesis
# explores new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The suite is sized for 2 cores; more intra-op threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
