"""requirements.lock agrees with pyproject.toml and with the environment the suite runs in.

Walks the dependency graph from pyproject's requirements (every extra, with the extras each edge asks for)
through the installed packages' metadata: every package reached must be pinned in the lock at a version its
requirer accepts and be installed at that version, and the lock must pin nothing that is not reached.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in {"", *extras})


def walk(roots: list[Requirement], pins: dict[str, str]) -> tuple[set[str], list[str]]:
    """Names reached from `roots`, and every disagreement found on the way."""
    problems, seen, queue = [], set(), [(r, "pyproject.toml") for r in roots]
    while queue:
        req, by = queue.pop()
        name = canonicalize_name(req.name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{req.name} (required by {by}) is not in requirements.lock")
            continue
        if not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} in requirements.lock does not satisfy {by}'s {req}")
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        if canonicalize_name(dist.version) != canonicalize_name(pin):
            problems.append(f"{req.name} is installed at {dist.version}, requirements.lock pins {pin}")
        for child in map(Requirement, dist.requires or []):
            if _applies(child, set(req.extras)):
                queue.append((child, f"{req.name}{sorted(req.extras) or ''}"))
    return {n for n, _ in seen}, problems


def test_lock_covers_pyproject_and_matches_the_environment() -> None:
    pins = locked()
    reached, problems = walk(project_requirements(), pins)
    stale = sorted(set(pins) - reached - {"setuptools"})  # setuptools: the build backend, kept pinned
    assert problems == []
    assert stale == [], f"pinned but required by nothing in pyproject.toml: {stale}; regenerate with .ci/lock"


def test_a_disagreement_is_found() -> None:
    pins = locked()
    pins["ray"] = "2.59.0"
    del pins["s3fs"]
    _, problems = walk(project_requirements(), pins)
    assert any("ray==2.59.0" in p for p in problems)
    assert any(p.startswith("s3fs ") and "not in requirements.lock" in p for p in problems)
