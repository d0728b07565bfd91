"""The cliplab checkout that cluster commands work on: the one holding the working directory (or `--repo`).

`cluster render` and `submit` read `cluster/` and upload `jobs/` and `platform/` of a checkout, so they never
look beside the installed package (under site-packages for a wheel install there is no repository).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cliplab.errors import ConfigError

MARKERS = ("jobs/train.py", "cluster/raycluster.yaml", "platform/cliplab/__init__.py")


def is_repo(path: Path) -> bool:
    """Whether `path` is the root of a cliplab checkout (its pyproject names cliplab; jobs/, cluster/ exist)."""
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file() or not all((path / m).is_file() for m in MARKERS):
        return False
    try:
        return tomllib.loads(pyproject.read_text()).get("project", {}).get("name") == "cliplab"
    except (OSError, tomllib.TOMLDecodeError):
        return False


def find_repo(repo: str | Path | None = None) -> Path:
    """`repo` when given (it must be a checkout's root), else the checkout at or above the working directory."""
    if repo is not None:
        root = Path(repo).resolve()
        if not is_repo(root):
            raise ConfigError(
                f"--repo {repo}: not a cliplab repository (needs pyproject.toml naming cliplab, {', '.join(MARKERS)})"
            )
        return root
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if is_repo(candidate):
            return candidate
    raise ConfigError(
        f"{cwd} is not inside a cliplab repository: run this from a clone of cliplab or pass --repo DIR "
        "(cluster commands read cluster/ and ship jobs/ and platform/ of that checkout)"
    )
