"""Errors a user can cause: each names the field, file, shard or URL at fault and what to do."""


class CliplabError(Exception):
    """Base class for errors caused by input (config, data, storage), not by a bug."""


class ConfigError(CliplabError):
    """An experiment config is invalid; the message names the file and the dotted field."""


class DataError(CliplabError):
    """Shards cannot be found or read; the message names the URL or shard."""


class InstallError(CliplabError):
    """The installed metadata does not match the sources (e.g. missing entry points); reinstalling fixes it."""
