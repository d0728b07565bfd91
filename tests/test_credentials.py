"""Sweeps hide the driver's AWS keys from Ray Tune (which copies them into trial runtime envs, logged by Ray)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import boto3

from cliplab.credentials import FILE_VAR, keys_in_private_file


def test_keys_move_to_a_private_file_the_sdk_reads_and_come_back(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-moved")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-moved")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-moved")
    monkeypatch.setenv("AWS_PROFILE", "research")
    monkeypatch.delenv(FILE_VAR, raising=False)
    with keys_in_private_file():
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(os.environ)
        path = Path(os.environ[FILE_VAR])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        creds = boto3.Session().get_credentials()
        assert (creds.access_key, creds.secret_key, creds.token) == ("AKIA-moved", "secret-moved", "token-moved")
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SESSION_TOKEN"]) == ("AKIA-moved", "token-moved")
    assert FILE_VAR not in os.environ and not path.exists()


def test_nothing_changes_without_keys_and_the_env_comes_back_after_an_error(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(FILE_VAR, "/home/user/.aws/credentials")
    with keys_in_private_file():
        assert os.environ[FILE_VAR] == "/home/user/.aws/credentials"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    try:
        with keys_in_private_file():
            raise RuntimeError("trial crashed")
    except RuntimeError:
        pass
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIA-x" and os.environ[FILE_VAR] == "/home/user/.aws/credentials"
