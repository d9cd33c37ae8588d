"""Device nodes, with or without udev.

Minimal containers have a static ``/dev`` (often a plain tmpfs) and no udev, so
nobody creates ``/dev/mapper/<name>``, ``/dev/mapper/control`` or a new
``/dev/loopN``.  These helpers create exactly the node the kernel's device
number calls for, and remove only nodes that are real device nodes (never a
udev symlink, never a regular file).  Where a udev daemon runs with
device-mapper's rules, it makes ``/dev/mapper/<name>`` (a link to ``../dm-N``)
and we only wait for it: :func:`udev_manages_mapper` tells which case holds.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import time
from pathlib import Path

from ..errors import DMFlakeyError, NotRootError

UDEV_CONTROL = "/run/udev/control"
# udev reads rules from these folders; a file in an earlier one hides one of the same name later
UDEV_RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d", "/lib/udev/rules.d")
# device-mapper's rules as distributions name them: 10-dm.rules (lvm2 upstream, Fedora, Arch),
# 55-dm.rules (Debian, Ubuntu)
DM_RULES_NAMES = ("10-dm.rules", "55-dm.rules")
# or any rules file that makes the /dev/mapper/<name> link itself
DM_LINK_RULE = re.compile(r'(SYMLINK\+?|NAME)\s*=\s*"mapper/\$env\{DM_NAME\}')

_rules_seen: tuple[tuple[int, ...], bool] | None = None


def dm_rules_present() -> bool:
    """True when udev's rules include device-mapper's (by name or by what they do).

    Remembered until a rules folder changes (a package was installed or removed),
    so a call costs four stat()s.  A folder changed in the last two seconds is
    read again next time: its mtime ticks coarsely and may not show a second change.
    """
    global _rules_seen
    key = tuple(_mtime(d) for d in UDEV_RULES_DIRS)
    seen = _rules_seen
    if seen is not None and seen[0] == key:
        return seen[1]
    effective: dict[str, str] = {}
    for folder in UDEV_RULES_DIRS:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.endswith(".rules"):
                effective.setdefault(name, os.path.join(folder, name))
    files = [path for path in effective.values() if os.path.realpath(path) != "/dev/null"]  # masked
    found = any(os.path.basename(path) in DM_RULES_NAMES for path in files) \
        or any(DM_LINK_RULE.search(_read(path)) for path in files)
    if max(key) < time.time_ns() - 2_000_000_000:
        _rules_seen = (key, found)
    return found


def udev_running() -> bool:
    """True when a udev daemon listens on its control socket.

    The socket file outlives a stopped or crashed daemon (and a container may
    hold a copy of the host's /run), so only a connect tells: ECONNREFUSED or
    ENOENT means nobody is there.  The connect is non-blocking and closed at
    once, which udevd takes as a client that went away.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(UDEV_CONTROL)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return False
    except BlockingIOError:   # its backlog is full: it is there, only busy
        return True
    except OSError as exc:
        # EACCES (not root) or EPROTOTYPE (another kind of socket): something is there
        return exc.errno in (errno.EACCES, errno.EPERM, errno.EPROTOTYPE)
    finally:
        sock.close()
    return True


def udev_manages_mapper() -> bool:
    """True when a running udev has the rules that create /dev/mapper/<name> links.

    Asked afresh at every call (a daemon may start or stop while we run); cheap
    enough for every resume and remove.
    """
    return dm_rules_present() and udev_running()


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


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


def wait_for_link_gone(path: str, timeout: float) -> bool:
    """Poll (bounded) until udev has removed path (a link or node it made); True when gone.

    After a remove, udev drops /dev/mapper/<name> asynchronously: a caller that
    returns before that leaves a dangling link behind for a moment.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while os.path.lexists(path):
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
