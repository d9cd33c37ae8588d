"""Device nodes without udev.

Minimal containers have a static ``/dev`` (often a plain tmpfs) and no udev, so
nobody creates ``/dev/mapper/<name>``, ``/dev/mapper/control`` or a new
``/dev/loopN``.  These helpers create exactly the node the kernel's device
number calls for, and remove only nodes that are real device nodes (never a
udev symlink, never a regular file).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from ..errors import DMFlakeyError, NotRootError

UDEV_CONTROL = "/run/udev/control"
DM_UDEV_RULES = [
    "/etc/udev/rules.d/10-dm.rules",
    "/lib/udev/rules.d/10-dm.rules",
    "/usr/lib/udev/rules.d/10-dm.rules",
]


def udev_manages_mapper() -> bool:
    """True when a running udev has the rules that create /dev/mapper/<name> links."""
    return os.path.exists(UDEV_CONTROL) and any(os.path.exists(p) for p in DM_UDEV_RULES)


def node_matches(path: str, kind: int, rdev: int) -> bool:
    """True when path (following links) is a device node of kind with that number."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_IFMT(st.st_mode) == kind and st.st_rdev == rdev


def ensure_node(path: str, kind: int, rdev: int, mode: int = 0o600) -> bool:
    """Make path a device node of kind (S_IFBLK or S_IFCHR) and number rdev.

    Returns True when this call created the node.  A stale device node or a
    dangling link is replaced; anything else in the way is an error.
    """
    if node_matches(path, kind, rdev):
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise DMFlakeyError("create node", path, "a file that is not a device node is in the way",
                                errno.EEXIST)
        os.unlink(path)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    old = os.umask(0)
    try:
        os.mknod(path, kind | mode, rdev)
    except FileExistsError:
        # another process made it at the same moment; fine if it is the same node
        if not node_matches(path, kind, rdev):
            raise
        return False
    except PermissionError as exc:
        raise NotRootError("create node", path, f"mknod {os.major(rdev)}:{os.minor(rdev)} needs "
                           "CAP_MKNOD and device-cgroup access", exc.errno) from None
    finally:
        os.umask(old)
    return True


def remove_node(path: str, rdev: int | None) -> bool:
    """Unlink path if it is a block device node (not a link), for rdev unless None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISBLK(st.st_mode) or (rdev is not None and st.st_rdev != rdev):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def wait_for_node(path: str, kind: int, rdev: int, timeout: float) -> bool:
    """Poll (bounded) for a node that udev is expected to create."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not node_matches(path, kind, rdev):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def sysfs_dev(name: str) -> int | None:
    """The device number sysfs reports for /sys/block/<name>, or None."""
    try:
        text = Path(f"/sys/block/{name}/dev").read_text()
    except OSError:
        return None
    major, minor = text.strip().split(":")
    return os.makedev(int(major), int(minor))
