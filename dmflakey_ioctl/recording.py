"""Recording every write: a ``log-writes`` device over a data image and a log image.

``record_writes`` makes two sparse images, attaches each to a loop device and
maps ``/dev/mapper/<name>`` with a log-writes table, so that every completed
write reaches the data image and is also appended to the log.  The first log
entry is a mark ``dmflakey-size:<bytes>`` (the log format does not record the
device's size, and a replay needs it); then mkfs runs ON the recording
device, so the log holds the filesystem's whole history from an all-zero
device, and a mark ``mkfs`` follows.

``stop()`` unmounts, removes the device (the target then writes its last
entries and its super block) and hands the log over as a :class:`WriteLog`.
A log device that ran out of space makes the target stop logging while the
data device keeps working: that is an error at ``mark()`` and ``stop()``,
never a silently truncated log.
"""

from __future__ import annotations

import errno
import os
from contextlib import ExitStack
from typing import Optional, Sequence, Union

from . import cleanup, fs
from .errors import DeviceNotFoundError, DMFlakeyError, InvalidArgumentError, InvalidNameError, \
    LogFullError
from .fs import FSType
from .images import (BackingImage, attach_image, backing_of, check_image_size, create_image,
                     delete_image, release)
from .kernel import blockdev, dm, mountinfo
from .ownership import Kind, Owner
from .tables.log_writes import LogWritesStatus, LogWritesTable
from .writelog import END_MARK, SIZE_MARK_PREFIX, WriteLog, check_mark_label

__all__ = ["Recording", "record_writes", "record_writes_to", "open_recording",
           "DEFAULT_RECORDING_SIZE"]

DEFAULT_RECORDING_SIZE = 256 << 20
"""256 MiB, sparse: a recording's log grows with every write, so smaller than a flakey image."""
MKFS_MARK = "mkfs"


def _parse_major_minor(text: str) -> int:
    major, minor = (int(n) for n in text.split(":"))
    return os.makedev(major, minor)


class Recording:
    """A log-writes device: writes reach the data image and are appended to the log image.

    Made by :func:`record_writes` or :func:`open_recording`; a context manager
    whose exit is ``teardown()``.
    """

    def __init__(self, name: str, uuid: str, dev: int, *, owner: Owner, data: BackingImage,
                 log: BackingImage, size: int, log_size: int, sector_size: int,
                 filesystem: Optional[FSType]) -> None:
        self.name = name
        self.uuid = uuid
        self.dev = dev
        self.device_path = f"{dm.MAPPER_DIR}/{name}"
        self.owner = owner
        self.data = data
        self.log = log
        self.size = size
        self.log_size = log_size
        self.sector_size = sector_size
        self.filesystem = filesystem
        self._log_handed_over = False
        self._stopped = False
        self._torn_down = False

    @property
    def image_path(self) -> str:
        return self.data.path

    @property
    def log_path(self) -> str:
        return self.log.path

    def __repr__(self) -> str:
        return (f"Recording(name={self.name!r}, device_path={self.device_path!r}, "
                f"image_path={self.image_path!r}, log_path={self.log_path!r})")

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def mount(self, target: str, options: str = "") -> None:
        """Mount the recorded filesystem on target."""
        fs.mount(self.device_path, target, self.filesystem, options)

    def mount_points(self) -> list:
        """Where the recording device is mounted now, innermost last."""
        return mountinfo.mount_points_of(self.dev)

    def status(self) -> LogWritesStatus:
        """The target's status: entries logged so far, and whether logging stopped."""
        try:
            targets = dm.status(dm.ByUuid(self.uuid, self.name))
        except DeviceNotFoundError:
            raise DeviceNotFoundError("status", self.name, f"the recording device is gone (no "
                                      f"device has uuid {self.uuid})") from None
        return LogWritesStatus.parse(targets[0].params)

    @property
    def entries(self) -> int:
        """Entries logged so far (the kernel's count; the log on disk may still lag behind)."""
        return self.status().entries

    def mark(self, label: str) -> None:
        """Log a mark: a point a replay can stop at by name (one word, bounded length)."""
        check_mark_label(label, self.sector_size, "mark", self.name)
        self._check_logging("mark")
        dm.message(dm.ByUuid(self.uuid, self.name), 0, f"mark {label}")
        self._check_logging("mark")

    def _check_logging(self, operation: str) -> None:
        if self.status().logging_disabled:
            raise self._log_full(operation, self._bytes_to_log())

    def _log_full(self, operation: str, needed: int) -> LogFullError:
        """The log ran out of space: say how big it is and about how big it had to be."""
        return LogFullError(operation, self.name, f"the log ran out of space: {self.log_path} "
                            f"holds {self.log_size} bytes; the writes so far needed about "
                            f"{needed} bytes (record again with a larger log_size)", errno.ENOSPC,
                            log_size=self.log_size, needed=needed)

    def _bytes_to_log(self) -> int:
        """What a complete log of the writes so far takes, from the device's I/O statistics.

        Read while the device exists: its statistics go with it.
        """
        try:
            with open(f"/sys/dev/block/{os.major(self.dev)}:{os.minor(self.dev)}/stat") as fh:
                fields = [int(v) for v in fh.read().split()]
        except (OSError, ValueError):
            return self.log_size + 1
        writes, sectors = fields[4], fields[6]
        others = (fields[11] if len(fields) > 11 else 0) + (fields[15] if len(fields) > 15 else 0)
        return sectors * 512 + (writes + others + 3) * self.sector_size

    def stop(self) -> WriteLog:
        """Unmount, remove the device (the log gets its last entries) and hand the log over.

        The returned WriteLog owns the log file: its close() deletes it unless
        keep=True.  The data image stays with the Recording until teardown().
        Writes that were not flushed yet are logged during the removal, so a
        log can fill up right then: a log whose last entry is not the kernel's
        end mark is incomplete, and that is a LogFullError too.
        """
        if self._stopped:
            raise InvalidArgumentError("stop", self.name, "the recording was stopped already")
        for point in reversed(self.mount_points()):
            fs.umount(point)
        full = self.status().logging_disabled
        needed = self._bytes_to_log()
        dm.remove(dm.ByUuid(self.uuid, self.name))
        self._stopped = True
        for image in (self.data, self.log):
            release(image, delete=False)
        if full:
            raise self._log_full("stop", needed)
        log = WriteLog.open(self.log_path, owned_identity=self.log.identity)
        if not len(log) or log[-1].label != END_MARK:
            log.close(keep=True)   # still the Recording's: teardown() deletes it
            raise self._log_full("stop", needed)
        self._log_handed_over = True
        return log

    def teardown(self) -> None:
        """Remove the device, its loop devices and both images (the log only if not handed over)."""
        if self._torn_down:
            return
        images = [self.data, self.log]
        if not self._stopped:
            if not cleanup.remove_device(self.name, self.uuid):
                cleanup.left_to_whoever_removed_it(self.name, images)
                self._torn_down = True
                return
            self._stopped = True
            cleanup.release_images(images, delete=False)
        delete_image(self.data.path, self.data.identity)
        if not self._log_handed_over:
            delete_image(self.log.path, self.log.identity)
        self._torn_down = True


def record_writes(name: str, data_dir: str, fs_type: Optional[Union[FSType, str]] = FSType.EXT4,
                  size: int = DEFAULT_RECORDING_SIZE, log_size: Optional[int] = None,
                  mkfs_options: Union[Sequence[str], str, None] = None, *,
                  block_size: Optional[int] = None, persistent: bool = False) -> Recording:
    """A recording device over ``<data_dir>/<name>.img`` and ``<data_dir>/<name>.log`` (sparse).

    log_size defaults to twice size (sparse, so it costs what is written).
    block_size=4096 makes a 4Kn device (the log then counts in 4096-byte
    sectors).  fs_type None skips mkfs.  Any failure undoes every step.
    """
    return record_writes_to(name, os.path.join(data_dir, f"{name}.img"),
                            os.path.join(data_dir, f"{name}.log"), fs_type, size, log_size,
                            mkfs_options, block_size=block_size, persistent=persistent)


def record_writes_to(name: str, image_path: str, log_path: str,
                     fs_type: Optional[Union[FSType, str]] = FSType.EXT4,
                     size: int = DEFAULT_RECORDING_SIZE, log_size: Optional[int] = None,
                     mkfs_options: Union[Sequence[str], str, None] = None, *,
                     block_size: Optional[int] = None, persistent: bool = False) -> Recording:
    """record_writes with both image paths chosen by the caller (the CLI); neither may exist."""
    operation = "record_writes"
    dm.check_name(name, operation)
    fs_kind = None if fs_type is None else fs.check_fs_type(fs_type, operation, name)
    check_image_size(size, fs_kind, operation, name)
    log_size = 2 * size if log_size is None else log_size
    check_image_size(log_size, None, operation, name)
    unit = block_size or 512
    if size % unit or log_size % unit:
        raise InvalidArgumentError(operation, name, f"size and log_size must be multiples of the "
                                   f"block size {unit}")
    dm.check_new_name(name, operation)
    image_path, log_path = os.path.realpath(image_path), os.path.realpath(log_path)
    if image_path == log_path:
        raise InvalidArgumentError(operation, name, "the data image and the log need two paths")
    owner = Owner.current(Kind.RECORDING, persistent)
    uuid = owner.uuid()
    with ExitStack() as undo:
        images = []
        for path, length in ((image_path, size), (log_path, log_size)):
            identity = create_image(path, length, operation, name)
            undo.callback(delete_image, path, identity)
            lo, image = attach_image(path, identity, operation, name, block_size=block_size)
            undo.callback(lo.close)  # autoclear: once the table holds it, closing leaves it bound
            images.append((lo, image))
        (data_loop, data), (log_loop, log) = images
        info = dm.create(name, uuid=uuid)
        undo.callback(dm.remove, dm.ByUuid(uuid, name))
        table = LogWritesTable(data.major_minor, log.major_minor)
        dm.load(dm.ByUuid(uuid, name), [(0, size // 512, table.target_type, table.params())])
        for lo, _ in images:
            lo.close()
        dm.resume(dm.ByUuid(uuid, name))
        recording = Recording(name, uuid, info.dev, owner=owner, data=data, log=log, size=size,
                              log_size=log_size, sector_size=unit, filesystem=fs_kind)
        recording.mark(f"{SIZE_MARK_PREFIX}{size}")
        if fs_kind is not None:
            fs.mkfs(recording.device_path, fs_kind, mkfs_options)
        recording.mark(MKFS_MARK)
        undo.pop_all()
    return recording


def open_recording(name: str) -> Recording:
    """A Recording for a recording device this library made earlier, read back from the kernel."""
    info = dm.info(name)
    owner = Owner.from_uuid(info.uuid)
    if owner is None or owner.kind is not Kind.RECORDING:
        raise InvalidNameError("open_recording", name, f"not a recording made by dmflakey-ioctl "
                               f"(uuid {info.uuid!r})")
    targets = dm.table(dm.ByUuid(info.uuid, name))
    if len(targets) != 1 or targets[0].target_type != LogWritesTable.target_type:
        raise DMFlakeyError("open_recording", name, f"not a single log-writes target: {targets!r}")
    table = LogWritesTable.parse(targets[0].params)
    found = [backing_of(_parse_major_minor(d)) for d in (table.data_device, table.log_device)]
    if None in found:
        raise DMFlakeyError("open_recording", name, "its data or log device holds no image file")
    data, log = found  # type: ignore[misc]
    log_size = blockdev.size(log.loop_path)
    sector_size = blockdev.logical_block_size(data.loop_path)  # the log counts in the data's unit
    filesystem = None if info.suspended else fs.detect_fs(info.path)
    return Recording(name, info.uuid, info.dev, owner=owner, data=data, log=log,
                     size=targets[0].length * 512, log_size=log_size, sector_size=sector_size,
                     filesystem=filesystem)
