"""Compose Hydra configs for the CLI and the library.

The configs live in the checkout's top-level `configs/` (the design card); a wheel install carries
a copy as data files in `<prefix>/share/aldm-fed/configs` (pyproject `shared-data`). `compose()` is the one entry: the CLI, tests and (later) the Flower apps
all build their config through it, so a run is fully described by its override list.
"""

from __future__ import annotations

from collections.abc import Sequence
import sysconfig
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["compose", "config_dir"]


def config_dir() -> Path:
    """The folder of Hydra configs: the checkout's `configs/`, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / "config.yaml").is_file():
        return checkout
    installed = Path(sysconfig.get_path("data")) / "share" / "aldm-fed" / "configs"
    if (installed / "config.yaml").is_file():
        return installed
    raise FileNotFoundError(
        f"no Hydra configs found (looked in {checkout} and {installed}); reinstall aldm-fed"
    )


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose `config_name` with Hydra overrides (e.g. ``["experiment=tiny", "data.size=32"]``).

    Raises:
        ValueError: an override names an unknown key or group (Hydra's message is kept).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(f"bad config override(s) {list(overrides)}: {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_readonly(cfg, False)
    return cfg
