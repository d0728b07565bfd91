"""Sample identity for selection, and DataComp's subset files (uid lists as sorted `u8,u8` arrays).

A sample's uid is 128 bits written as 32 lowercase hex digits:
- the json's `uid` when it is hex of at most 32 digits, left-padded with zeros (DataComp uids are 32
  digits and pass unchanged; SynthScenes' 16-digit uids become `0000000000000000` + uid, so the low
  half of the subset entry is the SynthScenes uid itself);
- otherwise (no json uid, or a non-hex one) the first 128 bits of sha256 of `URL#KEY` (shard URL as
  written in the pool spec, `__key__` of the sample), hex. Such ids are stable across runs over the
  same URLs but change when the shards move; give samples a json `uid` to survive that.

A subset file (DataComp's format, also the reference code's) is `np.save` of a sorted structured
array of dtype `u8,u8`: (first 16 hex digits, last 16) as unsigned 64-bit integers. A uid listed m
times means m copies when resharding (upweighting); the set operations below work on sets.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable

import numpy as np

from cliplab.data.shards import filesystem

DTYPE = np.dtype("u8,u8")
HEX = re.compile(r"^[0-9a-fA-F]{1,32}$")


def sample_uid(meta: dict, url: str, key: str) -> str:
    """The 32-hex-digit uid of a sample (see the module docstring for the rule)."""
    raw = meta.get("uid")
    if isinstance(raw, str) and HEX.match(raw):
        return raw.lower().rjust(32, "0")
    return hashlib.sha256(f"{url}#{key}".encode()).hexdigest()[:32]


def to_pairs(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> sorted `u8,u8` array (repeats kept)."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype=DTYPE)
    arr.sort()
    return arr


def to_hex(pairs: np.ndarray) -> list[str]:
    """`u8,u8` array -> 32-hex-digit uids, in the array's order."""
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(pairs["f0"], pairs["f1"], strict=True)]


def save_subset(url: str, uids: Iterable[str]) -> bytes:
    """Write a DataComp subset file (local or s3://); returns the bytes written."""
    arr = to_pairs(uids)
    buf = io.BytesIO()
    np.save(buf, arr)
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if not url.startswith("s3://"):
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return buf.getvalue()


def load_subset(url: str) -> np.ndarray:
    """Read a subset file; refuses arrays that are not DataComp's `u8,u8` (sorted on return)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if arr.dtype.names is None or len(arr.dtype.names) != 2 or any(arr.dtype[n] != np.uint64 for n in arr.dtype.names):
        raise ValueError(f"{url}: not a DataComp subset file (dtype {arr.dtype}, expected u8,u8)")
    arr = arr.astype(DTYPE)  # field names f0, f1 whatever they were called
    arr.sort()
    return arr


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Uids in a or b, each once, sorted."""
    return np.union1d(a.astype(DTYPE), b.astype(DTYPE))


def intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Uids in both, each once, sorted."""
    return np.intersect1d(a.astype(DTYPE), b.astype(DTYPE))


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Uids of a not in b, each once, sorted."""
    return np.setdiff1d(a.astype(DTYPE), b.astype(DTYPE))
