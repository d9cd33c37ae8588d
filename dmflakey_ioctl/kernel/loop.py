"""Loop devices through ioctls: attach a backing file, read one back, detach it.

A free device comes from ``/dev/loop-control`` (LOOP_CTL_GET_FREE), which
reserves nothing: two processes can be handed the same number, and the loser's
LOOP_CONFIGURE fails with EBUSY, so attach retries from GET_FREE.  Nodes that a
static ``/dev`` lacks are created with mknod.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Optional

from . import blockdev, nodes
from ..errors import DeviceBusyError, DeviceNotFoundError, DMFlakeyError, InvalidArgumentError, \
    KernelSupportError, NotRootError, PermissionDeniedError, opened

__all__ = ["LoopDevice", "attach", "attach_fd", "detach", "info", "by_dev", "bound_identity", "wait_unbound",
           "LOOP_MAJOR"]

LOOP_MAJOR = 7
LOOP_CONTROL = "/dev/loop-control"
LOOP_CONTROL_RDEV = os.makedev(10, 237)

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16

# struct loop_info64 (232 bytes) and struct loop_config (304 bytes), linux/loop.h
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
LOOP_CONFIG_HEAD = struct.Struct("=II")
LOOP_CONFIG_SIZE = LOOP_CONFIG_HEAD.size + LOOP_INFO64.size + 64
NAME_LEN = 64

ATTACH_TRIES = 64


@dataclass
class LoopDevice:
    """A bound loop device.  Use as a context manager to detach on exit.

    ``dev`` is the device number the kernel gave it (with the loop driver's
    max_part set, the minor is not the index), ``backing_id`` the
    ``(st_dev, st_ino)`` of the file it holds: together they identify it even
    after the number or the file's path is reused.
    """

    path: str
    number: int
    backing_file: str
    size: int
    read_only: bool = False
    autoclear: bool = False
    dev: int = 0
    backing_id: Optional[tuple[int, int]] = None
    _fd: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def rdev(self) -> int:
        return self.dev

    @property
    def major_minor(self) -> str:
        """``7:N``, the form a dm table wants."""
        return f"{os.major(self.dev)}:{os.minor(self.dev)}"

    def close(self) -> None:
        """Drop the descriptor attach() kept: an autoclear device is unbound at its last close."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def detach(self) -> None:
        """Unbind the backing file, if it is still ours; idempotent."""
        fd, self._fd = self._fd, None
        detach(self.path, _fd=fd, identity=self.backing_id)

    def __enter__(self) -> "LoopDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _open_control() -> int:
    nodes.ensure_node(LOOP_CONTROL, stat.S_IFCHR, LOOP_CONTROL_RDEV, 0o660)
    try:
        return os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError as exc:
        raise _denied("open", LOOP_CONTROL, "cannot open it", exc.errno) from None
    except OSError as exc:
        raise KernelSupportError("open", LOOP_CONTROL, "the loop driver is not available "
                                 "(load it with `modprobe loop`)", exc.errno) from None


def _denied(operation: str, device: str, what: str, err: int) -> PermissionDeniedError:
    """EACCES or EPERM opening a loop node: "needs root" only when this process is not root.

    Root is refused by policy, e.g. a container's device cgroup that leaves out
    the loop devices (the kernel answers EPERM).
    """
    if os.geteuid() != 0:
        return NotRootError(operation, device, f"{what}: loop devices need root", err)
    return PermissionDeniedError(operation, device, f"{what}: permission denied although this "
                                 "process runs as root: a device cgroup (a container without access "
                                 "to loop devices), a user namespace or a security module refuses it",
                                 err)


def _node_for(number: int) -> tuple[str, int]:
    """/dev/loopN, made where missing, and its device number as the kernel reports it."""
    path = f"/dev/loop{number}"
    rdev = nodes.sysfs_dev(f"loop{number}") or os.makedev(LOOP_MAJOR, number)
    nodes.ensure_node(path, stat.S_IFBLK, rdev, 0o660)
    return path, rdev


def _config(backing_fd: int, flags: int, block_size: int, name: str) -> bytearray:
    buf = bytearray(LOOP_CONFIG_SIZE)
    LOOP_CONFIG_HEAD.pack_into(buf, 0, backing_fd, block_size)
    LOOP_INFO64.pack_into(buf, LOOP_CONFIG_HEAD.size, 0, 0, 0, 0, 0, 0, 0, 0, flags,
                          os.fsencode(name)[-(NAME_LEN - 1):], b"", b"", 0, 0)
    return buf


def attach(path: str, *, read_only: bool = False, direct_io: bool = False, autoclear: bool = False,
           block_size: Optional[int] = None) -> LoopDevice:
    """Bind the file at path to a free loop device and return it.

    With autoclear the kernel unbinds the device at its last close; the
    returned object then keeps one descriptor open until ``close()`` (once a dm
    table or a mount holds the device) or ``detach()``.  A process that dies
    before then leaves no bound loop device behind.
    """
    path = os.path.realpath(path)
    _check_block_size(block_size, path)
    try:
        backing = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise DMFlakeyError("attach", path, "cannot open the backing file", exc.errno) from None
    try:
        return attach_fd(backing, path, read_only=read_only, direct_io=direct_io,
                         autoclear=autoclear, block_size=block_size)
    finally:
        os.close(backing)


def _check_block_size(block_size: Optional[int], path: str) -> None:
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 512 or block_size > 65536
                                   or block_size & (block_size - 1)):
        raise InvalidArgumentError("attach", path, f"block size {block_size!r} is not a power of two "
                                   "from 512 up to the page size")


def attach_fd(backing: int, name: str, *, read_only: bool = False, direct_io: bool = False,
              autoclear: bool = False, block_size: Optional[int] = None) -> LoopDevice:
    """attach() for a file already open (a memfd, say); name is what the device reports.

    The caller keeps its descriptor: the loop device holds its own reference.
    """
    _check_block_size(block_size, name)
    mode = os.O_RDONLY if read_only else os.O_RDWR
    flags = (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_AUTOCLEAR if autoclear else 0) \
        | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    control = _open_control()
    try:
        for attempt in range(ATTACH_TRIES):
            try:
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            except OSError as exc:
                raise DMFlakeyError("attach", name, "LOOP_CTL_GET_FREE found no free loop device",
                                    exc.errno) from None
            dev_path, rdev = _node_for(number)
            try:
                fd = os.open(dev_path, mode | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.EBUSY) and attempt + 1 < ATTACH_TRIES:
                    time.sleep(0.001 * (attempt + 1))
                    continue
                if isinstance(exc, PermissionError):
                    raise _denied("attach", name, f"cannot open {dev_path}", exc.errno) from None
                raise DMFlakeyError("attach", name, f"cannot open {dev_path}", exc.errno) from None
            try:
                _configure(fd, backing, flags, block_size or 0, name)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY and attempt + 1 < ATTACH_TRIES:
                    time.sleep(0.001 * (attempt + 1))  # another process won the race for this number
                    continue
                raise DMFlakeyError("attach", name, f"cannot configure {dev_path}", exc.errno) from None
            try:
                size = _size(fd)
            except OSError as exc:
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
                os.close(fd)
                raise DMFlakeyError("attach", name, f"BLKGETSIZE64 on {dev_path} failed; detached "
                                    "it again", exc.errno) from None
            st = os.fstat(backing)
            if not autoclear:
                os.close(fd)
                fd = None
            return LoopDevice(dev_path, number, name, size, read_only, autoclear, rdev,
                              (st.st_dev, st.st_ino), fd)
        raise DeviceBusyError("attach", name, f"no free loop device after {ATTACH_TRIES} tries",
                              errno.EBUSY)
    finally:
        os.close(control)


def _configure(fd: int, backing: int, flags: int, block_size: int, name: str) -> None:
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, _config(backing, flags, block_size, name))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY, errno.ENOSYS):
            raise
    # kernels before 5.8: the legacy pair, then the knobs LOOP_CONFIGURE would have set
    fcntl.ioctl(fd, LOOP_SET_FD, backing)
    try:
        info = bytearray(LOOP_INFO64.size)
        LOOP_INFO64.pack_into(info, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags & LO_FLAGS_AUTOCLEAR,
                              os.fsencode(name)[-(NAME_LEN - 1):], b"", b"", 0, 0)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
        if block_size:
            fcntl.ioctl(fd, LOOP_SET_BLOCK_SIZE, block_size)
        if flags & LO_FLAGS_DIRECT_IO:
            fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1)
    except OSError:
        fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        raise


def _size(fd: int) -> int:
    buf = bytearray(8)
    fcntl.ioctl(fd, blockdev.BLKGETSIZE64, buf)
    return struct.unpack("=Q", buf)[0]


def _index(path: str, operation: str) -> int:
    """The loop device's index N (/sys/block/loopN), from its device number.

    With the loop driver's max_part set the minor is N times a stride, so the
    number is looked up in sysfs, never computed.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "no such device node", exc.errno) from None
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
        raise InvalidArgumentError(operation, path, "not a loop block device")
    name = os.path.basename(os.path.realpath(
        f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"))
    if not name.startswith("loop") or not name[4:].isdigit():
        raise InvalidArgumentError(operation, path, f"not a whole loop device (sysfs calls it {name})")
    return int(name[4:])


def by_dev(rdev: int) -> str:
    """The node of the loop device with device number rdev (made where missing).

    For a table's ``7:M``: the path is found through sysfs, so it is right
    whatever minor stride the loop driver uses.
    """
    key = f"{os.major(rdev)}:{os.minor(rdev)}"
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{key}"))
    if os.major(rdev) != LOOP_MAJOR or not name.startswith("loop") or not name[4:].isdigit():
        raise DeviceNotFoundError("find loop device", key, "no whole loop device has this number",
                                  errno.ENODEV)
    path = f"/dev/{name}"
    nodes.ensure_node(path, stat.S_IFBLK, rdev, 0o660)
    return path


def _status(fd: int) -> tuple:
    buf = bytearray(LOOP_INFO64.size)
    fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    return LOOP_INFO64.unpack(buf)


def info(path: str) -> LoopDevice:
    """Read back what a loop device is bound to (LOOP_GET_STATUS64)."""
    with opened(path, "loop info", "cannot open the device") as fd:
        try:
            fields = _status(fd)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise DeviceNotFoundError("loop info", path, "no file is attached", exc.errno) from None
            raise DMFlakeyError("loop info", path, "LOOP_GET_STATUS64 failed", exc.errno) from None
        number, flags = fields[5], fields[8]
        backing = _backing_file(number) or fields[9].split(b"\0", 1)[0].decode(errors="replace")
        return LoopDevice(path, number, backing, _size(fd), bool(flags & LO_FLAGS_READ_ONLY),
                          bool(flags & LO_FLAGS_AUTOCLEAR), os.fstat(fd).st_rdev,
                          (fields[0], fields[1]))


def bound_identity(path: str) -> Optional[tuple[int, int]]:
    """``(st_dev, st_ino)`` of the file the loop device holds now, or None when unbound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fields = _status(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return fields[0], fields[1]


def _backing_file(number: int) -> Optional[str]:
    """The path sysfs shows for the bound file (any bytes: decoded with os.fsdecode)."""
    try:
        with open(f"/sys/block/loop{number}/loop/backing_file", "rb") as fh:
            return os.fsdecode(fh.read().rstrip(b"\n"))
    except OSError:
        return None


def _holders(number: int) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/block/loop{number}/holders"))
    except OSError:
        return []


def detach(path: str, *, _fd: Optional[int] = None,
           identity: Optional[tuple[int, int]] = None, timeout: float = 3.0) -> None:
    """Unbind a loop device and wait (bounded) until the kernel has let it go.

    Detaching a device that is already unbound is not an error.  A device that
    is mounted or held by a dm table is refused (DeviceBusyError) before
    anything changes.  With ``identity`` (the ``(st_dev, st_ino)`` of the file
    we bound), a device that meanwhile holds another file is left alone: another
    process reused the number.
    """
    number = _index(path, "detach")
    try:
        bound = bound_identity(path)
        if bound is None or (identity is not None and bound != identity):
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
                break
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):
                    return
                if exc.errno != errno.EBUSY:
                    raise DMFlakeyError("detach", path, "cannot open the device", exc.errno) from None
                # a holder that is still listed is not going away by itself: refuse at once;
                # one that just left (a removed dm device, an unmount) lets go within moments
                held = _holders(number)
                if held or time.monotonic() >= deadline:
                    who = ", ".join(held) or "a mount or another exclusive user"
                    raise DeviceBusyError("detach", path, f"in use by {who}; unmount or remove that "
                                          "first", exc.errno) from None
                time.sleep(0.01)
        try:
            fcntl.ioctl(probe, LOOP_CLR_FD, 0)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise DMFlakeyError("detach", path, "LOOP_CLR_FD failed", exc.errno) from None
        finally:
            os.close(probe)
    finally:
        if _fd is not None:
            os.close(_fd)
    # LOOP_CLR_FD only marks the device; it unbinds once the last descriptor is
    # closed.  Wait for that, so the caller can count on the device being free.
    # Once free, another process may bind the number to its own file at once:
    # only our file still being there means "not yet".
    wait_unbound(path, bound, deadline)


def wait_unbound(path: str, identity: tuple[int, int], deadline: float) -> None:
    """Wait until the loop device no longer holds the file identity (DeviceBusyError at deadline)."""
    while bound_identity(path) == identity:
        if time.monotonic() >= deadline:
            raise DeviceBusyError("detach", path, "still bound: another process holds it open",
                                  errno.EBUSY)
        time.sleep(0.002)
