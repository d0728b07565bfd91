"""One retry policy for every S3 access: shard reads, checkpoint writes and restores, exports, run files.

Two layers, both set here and nowhere else. botocore retries each request a few times (standard mode,
connect and read timeouts) to ride out blips. Above it, `retrying` repeats a whole operation with backoff
while the endpoint stays unreachable, for at most `storage.outage_budget_s` (counted from the first
failure), then raises StorageUnavailable naming the endpoint and the URL. Auth errors raise StorageAuthError
at once. Anything else (a missing object, a corrupt shard) is not an outage and passes through unchanged.

Ray Train gets the same policy through `ray_storage`: a pyarrow filesystem over this s3fs whose every call
(checkpoint upload, download, Ray's own marker and snapshot files) goes through `retrying`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import aiohttp
import fsspec
import pyarrow.fs
import s3fs
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from cliplab.errors import StorageAuthError, StorageUnavailable

log = logging.getLogger("cliplab.storage")
T = TypeVar("T")
AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
SERVER_BUSY = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "503", "500"}
NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT}
NETWORK_ERRNOS |= {errno.EHOSTUNREACH, errno.ENETUNREACH}


@dataclass(frozen=True)
class RetryPolicy:
    """How long an unreachable endpoint is waited for, and botocore's per-request retries under that."""

    outage_budget_s: float = 300.0
    request_attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_backoff_s: float = 10.0

    def botocore(self) -> dict[str, Any]:
        """botocore `Config` keywords (s3fs `config_kwargs`)."""
        return {
            "retries": {"mode": "standard", "max_attempts": self.request_attempts},
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
        }


_policy = RetryPolicy()


def configure(outage_budget_s: float) -> None:
    """Set this process's policy (driver and Ray workers; forked DataLoader workers inherit it)."""
    global _policy
    _policy = RetryPolicy(outage_budget_s=outage_budget_s)


def endpoint() -> str:
    """The S3 endpoint every client here talks to (AWS's own when no endpoint is set)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"


class PolicyS3(s3fs.S3FileSystem):
    """s3fs without its own retry loop (one try per call): botocore's retries and `retrying` are the policy."""

    retries = 1


def s3(retry: RetryPolicy | None = None) -> fsspec.AbstractFileSystem:
    """The S3 filesystem with the policy's botocore settings, at AWS_ENDPOINT_URL(_S3) when set."""
    retry = retry or _policy
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return PolicyS3(endpoint_url=custom, config_kwargs=retry.botocore())


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL: the policy's s3fs for s3://, fsspec's choice otherwise."""
    if url.startswith(("s3://", "s3a://")):
        return s3(), url.split("://", 1)[1]
    return fsspec.core.url_to_fs(url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def is_auth_error(exc: BaseException) -> bool:
    """Missing or refused credentials (s3fs turns AccessDenied and friends into PermissionError)."""
    for e in _chain(exc):
        if isinstance(e, NoCredentialsError | PartialCredentialsError | PermissionError):
            return True
        if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in AUTH_CODES:
            return True
    return False


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint cannot be reached or is overloaded: worth waiting for, unlike a missing or bad object."""
    for e in _chain(exc):
        if isinstance(e, BotoConnectionError | HTTPClientError | ReadTimeoutError | ResponseStreamingError):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in SERVER_BUSY:
            return True
        if isinstance(e, OSError) and e.errno in NETWORK_ERRNOS:
            return True
        if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            return True
        if "NETWORK_CONNECTION" in str(e):  # pyarrow's S3 client
            return True
    return False


def retrying(op: Callable[[], T], what: str, url: str, retry: RetryPolicy | None = None) -> T:
    """`op()`, repeated with backoff while the endpoint is unreachable, for at most the outage budget."""
    retry = retry or _policy
    deadline, delay = None, 0.5
    while True:
        try:
            return op()
        except Exception as exc:
            if url.startswith("s3://") and is_auth_error(exc):
                raise StorageAuthError(
                    f"{what} {url}: credentials missing or refused by {endpoint()} ({type(exc).__name__}: {exc}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role) and the bucket policy"
                ) from exc
            if not is_unreachable(exc):
                raise
            now = time.monotonic()
            deadline = deadline or now + retry.outage_budget_s
            if now >= deadline:
                raise StorageUnavailable(
                    f"storage endpoint {endpoint()} unreachable for {retry.outage_budget_s:.0f} s "
                    f"(storage.outage_budget_s) while {what} {url}: {type(exc).__name__}: {exc}"
                ) from exc
            log.warning("%s %s: %s unreachable (%s), retrying", what, url, endpoint(), type(exc).__name__)
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, retry.max_backoff_s)


class ResumableRead:
    """A read-only object stream that survives outages: a failed read reopens the object at the same offset."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = filesystem(url)
        self.pos = 0
        self._file: IO[bytes] | None = retrying(self._open, "opening", url)

    def _open(self) -> IO[bytes]:
        f = self.fs.open(self.path, "rb")
        if self.pos:
            f.seek(self.pos)
        return f

    def _read_once(self, n: int) -> bytes:
        if self._file is None:
            self._file = self._open()
        try:
            return self._file.read(n)
        except Exception:
            self._drop()
            raise

    def read(self, n: int = -1) -> bytes:
        data = retrying(lambda: self._read_once(n), "reading", self.url)
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"ResumableRead({self.url})"

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                log.debug("closing %s after a failed read", self.url, exc_info=True)
            self._file = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ResumableRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Upload:
    """What `open_output_stream` hands pyarrow: a local spool, uploaded whole (with `retrying`) on close."""

    def __init__(self, handler: RetryingHandler, path: str):
        self.handler, self.path = handler, path
        self.spool = tempfile.NamedTemporaryFile(prefix="cliplab-upload-", delete=False)  # noqa: SIM115
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        self.spool.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.spool.close()
        try:
            self.handler.call("uploading", self.path, self.handler.fs.put_file, self.spool.name, self.path)
        finally:
            os.unlink(self.spool.name)


class RetryingHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's fsspec bridge with every call under `retrying` and uploads made whole-file on close."""

    def __init__(self, fs: fsspec.AbstractFileSystem, retry: RetryPolicy):
        super().__init__(fs)
        self.retry = retry

    def __reduce__(self) -> tuple[Any, ...]:
        return RetryingHandler, (self.fs, self.retry)

    def call(self, what: str, path: Any, fn: Callable[..., T], *args: Any) -> T:
        return retrying(lambda: fn(*args), what, f"s3://{path}", self.retry)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.call("stat", paths[0] if paths else "", super().get_file_info, paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return self.call("listing", selector.base_dir, super().get_file_info_selector, selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.call("creating", path, super().create_dir, path, recursive)

    def delete_dir(self, path: str) -> None:
        self.call("deleting", path, super().delete_dir, path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.call("deleting", path, super().delete_dir_contents, path, missing_dir_ok)

    def delete_file(self, path: str) -> None:
        self.call("deleting", path, super().delete_file, path)

    def move(self, src: str, dest: str) -> None:
        self.call("moving", src, super().move, src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.call("copying", src, super().copy_file, src, dest)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self._download(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self._download(path)

    def _download(self, path: str) -> pyarrow.NativeFile:
        """The whole object, fetched under `retrying` into a local file, so reads cannot fail half-way."""
        spool = tempfile.TemporaryFile(prefix="cliplab-download-")  # noqa: SIM115
        try:

            def fetch() -> None:
                spool.seek(0)
                spool.truncate()
                with self.fs.open(path, "rb") as src:
                    shutil.copyfileobj(src, spool, 8 << 20)

            self.call("downloading", path, fetch)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return pyarrow.PythonFile(spool, mode="r")

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_Upload(self, path), mode="w")


def ray_storage(storage: str, retry: RetryPolicy | None = None) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: s3:// goes through the retrying handler."""
    if not storage.startswith(("s3://", "s3a://")):
        return storage, None
    retry = retry or _policy
    return storage.split("://", 1)[1], pyarrow.fs.PyFileSystem(RetryingHandler(s3(retry), retry))
