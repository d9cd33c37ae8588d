"""Flakey devices: go-dmflakey's API, every dm-flakey fault, latency, scopes, one teardown.

``init_flakey`` turns a new sparse image into ``/dev/mapper/<name>``: mkfs,
loop attach, a flakey table that lets everything through.  Each fault switch
swaps the table in (load, then a resume that suspends, swaps and resumes)
and never leaves the device suspended.

Every switch goes through one path: its arguments (with a scope resolved to
sector ranges) form a key, and a per-device cache maps the key to a prepared
:class:`~dmflakey_ioctl.kernel.dm.TableSwap`, built once.  A scoped fault is a
multi-segment table: the fault over the scope's ranges and ``linear``
pass-through elsewhere (see tables/segments.py).

A ``Flakey`` addresses its device by uuid, never by name, and remembers the
device numbers and the image's inode: a handle whose device was removed and
made again under the same name refuses to touch the newcomer.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from contextlib import ExitStack, contextmanager
from typing import (TYPE_CHECKING, Dict, Hashable, Iterator, List, Optional, Sequence,
                    Tuple, Union)

from . import cleanup, features, fs
from .cleanup import OwnedDevice, cleanup_stale
from .errors import (DeviceNotFoundError, DMFlakeyError, InvalidArgumentError,
                     InvalidNameError)
from .fs import FSType
from .images import (BackingImage, attach_image, backing_of, check_image_size, create_image,
                     delete_image)
from .kernel import blockdev, dm, mountinfo
from .kernel.dm import check_device_mapper
from .ownership import Kind, Owner
from .tables.delay import DelayTable
from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable, PROBABILITY_MAX
from .tables.linear import LinearTable
from .tables.segments import DeviceTable, Range, TargetTable, merge_ranges, subtract_ranges

__all__ = [
    "Flakey", "init_flakey", "init_flakey_image", "attach_flakey", "open_flakey", "cleanup_stale",
    "list_flakey", "check_device_mapper", "DEFAULT_IMAGE_SIZE", "DEFAULT_INTERVAL", "Scope",
]

DEFAULT_IMAGE_SIZE = 10 << 30
"""10 GiB, sparse, as in go-dmflakey."""
DEFAULT_INTERVAL = 120
"""Seconds; go-dmflakey's default interval."""
FLAKEY_KINDS = (Kind.FLAKEY_IMAGE, Kind.FLAKEY_DEVICE)

if TYPE_CHECKING:
    from datetime import timedelta
Interval = Union[int, "timedelta"]
PathLike = Union[str, "os.PathLike[str]"]
Scope = Union[PathLike, Sequence[Union[PathLike, Range]]]
"""A file on the device, or a list of files and ``(start_sector, nr_sectors)`` ranges."""
_SWAP_CACHE = 64   # prepared switches kept per device


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


def _milliseconds(value: int, what: str, operation: str, device: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InvalidArgumentError(operation, device, f"{what} must be a whole number of "
                                   f"milliseconds from 0 to {2**32 - 1}, got {value!r}")
    return value


class Flakey:
    """A dm-flakey device over a loop-attached image (or a given block device).

    Made by :func:`init_flakey`, :func:`attach_flakey` or :func:`open_flakey`.
    ``teardown()`` removes the device, its node, the loop device and (for an
    image the library made) the image; it is also what leaving a ``with`` does.
    """

    def __init__(self, name: str, uuid: str, dev: int, backing: str, sectors: int, *,
                 owner: Owner, image: Optional[BackingImage] = None,
                 filesystem: Optional[FSType] = None) -> None:
        self.name = name
        self.uuid = uuid
        self.dev = dev                  # the dm device's number
        self.device_path = f"{dm.MAPPER_DIR}/{name}"
        self.backing = backing          # "major:minor" of what the table maps
        self.sectors = sectors
        self.owner = owner
        self.image = image
        self.filesystem = filesystem
        self._control = dm.control()
        self._swaps: Dict[Hashable, dm.TableSwap] = {}
        self._device_removed = False
        self._torn_down = False

    @property
    def loop_device(self) -> Optional[str]:
        return self.image.loop_path if self.image else None

    @property
    def image_path(self) -> Optional[str]:
        return self.image.path if self.image else None

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
        """Let all I/O through on the whole device (``interval`` is dm-flakey's up interval)."""
        self._switch("allow_writes", (interval,), None, None, sync_fs)

    def drop_writes(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                    sync_fs: bool = False, scope: Optional[Scope] = None,
                    exclude: Optional[Scope] = None) -> None:
        """Acknowledge writes and throw them away; reads pass through."""
        self._switch("drop_writes", (interval, up_interval), scope, exclude, sync_fs)

    def error_writes(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                     sync_fs: bool = False, scope: Optional[Scope] = None,
                     exclude: Optional[Scope] = None) -> None:
        """Fail writes with EIO; reads pass through."""
        self._switch("error_writes", (interval, up_interval), scope, exclude, sync_fs)

    def error_reads(self, *, interval: Interval = DEFAULT_INTERVAL, up_interval: Interval = 0,
                    sync_fs: bool = False, scope: Optional[Scope] = None,
                    exclude: Optional[Scope] = None) -> None:
        """Fail reads with EIO; writes pass through (Linux 6.4 and later)."""
        self._switch("error_reads", (interval, up_interval), scope, exclude, sync_fs)

    def corrupt_bio_byte(self, nth_byte: int, direction: Union[Direction, str], value: int,
                         flags: int = 0, *, interval: Interval = DEFAULT_INTERVAL,
                         up_interval: Interval = 0, sync_fs: bool = False,
                         scope: Optional[Scope] = None, exclude: Optional[Scope] = None) -> None:
        """Replace the nth byte (1-based) of each matching bio with value.

        direction "r" corrupts data as it is read (the bytes on disk stay
        intact; kernels without a 2025 fix ignore it, which is refused here);
        "w" stores the corrupted byte.
        """
        self._switch("corrupt_bio_byte", (nth_byte, direction, value, flags, interval, up_interval),
                     scope, exclude, sync_fs)

    def random_read_corrupt(self, probability: float, *, interval: Interval = DEFAULT_INTERVAL,
                            up_interval: Interval = 0, sync_fs: bool = False,
                            scope: Optional[Scope] = None, exclude: Optional[Scope] = None) -> None:
        """Corrupt one random byte of a read bio with this probability (0.0 to 1.0; Linux 6.5+)."""
        self._switch("random_read_corrupt", (probability, interval, up_interval), scope, exclude,
                     sync_fs)

    def random_write_corrupt(self, probability: float, *, interval: Interval = DEFAULT_INTERVAL,
                             up_interval: Interval = 0, sync_fs: bool = False,
                             scope: Optional[Scope] = None,
                             exclude: Optional[Scope] = None) -> None:
        """Corrupt one random byte of a write bio with this probability (0.0 to 1.0; Linux 6.5+)."""
        self._switch("random_write_corrupt", (probability, interval, up_interval), scope, exclude,
                     sync_fs)

    def delay(self, read_ms: int = 0, write_ms: int = 0, flush_ms: int = 0, *,
              sync_fs: bool = False, scope: Optional[Scope] = None,
              exclude: Optional[Scope] = None) -> None:
        """Hold reads, writes and flushes back by these many milliseconds (the ``delay`` target).

        Undone by ``allow_writes()`` like any fault.  A flush delay different
        from the write delay needs the kernel's separate flush class.
        """
        self._switch("delay", (read_ms, write_ms, flush_ms), scope, exclude, sync_fs)

    def load_table(self, table: Union[FlakeyTable, DeviceTable], *, sync_fs: bool = False) -> None:
        """Swap in a table of your own: one flakey target over the device, or a DeviceTable."""
        self._switch("load_table", (table,), None, None, sync_fs)

    @contextmanager
    def faulted(self, fault: str, *args: object, **kwargs: object) -> Iterator["Flakey"]:
        """A fault for the duration of a ``with`` block; pass-through again on exit, also on error.

        ``with dev.faulted("error_reads", scope=path):`` calls ``dev.error_reads(scope=path)``
        and ``dev.allow_writes()`` at the end.
        """
        switch = getattr(self, fault, None) if fault in _FAULTS else None
        if switch is None:
            raise InvalidArgumentError("faulted", self.name, f"unknown fault {fault!r} (known: "
                                       f"{', '.join(sorted(_FAULTS))})")
        switch(*args, **kwargs)
        try:
            yield self
        finally:
            self.allow_writes()

    def _switch(self, operation: str, args: tuple, scope: Optional[Scope],
                exclude: Optional[Scope], sync_fs: bool) -> None:
        """The one switch path: the arguments are the key of a prepared swap, built once."""
        key = (operation, args, self._ranges(operation, scope, exclude), sync_fs)
        try:
            swap = self._swaps[key]
        except (KeyError, TypeError):   # new, or unhashable (refused while preparing)
            swap = self._prepare(key)
        try:
            swap.run()
        except DeviceNotFoundError:
            raise self._gone(operation) from None

    def _prepare(self, key: tuple) -> dm.TableSwap:
        """Check a switch's arguments, build its table, probe the features it needs, pack it."""
        operation, args, ranges, sync_fs = key
        if not isinstance(sync_fs, bool):
            raise InvalidArgumentError(operation, self.name, f"sync_fs must be a bool, got "
                                       f"{sync_fs!r}")
        table = self._device_table(operation, args, ranges)
        for feature in features.needed(table.fault):
            features.require(feature, self.name)
        swap = self._control.prepare_swap(dm.ByUuid(self.uuid, self.name), table.targets(), lockfs=sync_fs,
                                          dev=self.dev)
        try:
            if len(self._swaps) >= _SWAP_CACHE:
                self._swaps.clear()
            self._swaps[key] = swap
        except TypeError:
            pass  # an unhashable argument that still made a valid table (e.g. a list interval)
        return swap

    def _device_table(self, operation: str, args: tuple,
                      ranges: Optional[Tuple[Range, ...]]) -> DeviceTable:
        if operation == "load_table":
            table = args[0]
            if isinstance(table, DeviceTable):
                return table
            if not isinstance(table, FlakeyTable):
                raise InvalidArgumentError(operation, self.name, f"expected a FlakeyTable or a "
                                           f"DeviceTable, got {table!r}")
            return DeviceTable.whole(self.sectors, table)
        fault = self._fault_table(operation, args)
        if ranges is None:
            return DeviceTable.whole(self.sectors, fault)
        return DeviceTable.scoped(self.sectors, ranges, fault,
                                  lambda offset: LinearTable(self.backing, offset))

    def _fault_table(self, operation: str, args: tuple) -> TargetTable:
        """The table of one fault switch, its arguments checked (InvalidArgumentError)."""
        name = self.name
        if operation == "delay":
            read, write, flush = (_milliseconds(v, f"{what}_ms", operation, name)
                                  for v, what in zip(args, ("read", "write", "flush")))
            return DelayTable(self.backing, 0, read, write, flush)
        if operation == "allow_writes":
            return FlakeyTable(self.backing, _seconds(args[0], "interval", operation, name), 0)
        *values, interval, up_interval = args
        down = _seconds(interval, "interval", operation, name)
        up = _seconds(up_interval, "up_interval", operation, name)
        if operation == "corrupt_bio_byte":
            spec = CorruptBIOByte(*values)  # type: ignore[arg-type]
            return FlakeyTable(self.backing, up, down, corrupt_bio_byte=spec)
        if operation in ("random_read_corrupt", "random_write_corrupt"):
            p = _probability(values[0], operation, name)  # type: ignore[arg-type]
            if p == 0:  # the kernel would fail all I/O for a 0 here: a 0 means pass-through
                return FlakeyTable(self.backing, max(up, 1), 0)
            return FlakeyTable(self.backing, up, down, **{operation: p})
        return FlakeyTable(self.backing, up, down, **{operation: True})

    def _ranges(self, operation: str, scope: Optional[Scope],
                exclude: Optional[Scope]) -> Optional[Tuple[Range, ...]]:
        """The sectors a scoped fault covers (merged), or None for the whole device."""
        if scope is None and exclude is None:
            return None
        try:
            covered = self._resolve(scope) if scope is not None else ((0, self.sectors),)
            if exclude is not None:
                covered = subtract_ranges(covered, self._resolve(exclude))
        except DMFlakeyError as exc:  # a file that cannot be mapped, a range off the device
            raise exc.reframed(operation, self.name) from None
        if not covered:
            raise InvalidArgumentError(operation, self.name, "the scope holds no sectors (every "
                                       "one of them is excluded, or the files have no data blocks)")
        return covered

    def _resolve(self, scope: Scope) -> Tuple[Range, ...]:
        """Files and ranges as merged sector ranges on this device."""
        items = [scope] if isinstance(scope, (str, os.PathLike)) else scope
        ranges: List[object] = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                ranges.extend(self._file_ranges(os.fspath(item)))
            else:
                ranges.append(item)
        return merge_ranges(ranges, self.sectors)

    def _file_ranges(self, path: str) -> List[Range]:
        from .kernel import fiemap
        holder = fiemap.file_device(path)
        if holder != self.dev:
            raise InvalidArgumentError("scope", path, f"the file is on device "
                                       f"{os.major(holder)}:{os.minor(holder)}, not on {self.name} "
                                       f"({os.major(self.dev)}:{os.minor(self.dev)})")
        return fiemap.file_extents(path)

    def _gone(self, operation: str) -> DeviceNotFoundError:
        """The error for a switch whose device no longer exists under our uuid."""
        try:
            other = dm.info(self.name).uuid
        except DeviceNotFoundError:
            return DeviceNotFoundError(operation, self.name, f"the device is gone (no device has "
                                       f"uuid {self.uuid})")
        return DeviceNotFoundError(operation, self.name, f"the device was replaced: {self.name} now "
                                   f"has uuid {other or '(none)'}, not {self.uuid}; left alone")

    def table(self) -> DeviceTable:
        """The live table, read back from the kernel: one segment, or a scoped fault's segments."""
        try:
            targets = self._control.table(dm.ByUuid(self.uuid, self.name))
        except DeviceNotFoundError:
            raise self._gone("table") from None
        return DeviceTable.parse(targets)

    # -- filesystem helpers -----------------------------------------------------------------

    def mount_points(self) -> List[str]:
        """Where the device is mounted now (in this mount namespace), innermost last."""
        return mountinfo.mount_points_of(self.dev)

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
        A device that was replaced by another of the same name is left alone
        (DeviceNotFoundError); one that somebody else removed leaves its loop
        device and image to them (LeftAloneWarning).  The image is deleted only
        while it is still the file this library made.
        """
        if self._torn_down:
            return
        images = [self.image] if self.image else []
        if not self._device_removed:
            if not cleanup.remove_device(self.name, self.uuid):
                cleanup.left_to_whoever_removed_it(self.name, images)
                self._torn_down = True
                return
            self._device_removed = True   # a retry after a busy loop device goes on from here
        cleanup.release_images(images, delete=self.owner.kind.owns_images)
        self._torn_down = True


_FAULTS = ("drop_writes", "error_writes", "error_reads", "corrupt_bio_byte", "random_read_corrupt",
           "random_write_corrupt", "delay")


def _block_device(path: str, operation: str, name: str) -> Tuple[str, int]:
    """("major:minor", sectors) of the block device at path."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DMFlakeyError(operation, name, f"cannot stat {path}", exc.errno) from None
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgumentError(operation, name, f"{path} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", blockdev.size(path) // 512


def _create_device(name: str, uuid: str, backing: str, sectors: int, undo: ExitStack) -> int:
    """The dm device with a pass-through flakey table; returns its number."""
    info = dm.create(name, uuid=uuid)
    undo.callback(dm.remove, dm.ByUuid(uuid, name))
    dm.load(dm.ByUuid(uuid, name), DeviceTable.whole(sectors, FlakeyTable(backing, DEFAULT_INTERVAL, 0))
            .targets())
    dm.resume(dm.ByUuid(uuid, name))
    return info.dev


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
    operation = "init_flakey"
    dm.check_name(name, operation)
    fs_kind = None if fs_type is None else fs.check_fs_type(fs_type, operation, name)
    check_image_size(size, fs_kind, operation, name)
    dm.check_new_name(name, operation)
    image_path = os.path.realpath(image_path)
    owner = Owner.current(Kind.FLAKEY_IMAGE, persistent)
    uuid = owner.uuid()
    with ExitStack() as undo:
        identity = create_image(image_path, size, operation, name)
        undo.callback(delete_image, image_path, identity)
        if fs_kind is not None:
            fs.mkfs(image_path, fs_kind, mkfs_options)
        lo, image = attach_image(image_path, identity, operation, name)
        undo.callback(lo.close)  # autoclear: once the table holds it, closing leaves it bound
        dev = _create_device(name, uuid, image.major_minor, lo.size // 512, undo)
        lo.close()
        undo.pop_all()
    return Flakey(name, uuid, dev, image.major_minor, lo.size // 512, owner=owner, image=image,
                  filesystem=fs_kind)


def attach_flakey(name: str, device: str, *, persistent: bool = False) -> Flakey:
    """Map an existing block device as a flakey device; teardown leaves the device itself alone."""
    operation = "attach_flakey"
    dm.check_new_name(name, operation)
    backing, sectors = _block_device(device, operation, name)
    owner = Owner.current(Kind.FLAKEY_DEVICE, persistent)
    uuid = owner.uuid()
    with ExitStack() as undo:
        dev = _create_device(name, uuid, backing, sectors, undo)
        detected = fs.detect_fs(device)
        undo.pop_all()
    return Flakey(name, uuid, dev, backing, sectors, owner=owner, filesystem=detected)


def open_flakey(name: str) -> Flakey:
    """A Flakey for a device this library made earlier, read back from the kernel alone."""
    info = dm.info(name)
    owner = Owner.from_uuid(info.uuid)
    if owner is None or owner.kind not in FLAKEY_KINDS:
        raise InvalidNameError("open_flakey", name, f"not a flakey device made by dmflakey-ioctl "
                               f"(uuid {info.uuid!r})")
    try:
        table = DeviceTable.parse(dm.table(dm.ByUuid(info.uuid, name)))
    except InvalidArgumentError as exc:
        raise DMFlakeyError("open_flakey", name, f"its table is not one this library makes: "
                            f"{exc.cause}") from None
    image = None
    if owner.kind is Kind.FLAKEY_IMAGE:
        major, minor = (int(n) for n in table.device.split(":"))
        image = backing_of(os.makedev(major, minor))
    filesystem = None
    if not info.suspended:  # a read of a suspended device would block until someone resumes it
        try:
            filesystem = fs.detect_fs(info.path)
        except DMFlakeyError:
            pass  # a device failing reads right now: its type is unknown, not an error
    return Flakey(name, info.uuid, info.dev, table.device, table.sectors, owner=owner, image=image,
                  filesystem=filesystem)


def list_flakey() -> List[OwnedDevice]:
    """The flakey devices this library made (by uuid)."""
    return cleanup.list_owned(FLAKEY_KINDS)
