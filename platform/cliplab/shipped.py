"""The experiment and sweep configs that ship with cliplab (the repository's `configs/`, package data in a wheel).

`platform/cliplab/configs` links to the top-level `configs/`, so an editable install, a wheel and a checkout all
find the same files through the package, never through a path relative to the source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from cliplab.errors import ConfigError


def configs_dir() -> Path:
    """The directory of the shipped configs inside the installed package."""
    return Path(str(files("cliplab") / "configs"))


def shipped_configs() -> list[Path]:
    """Every shipped experiment and sweep YAML, sorted by name."""
    return sorted(configs_dir().glob("*.yaml"))


def shipped_config(name: str) -> Path:
    """The shipped config `name` (e.g. `demo.yaml`); the error lists the names there are."""
    path = configs_dir() / name
    if not path.is_file():
        names = ", ".join(p.name for p in shipped_configs())
        raise ConfigError(f"no shipped config {name!r}; shipped: {names}")
    return path
