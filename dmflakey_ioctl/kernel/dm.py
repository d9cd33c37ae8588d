"""Device-mapper through ioctls on ``/dev/mapper/control``, with no dmsetup and no udev.

Every request is a ``struct dm_ioctl`` header (interface version 4, 312
bytes) packed in one place, :func:`pack_request`, followed by the command's
payload.  The kernel writes its answer into the same buffer; when it did not
fit, the kernel sets ``DM_BUFFER_FULL_FLAG`` and the call is repeated with a
bigger buffer.  A :class:`Control` is the context object over the control
file; the module-level functions use one shared, lazily opened instance.

Device nodes: after a resume, ``/dev/mapper/<name>`` exists.  Where a running
udev has device-mapper rules it creates the node and we wait for it (bounded);
everywhere else (containers, minimal systems) we mknod it from the device number
the kernel returned, and unlink it again on remove.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

from . import kmsg, nodes
from ..errors import (DeviceBusyError, DeviceExistsError, DeviceNotFoundError, DMFlakeyError,
                     InvalidArgumentError, InvalidNameError, InvalidTableError, KernelSupportError,
                     NotRootError, PermissionDeniedError, TableRejectedError)

__all__ = [
    "Command", "Flag", "Target", "DeviceInfo", "ListedDevice", "ByUuid", "DeviceRef", "Control",
    "PreparedCall", "TableSwap",
    "check_name", "check_new_name", "check_uuid", "check_device_mapper", "pack_request", "control",
    "version", "create", "load", "suspend", "resume", "remove", "clear", "info", "table", "status",
    "list_devices", "target_versions", "target_version", "message",
    "CONTROL_PATH", "MAPPER_DIR",
]

CONTROL_PATH = "/dev/mapper/control"
MAPPER_DIR = "/dev/mapper"
CONTROL_RDEV = os.makedev(10, 236)

HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")   # struct dm_ioctl
HEADER_DATA = 305                                  # offsetof(struct dm_ioctl, data)
TARGET_SPEC = struct.Struct("=QQiI16s")           # struct dm_target_spec
NAME_LIST = struct.Struct("=QI")                   # struct dm_name_list (name at 12)
NAME_LIST_NAME = 12
TARGET_VERSIONS = struct.Struct("=I3I")            # struct dm_target_versions (name at 16)
U32X2 = struct.Struct("=II")
U64 = struct.Struct("=Q")

INTERFACE = (4, 0, 0)
NAME_MAX = 127       # DM_NAME_LEN - 1
UUID_MAX = 128       # DM_UUID_LEN - 1
TYPE_MAX = 15        # DM_MAX_TYPE_NAME - 1
BUFFER_START = 16384
BUFFER_MAX = 32 << 20
RESERVED_NAMES = {"control", ".", ".."}
UDEV_WAIT = 30.0     # seconds udev may take to make or drop /dev/mapper/<name> (seen: over 2 s, loaded)


class Command(enum.IntEnum):
    """The dm ioctl commands (``_IOWR(0xfd, nr, struct dm_ioctl)``)."""

    VERSION = 0
    REMOVE_ALL = 1
    LIST_DEVICES = 2
    DEV_CREATE = 3
    DEV_REMOVE = 4
    DEV_RENAME = 5
    DEV_SUSPEND = 6
    DEV_STATUS = 7
    DEV_WAIT = 8
    TABLE_LOAD = 9
    TABLE_CLEAR = 10
    TABLE_DEPS = 11
    TABLE_STATUS = 12
    LIST_VERSIONS = 13
    TARGET_MSG = 14
    DEV_SET_GEOMETRY = 15
    DEV_ARM_POLL = 16
    GET_TARGET_VERSION = 17

    @property
    def request(self) -> int:
        return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | self.value


class Flag(enum.IntFlag):
    """``struct dm_ioctl`` flags."""

    NONE = 0
    READONLY = 1 << 0
    SUSPEND = 1 << 1
    PERSISTENT_DEV = 1 << 3
    STATUS_TABLE = 1 << 4
    ACTIVE_PRESENT = 1 << 5
    INACTIVE_PRESENT = 1 << 6
    BUFFER_FULL = 1 << 8
    SKIP_LOCKFS = 1 << 10
    NOFLUSH = 1 << 11
    QUERY_INACTIVE_TABLE = 1 << 12
    UEVENT_GENERATED = 1 << 13
    UUID = 1 << 14
    DATA_OUT = 1 << 16
    DEFERRED_REMOVE = 1 << 17
    INTERNAL_SUSPEND = 1 << 18


# udev cookie flags (event_nr of resume and remove), lvm2's values shifted by 16.
UDEV_PRIMARY_SOURCE = 0x40 << 16
UDEV_DISABLE_DM_RULES = 0x01 << 16
UDEV_DISABLE_SUBSYSTEM_RULES = 0x02 << 16
UDEV_DISABLE_DISK_RULES = 0x04 << 16
UDEV_DISABLE_OTHER_RULES = 0x08 << 16


class Target(NamedTuple):
    """One line of a table, or of a status: sectors ``start`` .. ``start+length``."""

    start: int
    length: int
    target_type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.target_type} {self.params}".rstrip()


@dataclass(frozen=True)
class DeviceInfo:
    """What DM_DEV_STATUS says about a device."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    event_nr: int
    suspended: bool
    live_table: bool
    inactive_table: bool
    read_only: bool
    target_count: int
    deferred_remove: bool = False

    @property
    def path(self) -> str:
        return f"{MAPPER_DIR}/{self.name}"

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)


@dataclass(frozen=True)
class ListedDevice:
    """One entry of DM_LIST_DEVICES; ``uuid`` is None where the kernel does not report it."""

    name: str
    major: int
    minor: int
    uuid: Optional[str] = None


TargetLike = Union[Target, Sequence[object]]


def _check_text(value: object, what: str, limit: int, operation: str) -> bytes:
    """value (a name or a uuid) as the kernel will store it; InvalidNameError otherwise."""
    if not isinstance(value, str):
        raise InvalidNameError(operation, repr(value), f"a {what} must be a str")
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        raise InvalidNameError(operation, repr(value), f"the {what} is not valid UTF-8 text") from None
    problem = None
    if not raw:
        problem = f"the {what} is empty"
    elif len(raw) > limit:
        problem = f"the {what} is {len(raw)} bytes long; the kernel allows {limit}"
    elif "/" in value:
        problem = f"a {what} cannot contain '/'"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        problem = f"a {what} cannot contain NUL or control characters"
    if problem:
        raise InvalidNameError(operation, repr(value), problem)
    return raw


def check_name(name: object, operation: str = "check name") -> bytes:
    """The name as the kernel will store it, or InvalidNameError before any ioctl."""
    raw = _check_text(name, "device name", NAME_MAX, operation)
    if name in RESERVED_NAMES:
        raise InvalidNameError(operation, repr(name), f"{name!r} is reserved by device-mapper")
    return raw


def check_new_name(name: object, operation: str) -> None:
    """Refuse, before anything is made, a name the kernel would refuse or that is taken."""
    check_name(name, operation)
    if name in {d.name for d in list_devices()}:
        raise DeviceExistsError(operation, str(name), "a dm device with this name already exists",
                                errno.EEXIST)


def check_uuid(uuid: object, operation: str = "check uuid") -> bytes:
    """The uuid as bytes (empty for None), or InvalidNameError before any ioctl."""
    return b"" if uuid is None else _check_text(uuid, "uuid", UUID_MAX, operation)


def pack_request(*, name: bytes = b"", uuid: bytes = b"", flags: int = 0, dev: int = 0,
                 event_nr: int = 0, target_count: int = 0, payload: bytes = b"",
                 size: int = 0) -> bytearray:
    """A request buffer: the header, then the payload at offset 312, then free space."""
    size = max(size, HEADER.size + len(payload))
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, *INTERFACE, size, HEADER.size, target_count, 0, flags, event_nr, 0,
                     dev, name, uuid, b"")
    buf[HEADER.size:HEADER.size + len(payload)] = payload
    return buf


def pack_targets(targets: Iterable[TargetLike], operation: str, device: str) -> tuple[bytes, int]:
    """The TABLE_LOAD payload for targets; refuses what the kernel would refuse."""
    chunks = []
    expected = 0
    try:
        items = list(targets)
    except TypeError:
        raise InvalidTableError(operation, device, f"targets must be an iterable, got {targets!r}") from None
    for item in items:
        try:
            target = Target(*item)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidTableError(operation, device, f"a target is a Target or a (start, length, "
                                    f"type, params) sequence, got {item!r}") from None
        start, length, kind, params = target.start, target.length, target.target_type, target.params
        for label, value in (("start", start), ("length", length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 64:
                raise InvalidTableError(operation, device, f"target {label} {value!r} is not a sector count")
        if length == 0:
            raise InvalidTableError(operation, device, "a target cannot have zero length")
        if start != expected:
            raise InvalidTableError(operation, device, f"targets must be contiguous from sector 0: "
                                    f"expected start {expected}, got {start}")
        expected = start + length
        if not isinstance(kind, str) or not kind or not kind.isascii() or len(kind) > TYPE_MAX \
                or any(c.isspace() or c == "\0" for c in kind):
            raise InvalidTableError(operation, device, f"bad target type {kind!r}")
        if not isinstance(params, str) or "\0" in params:
            raise InvalidTableError(operation, device, f"bad target parameters {params!r}")
        try:
            text = params.encode() + b"\0"
        except UnicodeEncodeError:
            raise InvalidTableError(operation, device, f"target parameters {params!r} are not valid "
                                    "UTF-8 text") from None
        text += bytes(-(TARGET_SPEC.size + len(text)) % 8)
        chunks.append(TARGET_SPEC.pack(start, length, 0, TARGET_SPEC.size + len(text), kind.encode())
                      + text)
    if not chunks:
        raise InvalidTableError(operation, device, "a table needs at least one target")
    return b"".join(chunks), len(chunks)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _align8(n: int) -> int:
    return (n + 7) & ~7


class Reply:
    """The kernel's answer: the header fields and the data that follows them."""

    __slots__ = ("buffer", "version", "data_size", "data_start", "target_count", "open_count",
                 "flags", "event_nr", "dev", "name", "uuid")

    def __init__(self, buf: bytearray) -> None:
        fields = HEADER.unpack_from(buf)
        self.buffer = buf
        self.version = fields[0:3]
        (self.data_size, self.data_start, self.target_count, self.open_count, self.flags,
         self.event_nr) = fields[3:9]
        self.dev = fields[10]
        self.name = _cstr(fields[11])
        self.uuid = _cstr(fields[12])

    def data(self) -> bytes:
        return bytes(self.buffer[self.data_start:self.data_size])


@dataclass(frozen=True)
class ByUuid:
    """Address a device by its uuid rather than its name.

    A device that was removed and made again under the same name has another
    uuid, so a request addressed this way can never reach the newcomer.  The
    name, when given, is only what errors call the device.
    """

    uuid: str
    name: Optional[str] = None


DeviceRef = Union[str, ByUuid]
"""A device's name, or ``ByUuid(uuid)``."""
_GLOBAL: Any = object()          # the "device" of commands about no device
NO_DEVICE = (b"", b"", None)


def _address(device: DeviceRef, operation: str) -> tuple[bytes, bytes, str]:
    """(name, uuid, label) for a request: exactly one of name and uuid is set.

    The label names the device in errors: its name, or ``uuid <uuid>``.
    """
    if isinstance(device, ByUuid):
        return (b"", _check_text(device.uuid, "uuid", UUID_MAX, operation),
                device.name or f"uuid {device.uuid}")
    return check_name(device, operation), b"", device


def _has_cap_sys_admin() -> bool:
    """Whether this process holds CAP_SYS_ADMIN (bit 21 of CapEff); root where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


# errnos of a table load that mean the kernel refused the table, and what each says
_TABLE_ERRORS = {
    errno.EINVAL: "the kernel refused the table",
    errno.ENODEV: "the kernel refused the table",
    errno.ENOENT: "a device named in the table does not exist",
    errno.ENXIO: "a device named in the table does not exist",
    errno.ENOTBLK: "a device named in the table is not a block device",
}


def _error(command: Command, operation: str, device: Optional[str], err: int,
           log: Callable[[], list[str]]) -> DMFlakeyError:
    """Turn a failed ioctl into the library's exception for that case.

    log() returns the kernel log lines about this device (read only when the
    case needs them: reading the log costs time).
    """
    if err in (errno.EACCES, errno.EPERM):
        if not _has_cap_sys_admin():
            return NotRootError(operation, device, "device-mapper needs root (CAP_SYS_ADMIN in the "
                                "initial user namespace)", err)
        if command == Command.TABLE_LOAD:
            # the kernel opens each device of the table for this process: a policy may refuse
            # (a read-only device is no cause: the kernel takes it and fails the writes)
            said = "; ".join(log())
            return PermissionDeniedError(operation, device, "the kernel may not open a device of the "
                                         "table for this process: a device cgroup or a security "
                                         "module denies it" + (f" (kernel said: {said})" if said else ""),
                                         err)
        return PermissionDeniedError(operation, device, "permission denied although this process "
                                     "has CAP_SYS_ADMIN: a device cgroup, a user namespace or a "
                                     "security module refused it", err)
    if command == Command.TABLE_LOAD and err in _TABLE_ERRORS:
        lines = log()
        text = "; ".join(lines)
        # ENXIO with no word from the table code: the dm device itself is missing
        if err != errno.ENXIO or lines:
            if "unknown target type" in text:
                kind = text.split("unknown target type")[0].rstrip(": ").rsplit(" ", 1)[-1]
                return KernelSupportError(operation, device, f"the kernel has no {kind} target: load "
                                          f"it with `modprobe dm-{kind}` (kernel said: {text})", err)
            return TableRejectedError(operation, device, f"{_TABLE_ERRORS[err]} "
                                      f"({text or 'no kernel log'})", err, kernel_log=text)
    if err == errno.ENXIO:
        return DeviceNotFoundError(operation, device, "no such device-mapper device", err)
    if err == errno.EBUSY:
        if command in (Command.DEV_CREATE, Command.DEV_RENAME):
            return DeviceExistsError(operation, device, "a device with this name or uuid already "
                                     "exists", err)
        if command == Command.TABLE_LOAD:
            return DeviceBusyError(operation, device, "a device in the table is in use (mounted or "
                                   "held exclusively)", err)
        return DeviceBusyError(operation, device, "the device is open (mounted or held by a "
                               "process); close it and retry", err)
    if command == Command.DEV_SUSPEND and operation == "resume" and err == errno.EINVAL:
        # a table the load accepted can still be refused when it is swapped in (a target that
        # ends past its device's last sector): the reason is only in the kernel log
        text = "; ".join(log())
        if text:
            return TableRejectedError(operation, device, f"the kernel refused the new table at "
                                      f"resume ({text})", err, kernel_log=text)
    return DMFlakeyError(operation, device, f"DM_{command.name} failed", err)


_pid = os.getpid()  # this process's pid, kept current across os.fork() without a syscall per ioctl


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def check_device_mapper() -> None:
    """Raise KernelSupportError when the kernel has no device-mapper, judged without opening it.

    Opening /dev/mapper/control mknods it first, so asking the kernel would
    leave a node behind on every host without dm (the CLI, the pytest plugin).
    A control node alone proves nothing: it may be such a leftover.
    """
    if os.path.exists("/sys/module/dm_mod"):
        return
    try:
        with open("/proc/misc") as fh:
            if any(line.split()[1:] == ["device-mapper"] for line in fh):
                return
    except OSError:
        pass
    release = os.uname().release
    try:
        with open(f"/lib/modules/{release}/modules.dep") as fh:
            if "/dm-mod.ko" in fh.read():
                return  # a loadable module: opening the control node loads it
    except OSError:
        pass
    raise KernelSupportError("check kernel", None, f"device-mapper is missing: Linux {release} has "
                             "no dm_mod (not built in, not loaded, no module installed)",
                             errno.ENODEV)


class PreparedCall:
    """One request packed in advance: each send() copies the pristine template and sends it.

    For requests that repeat unchanged (a device's table loads and resumes), so
    that a fault switch costs little more than its ioctls.
    """

    __slots__ = ("_control", "command", "_template", "operation", "device", "dev")

    def __init__(self, control: "Control", command: Command, template: bytearray, operation: str,
                 device: str, dev: Optional[int] = None) -> None:
        self._control = control
        self.command = command
        self._template = bytes(template)
        self.operation = operation
        self.device = device
        self.dev = dev

    def send(self) -> bytearray:
        """Send a fresh copy of the template; returns the kernel's answer (not decoded)."""
        return self._control.send(self.command, bytearray(self._template), self.operation,
                                  self.device, dev=self.dev)


class TableSwap:
    """A table change prepared once and run as often as wanted: load, then resume.

    A resume that finds a loaded table suspends the device itself (freezing its
    filesystem unless told not to), swaps the tables and resumes: one ioctl
    fewer than suspend + load + resume, and a load the kernel refuses changes
    nothing, since the device was never suspended.  When the swap itself fails,
    the loaded table is dropped and the device resumed with its old one before
    the error is raised: a device is never left suspended.
    """

    __slots__ = ("_control", "_load", "_resume")

    def __init__(self, control: "Control", device: DeviceRef, targets: Iterable[TargetLike], *,
                 lockfs: bool = False, dev: Optional[int] = None) -> None:
        name, uuid, label = _address(device, "load table")
        payload, count = pack_targets(targets, "load table", label)
        self._control = control
        self._load = PreparedCall(control, Command.TABLE_LOAD, pack_request(
            name=name, uuid=uuid, payload=payload, target_count=count), "load table", label, dev)
        self._resume = PreparedCall(control, Command.DEV_SUSPEND, pack_request(
            name=name, uuid=uuid, flags=0 if lockfs else Flag.SKIP_LOCKFS,
            event_nr=control.udev_cookie()), "resume", label, dev)

    def run(self) -> None:
        self._load.send()
        try:
            self._resume.send()
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        """After a failed swap: drop the loaded table, make sure the old one runs."""
        clear = PreparedCall(self._control, Command.TABLE_CLEAR, bytearray(self._resume._template),
                             "clear table", self._resume.device, self._resume.dev)
        try:
            clear.send()
        except DMFlakeyError:
            pass  # nothing left to drop
        try:
            self._resume.send()
        except DMFlakeyError:
            time.sleep(0.05)
            self._resume.send()


class Control:
    """The control file, opened on first use, and one method per dm ioctl.

    Every method takes the device as a name or as ``ByUuid(uuid)``.  Thread-safe:
    the ioctls need no lock; only the lazy open is guarded.
    """

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self.path = path
        self._fd: Optional[int] = None
        self._lock = threading.Lock()
        self._version: Optional[tuple[int, int, int]] = None
        self._pid = _pid

    # -- plumbing -----------------------------------------------------------------------------

    def fileno(self) -> int:
        fd = self._fd
        if fd is not None and self._pid == _pid:
            return fd
        with self._lock:
            if self._fd is None or self._pid != _pid:
                self._fd, self._pid = self._open(), _pid
            return self._fd

    def _open(self) -> int:
        if not os.path.exists(self.path):
            check_device_mapper()  # never leave a control node on a host without dm
        try:
            made = nodes.ensure_node(self.path, stat.S_IFCHR, CONTROL_RDEV, 0o600)
        except PermissionError as exc:
            raise NotRootError("open", self.path, "device-mapper needs root", exc.errno) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if made:  # a node for a driver that is not there helps nobody
                os.unlink(self.path)
            if isinstance(exc, PermissionError):
                raise NotRootError("open", self.path, "device-mapper needs root (CAP_SYS_ADMIN)",
                                   exc.errno) from None
            if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT):
                raise KernelSupportError("open", self.path, "the kernel has no device-mapper: load "
                                         "it with `modprobe dm-mod` (CONFIG_BLK_DEV_DM)",
                                         exc.errno) from None
            raise DMFlakeyError("open", self.path, "cannot open the device-mapper control file",
                                exc.errno) from None
        try:
            buf = self._ioctl(fd, Command.VERSION, pack_request(), "version", None)
        except DMFlakeyError:
            os.close(fd)
            raise
        self._version = tuple(struct.unpack_from("=3I", buf))  # type: ignore[assignment]
        return fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == _pid:
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, command: Command, buf: bytearray, operation: str, device: Optional[str], *,
             dev: Optional[int] = None) -> bytearray:
        """The one place an ioctl is sent: send buf, raise the library's error on failure.

        dev (the device's number, when known): an error quotes the kernel log lines
        about this device and no other, and none once the number is another's.
        """
        return self._ioctl(self.fileno(), command, buf, operation, device, dev)

    def _ioctl(self, fd: int, command: Command, buf: bytearray, operation: str,
               device: Optional[str], dev: Optional[int] = None) -> bytearray:
        since = time.monotonic()
        try:
            result = fcntl.ioctl(fd, command.request, buf)
        except OSError as exc:
            raise _error(command, operation, device, exc.errno or 0,
                         lambda: self._log_about(buf, dev, since)) from None
        if result:  # e.g. DM_TARGET_MSG answers a positive value without errno
            raise DMFlakeyError(operation, device, f"DM_{command.name} answered {result} "
                                "(does the device have a live table?)")
        return buf

    def _log_about(self, request: bytearray, dev: Optional[int], since: float) -> list[str]:
        """Kernel log lines about the device of a failed request (found by its name or uuid).

        Only while that device still exists under the number dev (when known): a
        device gone meanwhile left its number to the next one made, whose words
        are not ours.
        """
        fields = HEADER.unpack_from(request)
        name, uuid = _cstr(fields[11]), _cstr(fields[12])
        try:
            found = self.info(ByUuid(uuid) if uuid else name).dev if (name or uuid) else None
        except DMFlakeyError:
            found = None
        if found is None or (dev is not None and found != dev):
            return []
        return kmsg.lines_about(os.major(found), os.minor(found), since)

    def call(self, command: Command, operation: str, device: DeviceRef, *, size: int = 0,
             payload: bytes = b"", **fields: object) -> Reply:
        """Pack and send; repeat with a doubled buffer while the kernel says BUFFER_FULL.

        device _GLOBAL is for the commands about no device (list devices, list targets).
        """
        name, uuid, label = _address(device, operation) if device is not _GLOBAL else NO_DEVICE
        size = size or BUFFER_START
        while True:
            buf = pack_request(name=name, uuid=uuid, payload=payload, size=size,
                               **fields)  # type: ignore[arg-type]
            reply = Reply(self.send(command, buf, operation, label))
            if not reply.flags & Flag.BUFFER_FULL:
                return reply
            if size >= BUFFER_MAX:
                raise DMFlakeyError(operation, label, f"the answer does not fit in {size} bytes",
                                    errno.ENOBUFS)
            size *= 2

    def prepare_swap(self, device: DeviceRef, targets: Iterable[TargetLike], *,
                     lockfs: bool = False, dev: Optional[int] = None) -> TableSwap:
        """A TableSwap for device: targets packed once, swapped in by each run()."""
        return TableSwap(self, device, targets, lockfs=lockfs, dev=dev)

    @staticmethod
    def udev_cookie() -> int:
        """event_nr flags for resume and remove: keep udev's disk rules off our devices."""
        flags = UDEV_PRIMARY_SOURCE | UDEV_DISABLE_DISK_RULES | UDEV_DISABLE_OTHER_RULES
        if not nodes.udev_manages_mapper():
            flags |= UDEV_DISABLE_DM_RULES | UDEV_DISABLE_SUBSYSTEM_RULES
        return flags

    # -- operations ---------------------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """The kernel's dm ioctl interface version, e.g. (4, 48, 0)."""
        self.fileno()
        assert self._version is not None
        return self._version

    def create(self, name: str, uuid: Optional[str] = None) -> DeviceInfo:
        """A new device with no table (it has a device number but no node yet)."""
        raw = check_name(name, "create")
        request = pack_request(name=raw, uuid=check_uuid(uuid, "create"))
        return self._info(Reply(self.send(Command.DEV_CREATE, request, "create", name)))

    def load(self, device: DeviceRef, targets: Iterable[TargetLike], *,
             read_only: bool = False) -> None:
        """Load a table into the inactive slot; it goes live at the next resume."""
        label = _address(device, "load table")[2]
        payload, count = pack_targets(targets, "load table", label)
        self.call(Command.TABLE_LOAD, "load table", device, payload=payload, target_count=count,
                  flags=Flag.READONLY if read_only else 0, size=HEADER.size + len(payload))

    def suspend(self, device: DeviceRef, *, lockfs: bool = True, flush: bool = True) -> None:
        """Suspend I/O; lockfs=False skips the filesystem freeze, flush=False sends NOFLUSH."""
        flags = Flag.SUSPEND | (0 if lockfs else Flag.SKIP_LOCKFS) | (0 if flush else Flag.NOFLUSH)
        self.call(Command.DEV_SUSPEND, "suspend", device, flags=flags, size=HEADER.size)

    def resume(self, device: DeviceRef) -> DeviceInfo:
        """Resume (swapping in a loaded table) and make sure /dev/mapper/<name> exists."""
        reply = self.call(Command.DEV_SUSPEND, "resume", device, event_nr=self.udev_cookie(),
                          size=HEADER.size)
        info = self._info(reply)
        self._ensure_device_node(info)
        return info

    def remove(self, device: DeviceRef, *, retries: int = 20, deferred: bool = False) -> bool:
        """Remove a device and its node, retrying EBUSY with a bounded backoff.

        The device is looked up first and then removed by its uuid, so that a
        device made under the same name meanwhile is never the one removed; the
        node goes only if it is this device's.  Returns False when deferred
        removal was scheduled because the device is still open (it disappears
        at its last close), True when it is gone.
        """
        info = self.info(device)
        target: DeviceRef = ByUuid(info.uuid, info.name) if info.uuid else info.name
        flags = Flag.DEFERRED_REMOVE if deferred else 0
        delay = 0.005
        retries = max(retries, 0)
        for attempt in range(retries + 1):
            try:
                reply = self.call(Command.DEV_REMOVE, "remove", target, flags=flags,
                                  event_nr=self.udev_cookie(), size=HEADER.size)
                break
            except DeviceBusyError:
                if attempt == retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        # a deferred removal keeps the device until its last close; its node can go now
        nodes.remove_node(info.path, info.dev)
        gone = not reply.flags & Flag.DEFERRED_REMOVE
        if gone and nodes.udev_manages_mapper():   # udev drops its link a moment later: wait
            nodes.wait_for_link_gone(info.path, UDEV_WAIT)
        return gone

    def clear(self, device: DeviceRef) -> None:
        """Drop the inactive (loaded but not resumed) table."""
        self.call(Command.TABLE_CLEAR, "clear table", device, size=HEADER.size)

    def info(self, device: DeviceRef) -> DeviceInfo:
        """DM_DEV_STATUS of a device."""
        return self._info(self.call(Command.DEV_STATUS, "info", device, size=HEADER.size))

    def table(self, device: DeviceRef, *, inactive: bool = False) -> list[Target]:
        """The live table (or the inactive one) as the kernel prints it."""
        flags = Flag.STATUS_TABLE | (Flag.QUERY_INACTIVE_TABLE if inactive else 0)
        return self._targets(self.call(Command.TABLE_STATUS, "table", device, flags=flags))

    def status(self, device: DeviceRef) -> list[Target]:
        """Each target's status line (dm-flakey's is empty)."""
        return self._targets(self.call(Command.TABLE_STATUS, "status", device))

    def list_devices(self) -> list[ListedDevice]:
        """Every dm device on the system, with uuids where the kernel reports them (>= 4.45)."""
        reply = self.call(Command.LIST_DEVICES, "list devices", _GLOBAL, flags=Flag.UUID)
        data, out, offset = reply.data(), [], 0
        if len(data) < NAME_LIST.size:
            return out
        while True:
            dev, nxt = NAME_LIST.unpack_from(data, offset)
            if dev == 0 and not out:
                return out
            name_raw = data[offset + NAME_LIST_NAME:].split(b"\0", 1)[0]
            uuid = None
            extra = _align8(offset + NAME_LIST_NAME + len(name_raw) + 1)
            if extra + 8 <= len(data) and (not nxt or extra + 8 <= offset + nxt):
                _event_nr, list_flags = U32X2.unpack_from(data, extra)
                if list_flags & 1:
                    uuid = _cstr(data[extra + 8:])
                elif list_flags & 2:
                    uuid = ""
            out.append(ListedDevice(name_raw.decode("utf-8", "surrogateescape"), os.major(dev),
                                    os.minor(dev), uuid))
            if not nxt:
                return out
            offset += nxt

    def target_versions(self) -> dict[str, tuple[int, int, int]]:
        """The target types registered now (loaded modules only) and their versions."""
        reply = self.call(Command.LIST_VERSIONS, "list targets", _GLOBAL)
        return self._versions(reply.data())

    def target_version(self, target_type: str) -> tuple[int, int, int]:
        """One target type's version; the kernel loads its module if needed (>= 4.41)."""
        if not isinstance(target_type, str) or not target_type or not target_type.isascii() \
                or len(target_type) > TYPE_MAX:
            raise InvalidArgumentError("target version", repr(target_type), "bad target type")
        try:
            reply = Reply(self.send(Command.GET_TARGET_VERSION,
                                    pack_request(name=target_type.encode(), size=BUFFER_START),
                                    "target version", target_type))
        except DMFlakeyError as exc:
            if exc.errno == errno.EINVAL:
                raise KernelSupportError("target version", target_type, f"the kernel has no "
                                         f"{target_type} target: load it with `modprobe "
                                         f"dm-{target_type}`", exc.errno) from None
            raise
        return self._versions(reply.data())[target_type]

    def message(self, device: DeviceRef, sector: int, text: str) -> Optional[str]:
        """Send a target message; returns the target's answer, if it gave one."""
        label = _address(device, "message")[2]
        if not isinstance(sector, int) or isinstance(sector, bool) or sector < 0:
            raise InvalidArgumentError("message", label, f"sector {sector!r} is not a sector number")
        if not isinstance(text, str) or not text or "\0" in text:
            raise InvalidArgumentError("message", label, f"bad message {text!r}")
        try:
            payload = U64.pack(sector) + text.encode() + b"\0"
        except (UnicodeEncodeError, struct.error):
            raise InvalidArgumentError("message", label, f"bad message {text!r} or sector "
                                       f"{sector!r}") from None
        reply = self.call(Command.TARGET_MSG, "message", device, payload=payload)
        if reply.flags & Flag.DATA_OUT:
            return _cstr(reply.data())
        return None

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _info(reply: Reply) -> DeviceInfo:
        flags = reply.flags
        return DeviceInfo(reply.name, reply.uuid, os.major(reply.dev), os.minor(reply.dev),
                          reply.open_count, reply.event_nr, bool(flags & Flag.SUSPEND),
                          bool(flags & Flag.ACTIVE_PRESENT), bool(flags & Flag.INACTIVE_PRESENT),
                          bool(flags & Flag.READONLY), reply.target_count,
                          bool(flags & Flag.DEFERRED_REMOVE))

    @staticmethod
    def _targets(reply: Reply) -> list[Target]:
        out, buf, first = [], reply.buffer, reply.data_start
        offset = first
        for _ in range(reply.target_count):
            start, length, _status, nxt, kind = TARGET_SPEC.unpack_from(buf, offset)
            params = _cstr(buf[offset + TARGET_SPEC.size:reply.data_size])
            out.append(Target(start, length, _cstr(kind), params))
            offset = first + nxt   # output 'next' counts from the first spec
        return out

    @staticmethod
    def _versions(data: bytes) -> dict[str, tuple[int, int, int]]:
        out, offset = {}, 0
        while offset + TARGET_VERSIONS.size <= len(data):
            nxt, major, minor, patch = TARGET_VERSIONS.unpack_from(data, offset)
            out[_cstr(data[offset + TARGET_VERSIONS.size:])] = (major, minor, patch)
            if not nxt:
                break
            offset += nxt
        return out

    @staticmethod
    def _ensure_device_node(info: DeviceInfo) -> None:
        if not info.live_table:
            return
        path = info.path
        if nodes.udev_manages_mapper() and nodes.wait_for_node(path, stat.S_IFBLK, info.dev,
                                                               UDEV_WAIT):
            return
        nodes.ensure_node(path, stat.S_IFBLK, info.dev, 0o600)


_default: Optional[Control] = None
_default_lock = threading.Lock()


def control() -> Control:
    """The shared Control the module-level functions use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Control()
    return _default


def version() -> tuple[int, int, int]:
    return control().version()


def create(name: str, uuid: Optional[str] = None) -> DeviceInfo:
    return control().create(name, uuid)


def load(device: DeviceRef, targets: Iterable[TargetLike], *, read_only: bool = False) -> None:
    control().load(device, targets, read_only=read_only)


def suspend(device: DeviceRef, *, lockfs: bool = True, flush: bool = True) -> None:
    control().suspend(device, lockfs=lockfs, flush=flush)


def resume(device: DeviceRef) -> DeviceInfo:
    return control().resume(device)


def remove(device: DeviceRef, *, retries: int = 20, deferred: bool = False) -> bool:
    return control().remove(device, retries=retries, deferred=deferred)


def clear(device: DeviceRef) -> None:
    control().clear(device)


def info(device: DeviceRef) -> DeviceInfo:
    return control().info(device)


def table(device: DeviceRef, *, inactive: bool = False) -> list[Target]:
    return control().table(device, inactive=inactive)


def status(device: DeviceRef) -> list[Target]:
    return control().status(device)


def list_devices() -> list[ListedDevice]:
    return control().list_devices()


def target_versions() -> dict[str, tuple[int, int, int]]:
    return control().target_versions()


def target_version(target_type: str) -> tuple[int, int, int]:
    return control().target_version(target_type)


def message(device: DeviceRef, sector: int, text: str) -> Optional[str]:
    return control().message(device, sector, text)


for _function in (version, create, load, suspend, resume, remove, clear, info, table, status,
                  list_devices, target_versions, target_version, message):
    _function.__doc__ = getattr(Control, _function.__name__).__doc__
del _function
