"""The embedded S3 endpoint for the demo and tests: moto's server on 127.0.0.1, in this process.

The server thread lives as long as the driver, and Ray workers and DataLoader workers reach it over
loopback like any S3 endpoint. The credentials in `s3_env` are moto's dummy values for this endpoint
only; real credentials always come from the user's environment.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType

import boto3
from moto.server import ThreadedMotoServer


class S3Server:
    """A running moto S3 endpoint; use as a context manager or call `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port or _free_port(host)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise
        self._server = ThreadedMotoServer(ip_address=host, port=self.port, verbose=False)
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_s3_server(host: str = "127.0.0.1", port: int = 0) -> S3Server:
    """Start moto's S3 server on a free loopback port."""
    return S3Server(host, port)


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto3, s3fs, pyarrow (via Ray) and MLflow at the embedded endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def create_bucket(endpoint: str, name: str) -> None:
    """Create a bucket on the endpoint (idempotent)."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:
        client.create_bucket(Bucket=name)
