"""The mount table (/proc/self/mountinfo).  Provisional: superseded by the helper's parser."""

from __future__ import annotations

import os
import stat
from typing import List

__all__ = ["mount_points_of"]


def _unescape(raw: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def _is_node_of(path: str, rdev: int) -> bool:
    if not path.startswith("/"):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def mount_points_of(rdev: int) -> List[str]:
    """Mount points of the block device rdev, innermost last."""
    key = f"{os.major(rdev)}:{os.minor(rdev)}".encode()
    points = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            rest = fields[fields.index(b"-", 6) + 1:] if b"-" in fields[6:] else []
            source = _unescape(rest[1]) if len(rest) > 1 else ""
            if fields[2] == key or _is_node_of(source, rdev):
                points.append(_unescape(fields[4]))
    return points
