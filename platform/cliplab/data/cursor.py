"""A reader's cursor as one int64 array, so it crosses the DataLoader's worker queue as a single buffer.

The dict form (`Reader.cursor`) is what checkpoints hold; the array is only its per-batch transport:
`unpack(pack(c)) == c` for every cursor. Layout: a fixed header, the shuffle RNG's state words, then
the buffered positions, four int64 each.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

# reader, readers, emitted, skipped samples, skipped shards, rng version, has gauss, gauss bits, read x4, buffered
HEADER = 13
POS = 4


def pack(cursor: dict[str, Any]) -> np.ndarray:
    """The cursor as one flat int64 array."""
    version, state, gauss = cursor["rng"]
    bits = struct.unpack("<q", struct.pack("<d", gauss))[0] if gauss is not None else 0
    header = [
        cursor["reader"],
        cursor["readers"],
        cursor["emitted"],
        cursor["skipped"]["samples"],
        cursor["skipped"]["shards"],
        version,
        gauss is not None,
        bits,
        *cursor["read"],
        len(cursor["buffer"]),
    ]
    parts = [np.array(header, dtype=np.int64), np.array(state, dtype=np.int64)]
    parts.append(np.array(cursor["buffer"], dtype=np.int64).reshape(-1))
    return np.concatenate(parts)


def unpack(packed: np.ndarray) -> dict[str, Any]:
    """The dict cursor `pack` was given."""
    head = packed[:HEADER].tolist()
    buffered = head[12]
    state = packed[HEADER : len(packed) - buffered * POS].tolist()
    gauss = struct.unpack("<d", struct.pack("<q", head[7]))[0] if head[6] else None
    return {
        "reader": head[0],
        "readers": head[1],
        "read": head[8:12],
        "buffer": packed[len(packed) - buffered * POS :].reshape(buffered, POS).tolist(),
        "rng": [head[5], state, gauss],
        "emitted": head[2],
        "skipped": {"samples": head[3], "shards": head[4]},
    }


def reader_of(packed: np.ndarray) -> int:
    """The logical reader a packed cursor belongs to."""
    return int(packed[0])
