"""Flakey devices: go-dmflakey's API, every dm-flakey fault mode, one teardown.

``init_flakey`` turns a new sparse image into ``/dev/mapper/<name>``: mkfs,
loop attach, a flakey table that lets everything through.  Each fault method
swaps the table (suspend, load, resume) and never leaves the device
suspended.  Devices carry a uuid that says who made them and whether the
image is theirs, so that a later process (the CLI, ``cleanup_stale``) can find
and remove them from what the kernel reports, without any state file.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Union

from . import features, fs
from .kernel import dm, loop, mountinfo
from .kernel.dm import check_device_mapper
from .errors import (DeviceExistsError, DeviceNotFoundError, DMFlakeyError, InvalidArgumentError,
                     InvalidNameError)
from .fs import FSType
from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable, PROBABILITY_MAX

__all__ = [
    "Flakey", "init_flakey", "init_flakey_image", "attach_flakey", "open_flakey", "cleanup_stale",
    "list_flakey", "check_device_mapper", "DEFAULT_IMAGE_SIZE", "DEFAULT_INTERVAL", "UUID_PREFIX",
    "Owner",
]

DEFAULT_IMAGE_SIZE = 10 << 30
"""10 GiB, sparse, as in go-dmflakey."""
DEFAULT_INTERVAL = 120
"""Seconds; go-dmflakey's default interval."""
UUID_PREFIX = "DMFLAKEY-"
# what the library owns besides the dm device
KIND_IMAGE = "img"    # an image file it created, attached to a loop device: both are removed
KIND_DEVICE = "dev"   # a block device the caller gave: left alone

if TYPE_CHECKING:
    from datetime import timedelta
Interval = Union[int, "timedelta"]


@dataclass(frozen=True)
class Owner:
    """Who made a device, decoded from its uuid ``DMFLAKEY-<pid>.<start>-<kind>-<nonce>``.

    pid 0 means no owning process (made by the CLI): such a device is never stale.
    """

    pid: int
    start_time: int
    kind: str

    @classmethod
    def current(cls, kind: str, persistent: bool = False) -> "Owner":
        if persistent:
            return cls(0, 0, kind)
        return cls(os.getpid(), _start_time(os.getpid()) or 0, kind)

    def uuid(self) -> str:
        return f"{UUID_PREFIX}{self.pid}.{self.start_time}-{self.kind}-{os.urandom(6).hex()}"

    @classmethod
    def from_uuid(cls, uuid: Optional[str]) -> Optional["Owner"]:
        if not uuid or not uuid.startswith(UUID_PREFIX):
            return None
        try:
            who, kind, _nonce = uuid[len(UUID_PREFIX):].split("-")
            pid, start = who.split(".")
            return cls(int(pid), int(start), kind)
        except ValueError:
            return None

    def alive(self) -> bool:
        """True while the owning process runs (or for persistent devices)."""
        if self.pid == 0:
            return True
        return _start_time(self.pid) == self.start_time


def _start_time(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return int(data.rsplit(b")", 1)[1].split()[19])


def _seconds(value: Interval, what: str, operation: str, device: str) -> int:
    # datetime is not imported for this check: a timedelta exists only once it has been
    timedelta = getattr(sys.modules.get("datetime"), "timedelta", None)
    if timedelta is not None and isinstance(value, timedelta):
        seconds = value.total_seconds()
        if seconds != int(seconds):
            raise InvalidArgumentError(operation, device, f"{what} {value} is not a whole number "
                                       "of seconds")
        value = int(seconds)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(operation, device, f"{what} must be a whole number of seconds "
                                   f">= 0 (an int or a timedelta), got {value!r}")
    return value


def _probability(value: float, operation: str, device: str) -> int:
    """A probability 0.0..1.0 as the kernel's integer out of PROBABILITY_MAX (0 stays 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(operation, device, f"probability must be a number from 0.0 to "
                                   f"1.0, got {value!r}")
    if value == 0:
        return 0
    return max(1, round(value * PROBABILITY_MAX))


class Flakey:
    """A dm-flakey device over a loop-attached image (or a given block device).

    Made by :func:`init_flakey`, :func:`attach_flakey` or :func:`open_flakey`.
    ``teardown()`` removes the device, its node, the loop device and (for an
    image the library made) the image; it is also what leaving a ``with`` does.
    """

    def __init__(self, name: str, backing: str, sectors: int, *, owner: Owner,
                 loop_device: Optional[str] = None, image_path: Optional[str] = None,
                 filesystem: Optional[FSType] = None) -> None:
        self.name = name
        self.device_path = f"{dm.MAPPER_DIR}/{name}"
        self.backing = backing          # "major:minor" of what the table maps
        self.sectors = sectors
        self.owner = owner
        self.loop_device = loop_device
        self.image_path = image_path
        self.filesystem = filesystem
        self._torn_down = False
        ctl = self._control = dm.control()
        # A resume that finds a loaded table suspends the device itself (freezing the
        # filesystem unless SKIP_LOCKFS), swaps the tables and resumes: one ioctl fewer
        # than suspend + load + resume, and no separate suspend, which the kernel often
        # holds up for a grace period of the resume before it.
        self._resume = ctl.prepare(dm.Command.DEV_SUSPEND, "resume", name, flags=dm.Flag.SKIP_LOCKFS,
                                   event_nr=ctl.udev_cookie())
        self._resume_lockfs = ctl.prepare(dm.Command.DEV_SUSPEND, "resume", name,
                                          event_nr=ctl.udev_cookie())
        self._loads: dict[FlakeyTable, dm.PreparedCall] = {}
        self._swaps: dict[int, tuple] = {}
        self._tables: dict[tuple, FlakeyTable] = {}

    def __repr__(self) -> str:
        return (f"Flakey(name={self.name!r}, device_path={self.device_path!r}, "
                f"loop_device={self.loop_device!r}, image_path={self.image_path!r}, "
                f"filesystem={self.filesystem and self.filesystem.value!r})")

    def __enter__(self) -> "Flakey":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # -- fault switches ---------------------------------------------------------------------

    def allow_writes(self, *, interval: Interval = DEFAULT_INTERVAL, sync_fs: bool = False) -> None:
        """Let all I/O through (the up interval is ``interval`` seconds, the down interval 0)."""
        table = self._tables.get(("allow_writes", interval)) if type(interval) is int else None
        if table is None:
            table = self._table(_seconds(interval, "interval", "allow_writes", self.name), 0)
            if type(interval) is int:
                self._tables[("allow_writes", interval)] = table
        self.load_table(table, sync_fs=sync_fs)

    def drop_writes(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                    sync_fs: bool = False) -> None:
        """Acknowledge writes and throw them away; reads pass through."""
        table = self._tables.get(("drop_writes", interval, up_interval)) \
            if type(interval) is int and type(up_interval) is int else None
        if table is None:
            table = self._checked("drop_writes", interval, up_interval, drop_writes=True)
        self.load_table(table, sync_fs=sync_fs)

    def error_writes(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                     sync_fs: bool = False) -> None:
        """Fail writes with EIO; reads pass through."""
        table = self._tables.get(("error_writes", interval, up_interval)) \
            if type(interval) is int and type(up_interval) is int else None
        if table is None:
            table = self._checked("error_writes", interval, up_interval, error_writes=True)
        self.load_table(table, sync_fs=sync_fs)

    def error_reads(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                    sync_fs: bool = False) -> None:
        """Fail reads with EIO; writes pass through (Linux 6.4 and later)."""
        self._fault("error_reads", interval, up_interval, sync_fs, error_reads=True)

    def corrupt_bio_byte(self, nth_byte: int, direction: Union[Direction, str], value: int,
                         flags: int = 0, *, interval: Interval = DEFAULT_INTERVAL,
                         up_interval: Interval = 0, sync_fs: bool = False) -> None:
        """Replace the nth byte (1-based) of each matching bio with value.

        direction "r" corrupts data as it is read (the bytes on disk stay
        intact; kernels before mid-2025 stable fixes ignored "r"); "w" stores
        the corrupted byte.
        """
        spec = CorruptBIOByte(nth_byte, direction, value, flags)  # type: ignore[arg-type]
        self._fault("corrupt_bio_byte", interval, up_interval, sync_fs, corrupt_bio_byte=spec)

    def random_read_corrupt(self, probability: float, *, interval: Interval = DEFAULT_INTERVAL,
                            up_interval: Interval = 0, sync_fs: bool = False) -> None:
        """Corrupt one random byte of a read bio with this probability (0.0 to 1.0; Linux 6.5+)."""
        p = _probability(probability, "random_read_corrupt", self.name)
        if p == 0:  # the kernel would fail all I/O for a 0 here: a 0 means pass-through
            self._fault_free("random_read_corrupt", interval, up_interval, sync_fs)
            return
        self._fault("random_read_corrupt", interval, up_interval, sync_fs, random_read_corrupt=p)

    def random_write_corrupt(self, probability: float, *, interval: Interval = DEFAULT_INTERVAL,
                             up_interval: Interval = 0, sync_fs: bool = False) -> None:
        """Corrupt one random byte of a write bio with this probability (0.0 to 1.0; Linux 6.5+)."""
        p = _probability(probability, "random_write_corrupt", self.name)
        if p == 0:
            self._fault_free("random_write_corrupt", interval, up_interval, sync_fs)
            return
        self._fault("random_write_corrupt", interval, up_interval, sync_fs, random_write_corrupt=p)

    def _fault(self, operation: str, interval: Interval, up_interval: Interval, sync_fs: bool,
               **feature: object) -> None:
        self.load_table(self._checked(operation, interval, up_interval, **feature), sync_fs=sync_fs)

    def _checked(self, operation: str, interval: Interval, up_interval: Interval,
                 **feature: object) -> FlakeyTable:
        """The table of a fault switch, its arguments checked.

        With plain ints for the intervals it is also kept under (operation, interval,
        up_interval), where the commonest switches look it up before anything else: in
        the emulated test guest every line run between two switches shows.
        """
        down = _seconds(interval, "interval", operation, self.name)
        up = _seconds(up_interval, "up_interval", operation, self.name)
        table = self._table(up, down, **feature)
        if type(interval) is int and type(up_interval) is int:
            self._tables[(operation, interval, up_interval)] = table
        return table

    def _fault_free(self, operation: str, interval: Interval, up_interval: Interval,
                    sync_fs: bool) -> None:
        _seconds(interval, "interval", operation, self.name)
        up = _seconds(up_interval, "up_interval", operation, self.name)
        self.load_table(self._table(max(up, 1), 0), sync_fs=sync_fs)

    def _table(self, up: int, down: int, **feature: object) -> FlakeyTable:
        """FlakeyTable(backing, up, down, **feature), built (and checked) once per device.

        Checking a table costs more than the rest of a switch; the arguments here are
        already plain ints, bools and CorruptBIOByte values, so equal keys mean equal tables.
        """
        key = (up, down, *feature.items())
        table = self._tables.get(key)
        if table is None:
            table = FlakeyTable(self.backing, up, down, **feature)  # type: ignore[arg-type]
            # only once the arguments are known good: probing a feature takes ioctls of its own;
            # and before caching, so that a missing feature is reported on every call
            for name in feature:  # features older than any kernel met are not probed: no cost
                features.require(name, self.name)
            if len(self._tables) >= 32:
                self._tables.clear()
            self._tables[key] = table
        return table

    def load_table(self, table: FlakeyTable, *, sync_fs: bool = False) -> None:
        """Swap in table: load it, then resume, which suspends (freezing the filesystem
        only with sync_fs), swaps and resumes in one ioctl.

        A load the kernel refuses changes nothing: the device was never suspended.
        When the swap fails, the loaded table is dropped and the device resumed with
        its old table; the error is raised afterwards.
        """
        # by identity: the switches pass the same cached table objects every time
        entry = self._swaps.get(id(table))
        if entry is None or entry[0] is not table:
            entry = self._prepare_swaps(table)
        entry[2 if sync_fs else 1]()

    def _prepare_swaps(self, table: FlakeyTable) -> tuple:
        """(table, swap, swap with lockfs): functions that load table and resume."""
        load = self._loads.get(table)
        if load is None:
            payload, count = dm.pack_targets([(0, self.sectors, "flakey", table.params())],
                                             "load table", self.name)
            load = self._control.prepare(dm.Command.TABLE_LOAD, "load table", self.name,
                                         payload=payload, target_count=count)
        if len(self._swaps) >= 32 or len(self._loads) >= 32:
            self._loads.clear()
            self._swaps.clear()
        self._loads[table] = load
        entry = (table, load.chain(self._resume, self._undo_swap),  # the entry keeps the id taken
                 load.chain(self._resume_lockfs, self._undo_swap))
        self._swaps[id(table)] = entry
        return entry

    def _undo_swap(self) -> None:
        """After a failed swap: drop the loaded table, make sure the old one runs."""
        try:
            self._control.clear(self.name)
        except DMFlakeyError:
            pass  # nothing left to drop
        self._resume_anyway()

    def _resume_anyway(self) -> None:
        """Resume whatever table is live, with one retry: the device must not stay suspended."""
        try:
            self._resume.send()
        except DMFlakeyError:
            time.sleep(0.05)
            self._resume.send()

    def table(self) -> FlakeyTable:
        """The live table, read back from the kernel."""
        targets = self._control.table(self.name)
        if len(targets) != 1 or targets[0].target_type != "flakey":
            raise DMFlakeyError("table", self.name, f"not a single flakey target: {targets!r}")
        return FlakeyTable.parse(targets[0].params)

    # -- filesystem helpers -----------------------------------------------------------------

    def mount(self, target: str, options: str = "") -> None:
        """Mount this device's filesystem on target."""
        fs.mount(self.device_path, target, self.filesystem, options)

    def power_failure(self, mount_point: str, options: str = "") -> None:
        """Simulate a power cut: drop writes, unmount, allow writes, mount again.

        What was not synced before the call is lost, as after a real power cut.
        """
        self.drop_writes()
        try:
            fs.umount(mount_point)
        finally:
            self.allow_writes()
        fs.mount(self.device_path, mount_point, self.filesystem, options)

    # -- teardown ---------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything this device consists of; safe to call twice.

        Mounts of the device that are still there are unmounted first.  A busy
        device (open elsewhere) raises DeviceBusyError after bounded retries
        and nothing is lost: call teardown again once the holder has closed it.
        """
        if self._torn_down:
            return
        _remove(self.name, self.owner, self.loop_device, self.image_path)
        self._torn_down = True


def _mounts_of(name: str) -> List[str]:
    """Mount points of the dm device name, innermost last."""
    try:
        info = dm.info(name)
    except DeviceNotFoundError:
        return []
    return mountinfo.mount_points_of(info.dev)


def _remove(name: str, owner: Owner, loop_device: Optional[str], image_path: Optional[str]) -> None:
    """Unmount, remove the dm device and its node, detach the loop, delete an owned image."""
    for point in reversed(_mounts_of(name)):
        fs.umount(point)
    try:
        dm.remove(name)
    except DeviceNotFoundError:
        pass  # already gone (removed by hand or by another cleanup): the rest still applies
    if owner.kind == KIND_IMAGE:
        if loop_device:
            loop.detach(loop_device, _backing=image_path)
        if image_path:
            try:
                os.unlink(image_path)
            except FileNotFoundError:
                pass


def _block_size(path: str, operation: str, name: str) -> tuple[str, int]:
    """("major:minor", sectors) of the block device at path."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DMFlakeyError(operation, name, f"cannot stat {path}", exc.errno) from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgumentError(operation, name, f"{path} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", loop.device_size(path) // 512


def _create_device(name: str, backing: str, sectors: int, owner: Owner, undo: ExitStack,
                   interval: int = DEFAULT_INTERVAL) -> None:
    dm.create(name, uuid=owner.uuid())
    undo.callback(dm.remove, name)
    table = FlakeyTable(backing, interval, 0)
    dm.load(name, [(0, sectors, "flakey", table.params())])
    dm.resume(name)


def init_flakey(name: str, data_dir: str, fs_type: Optional[Union[FSType, str]] = FSType.EXT4,
                mkfs_options: Union[Sequence[str], str, None] = None,
                size: int = DEFAULT_IMAGE_SIZE, *, persistent: bool = False) -> Flakey:
    """Create ``<data_dir>/<name>.img`` (sparse), mkfs it, attach it and map it as a flakey device.

    The device lets all I/O through until a fault is switched on.  fs_type None
    skips mkfs.  Any failure undoes every step done so far.  persistent=True
    marks the device as owned by no process (the CLI), so cleanup_stale leaves it.
    """
    return init_flakey_image(name, os.path.join(data_dir, f"{name}.img"), fs_type, mkfs_options,
                             size, persistent=persistent)


def init_flakey_image(name: str, image_path: str,
                      fs_type: Optional[Union[FSType, str]] = FSType.EXT4,
                      mkfs_options: Union[Sequence[str], str, None] = None,
                      size: int = DEFAULT_IMAGE_SIZE, *, persistent: bool = False) -> Flakey:
    """init_flakey with the image file at image_path, for callers (the CLI) that choose it.

    The image must not exist yet: it is created, never overwritten, and
    teardown deletes it like any image the library made.
    """
    dm.check_name(name, "init_flakey")
    fs_kind = None if fs_type is None else fs._fs_type(fs_type, "init_flakey", name)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
        raise InvalidArgumentError("init_flakey", name, f"size must be a positive multiple of 512 "
                                   f"bytes, got {size!r}")
    if fs_kind is not None and size < fs.MIN_SIZE[fs_kind]:
        raise InvalidArgumentError("init_flakey", name, f"{fs_kind.value} needs at least "
                                   f"{fs.MIN_SIZE[fs_kind]} bytes, got {size}")
    if name in {d.name for d in dm.list_devices()}:
        raise DeviceExistsError("init_flakey", name, "a dm device with this name already exists",
                                errno.EEXIST)
    image = os.path.realpath(image_path)
    owner = Owner.current(KIND_IMAGE, persistent)
    with ExitStack() as undo:
        try:
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise DeviceExistsError("init_flakey", name, f"{image} already exists; not overwriting "
                                    "it", errno.EEXIST) from None
        except OSError as exc:
            raise DMFlakeyError("init_flakey", name, f"cannot create {image}", exc.errno) from None
        undo.callback(os.unlink, image)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        if fs_kind is not None:
            fs.mkfs(image, fs_kind, mkfs_options)
        dev = loop.attach(image)
        undo.callback(dev.detach)
        _create_device(name, dev.major_minor, dev.size // 512, owner, undo)
        undo.pop_all()
    return Flakey(name, dev.major_minor, dev.size // 512, owner=owner, loop_device=dev.path,
                  image_path=image, filesystem=fs_kind)


def attach_flakey(name: str, device: str, *, persistent: bool = False) -> Flakey:
    """Map an existing block device as a flakey device; teardown leaves the device itself alone."""
    dm.check_name(name, "attach_flakey")
    backing, sectors = _block_size(device, "attach_flakey", name)
    owner = Owner.current(KIND_DEVICE, persistent)
    with ExitStack() as undo:
        _create_device(name, backing, sectors, owner, undo)
        detected = fs.detect_fs(device)
        undo.pop_all()
    return Flakey(name, backing, sectors, owner=owner, filesystem=detected)


def open_flakey(name: str) -> Flakey:
    """A Flakey for a device this library made earlier, read back from the kernel alone."""
    info = dm.info(name)
    owner = Owner.from_uuid(info.uuid)
    if owner is None:
        raise InvalidNameError("open_flakey", name, f"not a device made by dmflakey-ioctl (uuid "
                               f"{info.uuid!r})")
    targets = dm.table(name)
    if len(targets) != 1 or targets[0].target_type != "flakey":
        raise DMFlakeyError("open_flakey", name, f"not a single flakey target: {targets!r}")
    backing = FlakeyTable.parse(targets[0].params).device
    loop_path = image = None
    if owner.kind == KIND_IMAGE:
        number = int(backing.split(":")[1])
        loop_path = f"/dev/loop{number}"
        image = loop._backing_file(number)
    filesystem = None
    if not info.suspended:  # a read of a suspended device would block until someone resumes it
        try:
            filesystem = fs.detect_fs(f"{dm.MAPPER_DIR}/{name}")
        except DMFlakeyError:
            pass  # a device failing reads right now: its type is unknown, not an error
    return Flakey(name, backing, targets[0].length, owner=owner, loop_device=loop_path,
                  image_path=image, filesystem=filesystem)


def list_flakey() -> List[dm.ListedDevice]:
    """The dm devices this library made (by uuid prefix)."""
    out = []
    for dev in dm.list_devices():
        uuid = dev.uuid if dev.uuid is not None else dm.info(dev.name).uuid
        if uuid.startswith(UUID_PREFIX) and Owner.from_uuid(uuid) is not None:
            out.append(dm.ListedDevice(dev.name, dev.major, dev.minor, uuid))
    return out


def cleanup_stale(*, include_persistent: bool = False,
                  on_error: Optional[Callable[[DMFlakeyError], None]] = None) -> List[str]:
    """Remove what crashed runs left: devices of ours whose owning process is gone.

    With include_persistent, CLI-made devices go too.  Devices that other
    tools made are never touched.  Returns the names removed; a device that
    cannot be removed raises, unless on_error is given, which is then called.
    """
    removed = []
    for dev in list_flakey():
        owner = Owner.from_uuid(dev.uuid)
        assert owner is not None
        if owner.alive() and not (include_persistent and owner.pid == 0):
            continue
        try:
            try:
                victim = open_flakey(dev.name)
            except DeviceNotFoundError:
                continue
            except DMFlakeyError:  # crashed before its table was loaded: only the device exists
                _remove(dev.name, Owner(owner.pid, owner.start_time, KIND_DEVICE), None, None)
            else:
                victim.teardown()
        except DeviceNotFoundError:
            continue
        except DMFlakeyError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        removed.append(dev.name)
    return removed
