"""Keep AWS keys out of what Ray records: Ray Tune copies the driver's AWS_* keys into every trial's runtime env,
and Ray writes a runtime env into its session logs (`runtime_env_agent.log`) and shows it in the dashboard.

While a sweep runs, the driver reads its keys from a private credentials file (AWS_SHARED_CREDENTIALS_FILE,
honoured by botocore, s3fs and pyarrow's S3 client) instead of its environment. Trials and their workers use
their own environment, as training runs always do: inherited from the shell by a local Ray, a Kubernetes
Secret on KubeRay (see cluster/README.md).
"""

from __future__ import annotations

import configparser
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KEYS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_SECURITY_TOKEN": "aws_security_token",
}
FILE_VAR = "AWS_SHARED_CREDENTIALS_FILE"


@contextmanager
def keys_in_private_file() -> Iterator[None]:
    """Move this process's AWS keys from its environment into a 0600 credentials file for the block's duration,
    under the profile the SDKs will look up (AWS_PROFILE, else default); restore the environment after."""
    found = {var: os.environ[var] for var in KEYS if os.environ.get(var)}
    if not found:
        yield
        return
    saved = {var: os.environ.get(var) for var in (*KEYS, FILE_VAR)}
    folder = Path(tempfile.mkdtemp(prefix="cliplab-aws-"))
    try:
        profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
        parser = configparser.ConfigParser()
        parser[profile] = {KEYS[var]: value for var, value in found.items()}
        path = folder / "credentials"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            parser.write(f)
        for var in KEYS:
            os.environ.pop(var, None)
        os.environ[FILE_VAR] = str(path)
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        shutil.rmtree(folder, ignore_errors=True)
