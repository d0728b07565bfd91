"""Faults a real shard can have, made on real shard bytes: a garbage image, a cut in the middle of a member."""

from __future__ import annotations

import io
import tarfile


def with_garbage_jpg(data: bytes, nth: int = 2) -> bytes:
    """The shard with its nth `.jpg` (1-based) replaced by bytes that are no image."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        seen = 0
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            if member.name.endswith(".jpg"):
                seen += 1
                if seen == nth:
                    payload = b"not a jpeg"
                    member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    return out.getvalue()


def cut_inside_member(data: bytes, member: int = 7) -> bytes:
    """The shard cut half-way through a member's data (a cut at a member boundary looks like a clean end)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmembers()[member]
    return data[: info.offset_data + info.size // 2]
