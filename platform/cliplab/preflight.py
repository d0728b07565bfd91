"""Checks on the driver before Ray starts: what would otherwise fail inside every worker, minutes later.

The model section is built on the meta device; the shard specs are listed (one listing per folder or
prefix, not one request per shard) and their count compared with the readers the run splits them over.
"""

from __future__ import annotations

import logging

from cliplab.config import Experiment
from cliplab.data.shards import expand_urls, filesystem
from cliplab.errors import ConfigError, DataError
from cliplab.models.factory import check_model

log = logging.getLogger("cliplab.preflight")


def check_before_ray(exp: Experiment, train: bool = True) -> None:
    """Refuse a model the workers cannot build and shard specs they cannot read (`train`: also train data)."""
    if train:
        check_model(exp.model)
        check_train_shards(exp)
    if exp.data.val_shards:
        _existing("data.val_shards", exp.data.val_shards, expand_urls(exp.data.val_shards))


def check_train_shards(exp: Experiment) -> None:
    """The train shards exist, and (unless resampled) there are at least as many as readers."""
    urls = expand_urls(exp.data.train_shards)
    readers = exp.scaling.num_workers * max(1, exp.data.num_workers)
    found = _existing("data.train_shards", exp.data.train_shards, urls)
    if exp.data.resampled or len(found) >= readers:
        return
    raise ConfigError(
        f"data.train_shards: {len(found)} shards (of {len(urls)} named) for {exp.scaling.num_workers} Ray workers "
        f"x {max(1, exp.data.num_workers)} loader workers (scaling.num_workers x data.num_workers); every reader "
        f"needs a shard: give at least {readers} shards, lower the workers, or set data.resampled"
    )


def _existing(field: str, spec: str, urls: list[str]) -> list[str]:
    """The URLs that exist; refuses a spec of which none does, warns about the missing ones of the others."""
    exists = existing_urls(urls)
    found = [u for u in urls if u in exists]
    if not found:
        raise DataError(f"{field}: none of the {len(urls)} shards of {spec!r} exists (first: {urls[0]})")
    missing = [u for u in urls if u not in found]
    if missing:
        log.warning("%s: %d of %d shards do not exist (first: %s)", field, len(missing), len(urls), missing[0])
    return found


def existing_urls(urls: list[str]) -> set[str]:
    """Which of the URLs exist, with one listing per folder (or S3 prefix); unlistable folders count as existing."""
    folders: dict[str, list[str]] = {}
    for url in urls:
        folders.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    found: set[str] = set()
    for group in folders.values():
        fs, path = filesystem(group[0])
        try:
            if set(_protocols(fs)) & {"http", "https"}:  # no listings over HTTP: ask for each shard
                found.update(u for u in group if fs.exists(filesystem(u)[1]))
                continue
            listed = set(fs.ls(path.rsplit("/", 1)[0] if "/" in path else ".", detail=False))
        except FileNotFoundError:
            continue
        except Exception as exc:  # e.g. read-only credentials without list rights: the workers may still read
            log.warning(
                "cannot list %s (%s: %s); its shards are not checked",
                group[0].rsplit("/", 1)[0],
                type(exc).__name__,
                exc,
            )
            found.update(group)
            continue
        found.update(u for u in group if filesystem(u)[1] in listed)
    return found


def _protocols(fs: object) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
