"""The one error type of the synthesis stage."""

from __future__ import annotations

__all__ = ["SynthesisError"]


class SynthesisError(ValueError):
    """Synthesis cannot run or continue: a bad input, setting or output folder. The message names
    the case, modality, key or path concerned."""
