"""The package layers: imports point one way (docs/architecture.md).

    core (io, log, config, checkpoints) -> data, models, diffusion -> training -> synthesis
        -> evaluation -> federation -> cli

A module may import its own package and any lower layer, never a higher one; `models` never
imports `diffusion` (the sampler composes networks, not the other way round); a private module
(`_name.py`) is used inside its own package only. Every import counts, those inside functions
too: an import moved into a function to dodge a cycle is still an arrow.

`KNOWN_DEBT` lists the arrows that break these rules today, each a (module, imported module)
pair. The test fails on any new one, and on a listed one that is gone (remove it from the list),
so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aldm_fed"
LAYERS: dict[str, int] = {
    "io": 0, "log": 0, "config": 0, "checkpoints": 0,
    "data": 1, "models": 1, "diffusion": 1,
    "training": 2,
    "synthesis": 3,
    "evaluation": 4,
    "federation": 5,
    "cli": 6,
}
FORBIDDEN_SIDEWAYS = {("models", "diffusion")}

# Today's arrows against the rules; the restructuring issue ("A house a newcomer can move into")
# removes them.
KNOWN_DEBT: frozenset[tuple[str, str]] = frozenset({
    # the downstream classifier spans training/ and evaluation/
    ("aldm_fed.training.classifier", "aldm_fed.evaluation.tasks"),
    # the VAE's held-out SSIM is an image metric of evaluation/
    ("aldm_fed.training.vae", "aldm_fed.evaluation.metrics"),
    # the memorisation audit lives in synthesis/, its feature network in evaluation/
    ("aldm_fed.synthesis.audit", "aldm_fed.evaluation.metrics"),
    # the baselines' names live with the regimes
    ("aldm_fed.synthesis.baselines", "aldm_fed.evaluation.regimes"),
    # the GAN baseline's generator encodes masks with the diffusion conditioning
    ("aldm_fed.models.gan", "aldm_fed.diffusion.conditioning"),
    # models/_cfg.py: private config readers used across packages
    *((f"aldm_fed.{m}", "aldm_fed.models._cfg") for m in (
        "diffusion.conditioning", "diffusion.schedulers", "evaluation.faithfulness", "synthesis.audit",
        "synthesis.config", "synthesis.run", "training.common", "training.controlnet", "training.gan",
        "training.vae",
    )),
})


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every aldm_fed module `path` imports (module level and inside functions)."""
    return _imports_in(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def _imports_in(text: str, module: str, is_package: bool = False) -> set[str]:
    package = module if is_package else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aldm_fed"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("aldm_fed"):
                out.add(name)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        src = _package(importer)
        for imported in _imports(path):
            dst = _package(imported)
            if not src or not dst or src == dst:
                if src == dst and "._" in imported and not importer.startswith(imported.rsplit(".", 1)[0]):
                    found.add((importer, imported))
                continue
            private = any(p.startswith("_") and p != "__init__" for p in imported.split(".")[1:])
            upward = LAYERS.get(dst, -1) > LAYERS.get(src, 99)
            if upward or (src, dst) in FORBIDDEN_SIDEWAYS or private:
                found.add((importer, imported))
    return found


def test_every_package_has_a_layer() -> None:
    packages = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert packages == set(LAYERS), f"give each package a layer in LAYERS: {sorted(packages ^ set(LAYERS))}"


def test_imports_point_down_the_layers() -> None:
    found = _violations()
    new = sorted(found - KNOWN_DEBT)
    assert not new, (
        "imports against the layers (docs/architecture.md); move the code to the right layer instead:\n  "
        + "\n  ".join(f"{a} -> {b}" for a, b in new)
    )
    gone = sorted(KNOWN_DEBT - found)
    assert not gone, "no longer imported, remove from KNOWN_DEBT:\n  " + "\n  ".join(f"{a} -> {b}" for a, b in gone)


def test_the_check_sees_upward_imports_in_functions_and_relative_ones() -> None:
    # The checker itself: a higher layer imported at module level, inside a function, or relatively.
    src = ("from aldm_fed.federation.sharing import ALLOW_LIST\n"
           "from ..evaluation import metrics\n"
           "def f():\n    import aldm_fed.cli\n")
    found = _imports_in(src, "aldm_fed.training.loop")
    assert found == {"aldm_fed.federation.sharing", "aldm_fed.evaluation", "aldm_fed.cli"}
    assert all(LAYERS[_package(m)] > LAYERS["training"] for m in found)
