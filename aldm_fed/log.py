"""Progress lines of the `aldm_fed` loggers, one format for every process of a run.

Flower configures its own "flwr" logger; giving the root logger a handler as well would print
Flower's lines twice. So only the "aldm_fed" logger gets a handler here, and stops propagating.
Called by the commands that run long work and by each Flower app process (a simulated site is a
Ray actor whose loggers nobody else configures).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

_FORMAT = "%(asctime)s %(message)s"


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Give the "aldm_fed" logger one stderr handler (idempotent) and return it.

    Args:
        level: the lowest level shown.
    """
    logger = logging.getLogger("aldm_fed")
    if not any(getattr(h, "_aldm_fed", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._aldm_fed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
