"""The built wheel works outside the checkout: shipped configs are package data, cluster commands find the repo.

The wheel goes into a scratch venv that reuses this environment's installed dependencies through a .pth
line (which does not run this environment's own .pth files, so the editable cliplab stays out of sight).
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def context_wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the Docker build context (a build in the checkout would leave a
    platform/cliplab.egg-info there, whose metadata then shadows the installed cliplab's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    context = tmp / "app"
    context.mkdir()
    _docker_context(context)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, context],
        check=True,
        cwd=tmp,
    )
    assert (context / "platform" / "cliplab" / "configs").is_symlink()
    return next(tmp.glob("cliplab-*.whl"))


@pytest.fixture(scope="module")
def wheel_env(context_wheel: Path, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", env], check=True)
    site = next((env / "lib").glob("python3.*/site-packages"))
    (site / "_cliplab_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([env / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", context_wheel], check=True)
    return env


def cliplab(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([env / "bin" / "cliplab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_install_runs_outside_the_checkout(wheel_env: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [wheel_env / "bin" / "python", "-c", "import cliplab; print(cliplab.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(wheel_env) in where.stdout, "the wheel's cliplab is imported, not the editable checkout"

    assert cliplab(wheel_env, "demo", "--help", cwd=tmp_path).returncode == 0

    listed = cliplab(wheel_env, "config", "list", cwd=tmp_path)
    shipped = {Path(line).name: Path(line) for line in listed.stdout.split()}
    assert {"demo.yaml", "mcd_demo.yaml", "sweep_mcd_weights.yaml"} <= set(shipped)
    assert str(wheel_env) in str(shipped["demo.yaml"]) and shipped["demo.yaml"].is_file()
    validated = cliplab(wheel_env, "config", "validate", str(shipped["demo.yaml"]), cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    assert yaml.safe_load(validated.stdout)["name"] == "demo-clip"

    outside = cliplab(wheel_env, "cluster", "render", str(shipped["demo.yaml"]), cwd=tmp_path)
    assert outside.returncode == 2
    assert "not inside a cliplab repository" in outside.stderr and "--repo" in outside.stderr
    wrong = cliplab(wheel_env, "cluster", "render", "configs/demo.yaml", "--repo", str(tmp_path), cwd=tmp_path)
    assert wrong.returncode == 2 and "not a cliplab repository" in wrong.stderr

    rendered = cliplab(wheel_env, "cluster", "render", "configs/demo.yaml", cwd=ROOT)
    assert rendered.returncode == 0, rendered.stderr
    with_flag = cliplab(
        wheel_env, "cluster", "render", str(ROOT / "configs/demo.yaml"), "--repo", str(ROOT), cwd=tmp_path
    )
    assert with_flag.returncode == 0, with_flag.stderr
    for out in (rendered.stdout, with_flag.stdout):
        doc = yaml.safe_load(out)
        assert (
            doc["kind"] == "RayJob" and "python jobs/train.py --config configs/demo.yaml" in doc["spec"]["entrypoint"]
        )


def _docker_context(dest: Path) -> None:
    """Copy what the Dockerfile's COPY lines take from the build context into `dest`, as the image lays it out
    (without what .dockerignore's `**/` patterns leave out at any depth)."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    anywhere = shutil.ignore_patterns(*(p.removeprefix("**/") for p in ignored if p.startswith("**/")))
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = [t for t in line.split()[1:] if not t.startswith("--")]
        for source in sources:
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"
            to = dest / target / Path(source).name if target.endswith("/") else dest / target
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, to, symlinks=True, ignore=anywhere)
            else:
                shutil.copy(ROOT / source, to)


@pytest.mark.slow
def test_the_docker_build_context_builds_a_wheel_with_the_configs(context_wheel: Path) -> None:
    """What `docker build` runs, short of the base image: the COPY'd tree builds a wheel that ships the configs."""
    names = zipfile.ZipFile(context_wheel).namelist()
    assert {f"cliplab/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= set(names)
    assert "cliplab/cluster/render.py" in names
