"""Which sectors of which block device hold a file's bytes: FS_IOC_FIEMAP, no program.

A fault scoped to a file must hit exactly the sectors that hold its bytes, so
whatever FIEMAP cannot pin to fixed sectors of the file's own device is refused
before the caller changes anything: inline or tail-packed data (it shares
metadata blocks), unwritten, unknown or delayed extents (no sectors are read
for them, or none are chosen yet), encoded (compressed) and encrypted extents
(the device does not hold the file's bytes), unaligned extents, filesystems
without FIEMAP, and files whose data is not on the device their st_dev names
(XFS realtime files).  Holes of a sparse file hold no sectors and are simply
absent.  ext4 and xfs answer in byte offsets on the device; btrfs answers in
its own logical addresses, translated through the chunk tree (btrfs.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from contextlib import contextmanager
from typing import Iterator, List, NamedTuple, Optional, Tuple

from . import btrfs, mountinfo
from ..errors import DMFlakeyError, InvalidArgumentError, UnsupportedFeatureError

__all__ = ["Extent", "file_extents", "file_device", "read_extents", "request", "parse_answer",
           "sector_ranges", "SECTOR"]

FS_IOC_FIEMAP = 0xC020660B        # _IOWR('f', 11, struct fiemap)
FS_IOC_FSGETXATTR = 0x801C581F    # _IOR('X', 31, struct fsxattr)

FIEMAP_HEAD = struct.Struct("=QQIIII")       # struct fiemap, 32 bytes, then the extent array
FIEMAP_EXTENT = struct.Struct("=QQQ2QI3I")   # struct fiemap_extent, 56 bytes
FSXATTR = struct.Struct("=5I8s")             # struct fsxattr, 28 bytes

FIEMAP_MAX_OFFSET = 2**64 - 1
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FS_XFLAG_REALTIME = 0x1

SECTOR = 512
EXTENTS_PER_CALL = 256   # 14 KiB of answer per ioctl; longer maps take more calls

# (flag, what, why it cannot be faulted), checked in this order so that the most specific is named
REFUSED = (
    (FIEMAP_EXTENT_DATA_INLINE, "inline data",
     "it is stored inside metadata blocks that the filesystem also uses for other things"),
    (FIEMAP_EXTENT_DATA_TAIL, "tail-packed data", "its block is shared with other files"),
    (FIEMAP_EXTENT_DELALLOC, "a delayed-allocation extent", "no sectors are chosen for it yet"),
    (FIEMAP_EXTENT_UNKNOWN, "an extent of unknown location", "the filesystem cannot say where it is"),
    (FIEMAP_EXTENT_UNWRITTEN, "an unwritten (preallocated, never written) extent",
     "reads of it return zeros without touching the device; write the data first"),
    (FIEMAP_EXTENT_ENCODED, "an encoded (compressed) extent",
     "the device holds other bytes than the file's"),
    (FIEMAP_EXTENT_DATA_ENCRYPTED, "an encrypted extent", "the device holds other bytes than the file's"),
    (FIEMAP_EXTENT_NOT_ALIGNED, "an unaligned extent", "it does not start and end on block boundaries"),
)


class Extent(NamedTuple):
    """One fiemap_extent: file bytes [logical, logical + length) at physical."""

    logical: int
    physical: int
    length: int
    flags: int


def request(start: int, count: int) -> bytearray:
    """A struct fiemap asking for the extents from byte start on, at most count, synced first."""
    buf = bytearray(FIEMAP_HEAD.size + count * FIEMAP_EXTENT.size)
    FIEMAP_HEAD.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start, FIEMAP_FLAG_SYNC, 0, count, 0)
    return buf


def parse_answer(buf: bytes) -> List[Extent]:
    """The extents the kernel filled into a request's buffer."""
    mapped, count = FIEMAP_HEAD.unpack_from(buf)[3:5]
    if mapped > count:
        raise ValueError(f"FIEMAP answered {mapped} extents for an array of {count}")
    extents = []
    for i in range(mapped):
        logical, physical, length, _r1, _r2, flags = FIEMAP_EXTENT.unpack_from(
            buf, FIEMAP_HEAD.size + i * FIEMAP_EXTENT.size)[:6]
        extents.append(Extent(logical, physical, length, flags))
    return extents


def _fs_type(dev: int) -> str:
    """The type the mount table names for the filesystem with device number dev (for messages)."""
    try:
        return next(m.fs_type for m in mountinfo.read() if m.dev == dev)
    except (StopIteration, DMFlakeyError):
        return f"the filesystem on device {os.major(dev)}:{os.minor(dev)}"


def read_extents(fd: int, operation: str, path: str, end: int,
                 per_call: int = EXTENTS_PER_CALL) -> List[Extent]:
    """Every extent FIEMAP reports for the open file, up to byte end or the LAST flag.

    Each ioctl returns at most per_call extents; the next one starts where the
    last extent returned ends.
    """
    extents: List[Extent] = []
    start = 0
    while True:
        buf = request(start, per_call)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                fs_type, running = _fs_type(os.fstat(fd).st_dev), os.uname().release
                raise UnsupportedFeatureError(
                    operation, path, f"{fs_type} cannot say where a file's data lies (it has no "
                    "FS_IOC_FIEMAP)", exc.errno, feature=f"FIEMAP on {fs_type}", since="none",
                    running=running) from None
            raise DMFlakeyError(operation, path, "FS_IOC_FIEMAP failed", exc.errno or 0) from None
        batch = parse_answer(buf)
        extents.extend(batch)
        if not batch or batch[-1].flags & FIEMAP_EXTENT_LAST:
            return extents
        following = batch[-1].logical + batch[-1].length
        if following <= start:
            raise DMFlakeyError(operation, path, f"FS_IOC_FIEMAP made no progress at byte {start}",
                                errno.EIO)
        if following >= end:  # what lies past the end of the file is not the file's data
            return extents
        start = following


def _refuse(extent: Extent, size: int, operation: str, path: str) -> None:
    where = f"at file bytes {extent.logical}..{min(extent.logical + extent.length, size) - 1}"
    for flag, what, why in REFUSED:
        if extent.flags & flag:
            raise InvalidArgumentError(operation, path, f"cannot map the file to sectors: it has {what} "
                                       f"{where}: {why}")
    if (extent.logical | extent.physical | extent.length) % SECTOR:
        raise InvalidArgumentError(operation, path, f"cannot map the file to sectors: its extent {where} "
                                   f"at device byte {extent.physical} is not 512-byte aligned")


@contextmanager
def _opened(path: str, operation: str, directory_ok: bool) -> Iterator[Tuple[int, os.stat_result]]:
    """A read-only descriptor and its stat, only for a regular file (or a directory if allowed)."""
    def kind_ok(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) or (directory_ok and stat.S_ISDIR(st.st_mode))

    wanted = "a regular file or a directory" if directory_ok else "a regular file"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "cannot stat it", exc.errno or 0) from None
    if not kind_ok(st):  # checked before open: opening a FIFO or a tape device has effects
        raise InvalidArgumentError(operation, path, f"not {wanted} (mode {stat.filemode(st.st_mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "cannot open it", exc.errno or 0) from None
    try:
        st = os.fstat(fd)
        if not kind_ok(st):
            raise InvalidArgumentError(operation, path, f"not {wanted} (replaced while opening it)")
        yield fd, st
    finally:
        os.close(fd)


def _refuse_realtime(fd: int, operation: str, path: str) -> None:
    """An XFS realtime file's data lies on the realtime device, not on st_dev."""
    buf = bytearray(FSXATTR.size)
    try:
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return  # no fsxattr, hence no realtime flag
        raise DMFlakeyError(operation, path, "FS_IOC_FSGETXATTR failed", exc.errno or 0) from None
    if FSXATTR.unpack_from(buf)[0] & FS_XFLAG_REALTIME:
        raise UnsupportedFeatureError(
            operation, path, "the file's data lies on the XFS realtime device, not on the device "
            "its st_dev names", feature="XFS realtime files", since="none", running=os.uname().release)


class _Placement(NamedTuple):
    device: int
    chunk_map: Optional[btrfs.ChunkMap]   # btrfs only: FIEMAP's addresses are logical


def _placement(fd: int, st: os.stat_result, operation: str, path: str, with_map: bool) -> _Placement:
    """The block device holding the file and, on btrfs, how to reach it."""
    if os.major(st.st_dev) != 0:   # a filesystem on one block device: st_dev is that device
        _refuse_realtime(fd, operation, path)
        return _Placement(st.st_dev, None)
    info = btrfs.fs_info(fd, operation, path)
    if info is None:
        fs_type = _fs_type(st.st_dev)
        raise UnsupportedFeatureError(
            operation, path, f"{fs_type} is not on one block device of its own (device number "
            f"{os.major(st.st_dev)}:{os.minor(st.st_dev)} is anonymous) and is not btrfs",
            feature=f"file extents on {fs_type}", since="none", running=os.uname().release)
    device = btrfs.device_number(info, operation, path)
    if not with_map:
        return _Placement(device, None)
    btrfs.check_features(fd, operation, path)
    devid = btrfs.device_id(fd, info, operation, path)
    return _Placement(device, btrfs.ChunkMap(btrfs.read_chunks(fd, operation, path), devid))


def file_device(path: str) -> int:
    """dev_t of the block device that holds the file (or directory) at path.

    ext4 and xfs: st_dev.  btrfs: st_dev is an anonymous number, so the
    filesystem's one device is looked up (a multi-device btrfs is refused).
    """
    operation = "file device"
    with _opened(path, operation, directory_ok=True) as (fd, st):
        return _placement(fd, st, operation, path, with_map=False).device


def file_extents(path: str) -> List[Tuple[int, int]]:
    """The file's data as (start_sector, nr_sectors), 512-byte sectors on file_device(path).

    In file order; extents adjacent both in the file and on the device are
    merged; holes are absent; what lies past the end of the file is cut off
    at the first sector boundary after it.  Dirty data is written first
    (FIEMAP_FLAG_SYNC), so delayed allocation is resolved.  On a btrfs with
    the DUP profile each piece of data is returned twice, once per copy,
    copy by copy.  Refuses (InvalidArgumentError, UnsupportedFeatureError)
    whatever cannot be pinned to sectors; nothing is changed either way.
    """
    operation = "file extents"
    with _opened(path, operation, directory_ok=False) as (fd, st):
        eof = -(-st.st_size // SECTOR) * SECTOR
        extents = [e._replace(length=min(e.length, eof - e.logical))
                   for e in read_extents(fd, operation, path, eof) if e.logical < eof]
        for extent in extents:
            _refuse(extent, st.st_size, operation, path)
        place = _placement(fd, st, operation, path, with_map=True)
        pieces: List[Tuple[int, int, Tuple[int, ...]]] = []
        for extent in extents:
            if place.chunk_map is None:
                pieces.append((extent.logical, extent.length, (extent.physical,)))
                continue
            for offset, length, copies in place.chunk_map.copies(extent.physical, extent.length,
                                                                 operation, path):
                pieces.append((extent.logical + offset, length, copies))
    return sector_ranges(pieces)


def sector_ranges(pieces: List[Tuple[int, int, Tuple[int, ...]]]) -> List[Tuple[int, int]]:
    """(start_sector, nr_sectors) of pieces (file byte, length, device byte of each copy).

    Pieces that follow each other in the file and, copy by copy, on the
    device are joined first; then each piece yields one range per copy.
    """
    joined: List[Tuple[int, int, Tuple[int, ...]]] = []
    for logical, length, copies in pieces:
        if joined:
            last_logical, last_length, last_copies = joined[-1]
            if last_logical + last_length == logical and len(last_copies) == len(copies) and \
                    all(a + last_length == b for a, b in zip(last_copies, copies)):
                joined[-1] = (last_logical, last_length + length, last_copies)
                continue
        joined.append((logical, length, copies))
    return [(copy // SECTOR, length // SECTOR) for _logical, length, copies in joined for copy in copies]
