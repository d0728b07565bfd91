"""`cliplab submit {train,sweep,evaluate,select} CONFIG --address URL`: a Ray job through the job submission SDK.

The job runs `python jobs/<kind>.py --config CONFIG ...` in an uploaded copy of this repository
(`working_dir`; `.git`, `.venv` and what `.gitignore` lists stay behind). The cliplab package of that copy also
goes as a `py_module`, so Ray Train workers and tasks import the submitted code, as the driver does, rather than
the copy installed in the cluster's image (the working dir itself is on their path, but cliplab lies under
platform/ in it). Its environment carries endpoints
only (S3 endpoint and region, MLflow URI); credentials reach the cluster through its own pods (a Kubernetes
Secret), never through a runtime env that the dashboard shows, unless the user passes them with `--env`.
Token auth: the client sends the token of RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cliplab.cluster.repo import find_repo
from cliplab.errors import CliplabError, ConfigError
from cliplab.worker_env import forwarded_env

ENTRYPOINTS = {
    "train": "jobs/train.py",
    "sweep": "jobs/sweep.py",
    "evaluate": "jobs/evaluate.py",
    "select": "jobs/select.py",
}
# Build metadata stays home: a shipped platform/cliplab.egg-info would shadow the cluster's installed cliplab.
EXCLUDES = [".git", ".venv", "**/__pycache__", "**/*.egg-info", "cliplab-demo", "mlruns", "mlartifacts", "*.db"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobFailed(CliplabError):
    """The submitted job ended in FAILED or STOPPED."""


class SubmitError(CliplabError):
    """The job server refused the client (token) or could not be reached; the message says what to do."""


TOKEN_HINT = (
    "give this client the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
    "(KubeRay: kubectl get secret CLUSTER -o jsonpath='{.data.auth_token}' | base64 -d)"
)


def enable_token_auth() -> None:
    """Send the token when one is configured (Ray's SDK only does so with RAY_AUTH_MODE=token)."""
    have_token = (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").exists()
    )
    if have_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def entrypoint(root: Path, kind: str, config: str, overrides: list[str], extra: list[str]) -> str:
    """The job's command line, with CONFIG relative to the repository root (the uploaded working dir)."""
    path = Path(os.path.abspath(config))
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise ConfigError(
            f"{config}: a submitted config must live inside the repository ({root}), "
            "which is what the job's working directory holds"
        ) from None
    args = ["python", ENTRYPOINTS[kind], "--config", str(relative), *(f"--set={o}" for o in overrides), *extra]
    return shlex.join(args)


def runtime_env(root: Path, env: list[str], local_endpoints: bool = True) -> dict[str, Any]:
    """working_dir and the cliplab package, endpoints from this shell (unless the cluster's own are wanted: a
    port-forwarded http://127.0.0.1:5000 means nothing inside the cluster), the user's explicit `--env K=V`."""
    env_vars = forwarded_env() if local_endpoints else {}
    for pair in env:
        if "=" not in pair:
            raise ConfigError(f"--env {pair!r}: expected NAME=VALUE")
        key, value = pair.split("=", 1)
        env_vars[key] = value
    return {
        "working_dir": str(root),
        "py_modules": [str(root / "platform" / "cliplab")],
        "excludes": EXCLUDES,
        "env_vars": env_vars,
    }


def check_config(kind: str, config: str, overrides: list[str]) -> None:
    """Refuse a bad config here, before anything is uploaded."""
    if kind == "sweep":
        from cliplab.sweep.config import load_sweep

        load_sweep(config, overrides)
    elif kind == "select":
        from cliplab.select.config import load_selection

        load_selection(config, overrides)
    else:
        from cliplab.config import load_experiment

        load_experiment(config, overrides)


async def _follow(client: Any, submission_id: str) -> None:
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit(
    kind: str,
    config: str,
    address: str,
    overrides: list[str],
    extra: list[str],
    env: list[str],
    wait: bool = True,
    local_endpoints: bool = True,
    repo: str | Path | None = None,
) -> str:
    """Submit, print the submission id, follow the logs until the job ends; raises JobFailed unless SUCCEEDED."""
    root = find_repo(repo)
    check_config(kind, config, overrides)
    enable_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    submission_id = f"cliplab-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    command = entrypoint(root, kind, config, overrides, extra)
    try:
        client = JobSubmissionClient(address)
        client.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env(root, env, local_endpoints),
            metadata={"cliplab.kind": kind, "cliplab.config": config},
        )
    except AuthenticationError as exc:
        raise SubmitError(f"--address {address}: {str(exc).splitlines()[0]}; {TOKEN_HINT}") from None
    except ConnectionError as exc:
        raise SubmitError(
            f"--address {address}: no Ray job server answers there ({exc}); on KubeRay, "
            "kubectl port-forward svc/CLUSTER-head-svc 8265:8265 first"
        ) from None
    print(f"submitted {submission_id}: {command}", flush=True)
    if not wait:
        return submission_id
    asyncio.run(_follow(client, submission_id))
    status = str(client.get_job_status(submission_id))
    while status.split(".")[-1] not in TERMINAL:  # logs can end a moment before the status settles
        time.sleep(1)
        status = str(client.get_job_status(submission_id))
    status = status.split(".")[-1]
    print(f"job {submission_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        raise JobFailed(f"job {submission_id} {status}: {info.message or 'see the logs above'}")
    return submission_id
