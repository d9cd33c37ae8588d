"""The mount table, read from ``/proc/self/mountinfo``: which mount points a block device has.

The file is parsed as bytes.  The kernel writes a space, a tab, a newline and a
backslash in a path as an octal escape (``\\040``, ``\\011``, ``\\012``,
``\\134``) and every other byte as it is, so a path may be any bytes at all:
they are unescaped here and decoded with ``os.fsdecode``, which turns bytes
that are not UTF-8 into surrogate escapes instead of raising.  Such a path
round-trips through ``os.fsencode`` to the bytes the kernel has, so a mount
point found here can always be unmounted, whatever its name.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..errors import DMFlakeyError

__all__ = ["Mount", "MOUNTINFO", "parse", "read", "unescape", "mount_points_of"]

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")
_SEPARATOR = b"-"
_FIXED_BEFORE = 6   # mount id, parent id, major:minor, root, mount point, mount options
_FIXED_AFTER = 3    # fs type, source, super options


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (see proc(5)); paths are str, decoded with os.fsdecode."""

    mount_id: int
    parent_id: int
    dev: int                        # st_dev of the mounted filesystem (field 3, major:minor)
    root: str                       # the directory of the filesystem mounted here
    mount_point: str
    options: str                    # per-mount options (rw, nosuid, ...)
    optional: Tuple[str, ...]       # shared:N, master:N, propagate_from:N, unbindable
    fs_type: str                    # e.g. ext4, fuse.sshfs
    source: str                     # what was mounted: a device path, or e.g. "tmpfs", "none"
    super_options: str


def unescape(field: bytes) -> str:
    """A mountinfo field as a str: octal escapes undone, decoded as file names are."""
    if b"\\" not in field:
        return os.fsdecode(field)
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def parse(data: bytes) -> List[Mount]:
    """Every mount of a mountinfo text, in the file's order (a mount comes after its parent's)."""
    mounts = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line:
            continue
        fields = line.split(b" ")
        try:
            dash = fields.index(_SEPARATOR, _FIXED_BEFORE)
        except ValueError:
            dash = -1
        if dash < 0 or len(fields) != dash + 1 + _FIXED_AFTER:
            raise DMFlakeyError("read mount table", MOUNTINFO, f"line {number} is not in mountinfo "
                                f"format: {line[:200]!r}")
        try:
            major, minor = (int(x) for x in fields[2].split(b":"))
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            raise DMFlakeyError("read mount table", MOUNTINFO, f"line {number} has no mount ids or "
                                f"major:minor: {line[:200]!r}") from None
        mounts.append(Mount(
            mount_id, parent_id, os.makedev(major, minor), unescape(fields[3]), unescape(fields[4]),
            unescape(fields[5]), tuple(unescape(f) for f in fields[_FIXED_BEFORE:dash]),
            unescape(fields[dash + 1]), unescape(fields[dash + 2]), unescape(fields[dash + 3])))
    return mounts


def read(path: str = MOUNTINFO) -> List[Mount]:
    """This process's mount table (its mount namespace, as it sees it now)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DMFlakeyError("read mount table", path, "cannot read it (is /proc mounted?)",
                            exc.errno or 0) from None
    return parse(data)


def _is_node_of(path: str, rdev: int) -> bool:
    """True when path is an absolute path to the block device rdev."""
    if not path.startswith("/"):
        return False
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def mount_points_of(rdev: int, mounts: Optional[List[Mount]] = None) -> List[str]:
    """Mount points of the block device rdev, innermost last (unmount them in reverse).

    A mount is the device's when its major:minor is rdev, or, since btrfs shows
    an anonymous device number there, when its source is a path to that device.
    """
    if mounts is None:
        mounts = read()
    return [m.mount_point for m in mounts if m.dev == rdev or _is_node_of(m.source, rdev)]
