"""aldm-fed: federated anatomically-conditioned latent diffusion for few-shot 3D glioma MRI."""

from __future__ import annotations

__version__ = "0.1.0"
