"""Errors a user can cause: each names the field, file, shard or URL at fault and what to do."""


class CliplabError(Exception):
    """Base class for errors caused by input (config, data, storage), not by a bug."""


class ConfigError(CliplabError):
    """An experiment config is invalid; the message names the file and the dotted field."""


class DataError(CliplabError):
    """Shards cannot be found or read; the message names the URL or shard."""


class StorageError(CliplabError):
    """Object storage cannot be used; the message names the endpoint and the URL.

    The message survives libraries that append context to `args` (webdataset does, on the way up).
    """

    def __init__(self, message: str, *context: object):
        super().__init__(message, *context)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorageUnavailable(StorageError):
    """The storage endpoint stayed unreachable for longer than `storage.outage_budget_s`."""


class StorageAuthError(StorageError):
    """The storage endpoint refused the credentials (missing, wrong, or without access)."""


class InstallError(CliplabError):
    """The installed metadata does not match the sources (e.g. missing entry points); reinstalling fixes it."""
