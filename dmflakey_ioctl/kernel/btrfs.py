"""Where btrfs keeps a file's bytes on its one device: the chunk tree, by ioctl.

FIEMAP on btrfs answers in btrfs LOGICAL addresses, not device offsets.  The
chunk tree maps each logical range (a chunk) to stripes, each a (devid,
physical offset) pair.  Only the profiles that put whole copies on one device
are mapped: SINGLE (one copy) and DUP (two copies, both returned, since a
read may be served from either).  Everything else is refused: striped or
mirrored profiles, several devices, and on-disk features under which the
chunk tree alone no longer says where data lives.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
import struct
from typing import List, NamedTuple, Optional, Tuple

from ..errors import DMFlakeyError, NotRootError, UnsupportedFeatureError

__all__ = ["FsInfo", "Chunk", "ChunkMap", "fs_info", "device_id", "device_number", "check_features",
           "unmappable_features", "read_chunks", "search_request", "parse_search_answer", "parse_chunk"]

# request numbers, linux/btrfs.h (magic 0x94)
BTRFS_IOC_TREE_SEARCH_V2 = 0xC0709411   # _IOWR(0x94, 17, struct btrfs_ioctl_search_args_v2)
BTRFS_IOC_DEV_INFO = 0xD000941E         # _IOWR(0x94, 30, struct btrfs_ioctl_dev_info_args)
BTRFS_IOC_FS_INFO = 0x8400941F          # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args)
BTRFS_IOC_GET_FEATURES = 0x80189439     # _IOR(0x94, 57, struct btrfs_ioctl_feature_flags)

FS_INFO = struct.Struct("=QQ16sIIIHHQQ16s944s")   # struct btrfs_ioctl_fs_info_args, 1024 bytes
DEV_INFO = struct.Struct("=Q16sQQ379Q1024s")       # struct btrfs_ioctl_dev_info_args, 4096 bytes
FEATURE_FLAGS = struct.Struct("=QQQ")              # struct btrfs_ioctl_feature_flags
SEARCH_KEY = struct.Struct("=7Q4I4Q")              # struct btrfs_ioctl_search_key, 104 bytes
SEARCH_BUF_SIZE = struct.Struct("=Q")              # btrfs_ioctl_search_args_v2.buf_size, after the key
SEARCH_HEADER = struct.Struct("=3Q2I")             # struct btrfs_ioctl_search_header
CHUNK = struct.Struct("<4Q3I2H")                   # struct btrfs_chunk without its stripes (on-disk LE)
STRIPE = struct.Struct("<2Q16s")                   # struct btrfs_stripe

BTRFS_CHUNK_TREE_OBJECTID = 3
BTRFS_FIRST_CHUNK_TREE_OBJECTID = 256
BTRFS_CHUNK_ITEM_KEY = 228

BTRFS_BLOCK_GROUP_DATA = 1 << 0
BTRFS_BLOCK_GROUP_DUP = 1 << 5
# every profile bit (RAID0, RAID1, DUP, RAID10, RAID5, RAID6, RAID1C3, RAID1C4), by name
PROFILES = {1 << 3: "raid0", 1 << 4: "raid1", 1 << 5: "dup", 1 << 6: "raid10", 1 << 7: "raid5",
            1 << 8: "raid6", 1 << 9: "raid1c3", 1 << 10: "raid1c4"}
PROFILE_MASK = sum(PROFILES)

# Incompat features under which the chunk tree still says where every data byte is (bits 0-11:
# mixed_backref ... raid1c34; the RAID ones are refused chunk by chunk) and simple_quota (16).
# Anything else is refused, among them zoned (12), extent_tree_v2 (13) and raid_stripe_tree (14,
# which maps data through a tree of its own) and every bit a later kernel adds.
INCOMPAT_MAPPABLE = (1 << 12) - 1 | 1 << 16
INCOMPAT_NAMES = {12: "zoned", 13: "extent_tree_v2", 14: "raid_stripe_tree"}

SEARCH_BUFFER = 64 * 1024
SYSFS_BTRFS = "/sys/fs/btrfs"


class FsInfo(NamedTuple):
    max_id: int
    num_devices: int
    fsid: str       # as /sys/fs/btrfs/<fsid> spells it


class Chunk(NamedTuple):
    """One chunk item: logical [logical, logical + length) stored at each (devid, offset) stripe."""

    logical: int
    length: int
    type: int
    stripes: Tuple[Tuple[int, int], ...]

    @property
    def profile(self) -> str:
        bits = self.type & PROFILE_MASK
        return PROFILES.get(bits, "single" if not bits else f"profile bits {bits:#x}")


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def fs_info(fd: int, operation: str, path: str) -> Optional[FsInfo]:
    """The filesystem's id and device count, or None when fd is not on btrfs (ENOTTY)."""
    buf = bytearray(FS_INFO.size)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise DMFlakeyError(operation, path, "BTRFS_IOC_FS_INFO failed", exc.errno or 0) from None
    max_id, num_devices, fsid = FS_INFO.unpack_from(buf)[:3]
    return FsInfo(max_id, num_devices, _uuid_text(fsid))


def device_id(fd: int, info: FsInfo, operation: str, path: str) -> int:
    """The devid of the filesystem's one device (ids are not reused, so probe 1..max_id)."""
    for devid in range(1, info.max_id + 1):
        buf = bytearray(DEV_INFO.size)   # devid in; a zero uuid matches any device
        DEV_INFO.pack_into(buf, 0, devid, bytes(16), 0, 0, *([0] * 379), b"")
        try:
            fcntl.ioctl(fd, BTRFS_IOC_DEV_INFO, buf)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                continue
            raise DMFlakeyError(operation, path, "BTRFS_IOC_DEV_INFO failed", exc.errno or 0) from None
        return devid
    raise DMFlakeyError(operation, path, f"btrfs {info.fsid} reports no device with an id up to "
                        f"{info.max_id}", errno.ENODEV)


def device_number(info: FsInfo, operation: str, path: str) -> int:
    """dev_t of the filesystem's one device, from /sys/fs/btrfs/<fsid>/devices (no /dev node needed)."""
    if info.num_devices != 1:
        raise UnsupportedFeatureError(
            operation, path, f"btrfs {info.fsid} spans {info.num_devices} devices; only a "
            "single-device btrfs is mapped", feature="multi-device btrfs", since="none",
            running=os.uname().release)
    folder = os.path.join(SYSFS_BTRFS, info.fsid, "devices")
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DMFlakeyError(operation, path, f"cannot list {folder} to find the btrfs device "
                            "(is sysfs mounted?)", exc.errno or 0) from None
    if len(names) != 1:
        raise DMFlakeyError(operation, path, f"{folder} lists {sorted(names)} for a btrfs of one "
                            "device", errno.EINVAL)
    dev_file = os.path.join(folder, names[0], "dev")
    try:
        with open(dev_file) as fh:
            major, minor = fh.read().split(":")
        return os.makedev(int(major), int(minor))
    except OSError as exc:
        raise DMFlakeyError(operation, path, f"cannot read {dev_file}", exc.errno or 0) from None
    except ValueError:
        raise DMFlakeyError(operation, path, f"{dev_file} holds no major:minor", errno.EINVAL) from None


def unmappable_features(incompat: int) -> List[str]:
    """Names of the incompat feature bits outside INCOMPAT_MAPPABLE."""
    unknown = incompat & ~INCOMPAT_MAPPABLE
    return [INCOMPAT_NAMES.get(bit, f"incompat bit {bit}") for bit in range(64) if unknown >> bit & 1]


def check_features(fd: int, operation: str, path: str) -> None:
    """Refuse a filesystem with an incompat feature outside INCOMPAT_MAPPABLE."""
    buf = bytearray(FEATURE_FLAGS.size)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_GET_FEATURES, buf)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "BTRFS_IOC_GET_FEATURES failed", exc.errno or 0) from None
    names = ", ".join(unmappable_features(FEATURE_FLAGS.unpack_from(buf)[2]))
    if names:
        raise UnsupportedFeatureError(
            operation, path, f"this btrfs has {names}: with it the chunk tree alone does not say "
            "where file data lies on the device, so it is not mapped", feature=f"btrfs {names}",
            since="none", running=os.uname().release)


def search_request(min_offset: int) -> bytearray:
    """A TREE_SEARCH_V2 request for the chunk items from logical address min_offset on."""
    buf = bytearray(SEARCH_KEY.size + SEARCH_BUF_SIZE.size + SEARCH_BUFFER)
    SEARCH_KEY.pack_into(buf, 0, BTRFS_CHUNK_TREE_OBJECTID,
                         BTRFS_FIRST_CHUNK_TREE_OBJECTID, BTRFS_FIRST_CHUNK_TREE_OBJECTID,
                         min_offset, 2**64 - 1, 0, 2**64 - 1,
                         BTRFS_CHUNK_ITEM_KEY, BTRFS_CHUNK_ITEM_KEY, 2**32 - 1, 0, 0, 0, 0, 0)
    SEARCH_BUF_SIZE.pack_into(buf, SEARCH_KEY.size, SEARCH_BUFFER)
    return buf


def parse_search_answer(buf: bytes) -> List[Tuple[int, int, int, bytes]]:
    """(objectid, type, offset, item bytes) of each item a TREE_SEARCH_V2 answer holds."""
    count = SEARCH_KEY.unpack_from(buf)[9]
    pos = SEARCH_KEY.size + SEARCH_BUF_SIZE.size
    items = []
    for _ in range(count):
        _transid, objectid, offset, item_type, length = SEARCH_HEADER.unpack_from(buf, pos)
        pos += SEARCH_HEADER.size
        items.append((objectid, item_type, offset, bytes(buf[pos:pos + length])))
        pos += length
    return items


def parse_chunk(logical: int, data: bytes) -> Chunk:
    """A chunk item (its key offset is the chunk's logical start) with its stripes."""
    length, _owner, _stripe_len, chunk_type, _align, _width, _sector, num_stripes, _sub = \
        CHUNK.unpack_from(data)
    if len(data) != CHUNK.size + num_stripes * STRIPE.size:
        raise ValueError(f"chunk item at {logical} has {len(data)} bytes for {num_stripes} stripes")
    stripes = tuple(STRIPE.unpack_from(data, CHUNK.size + i * STRIPE.size)[:2] for i in range(num_stripes))
    return Chunk(logical, length, chunk_type, stripes)


def read_chunks(fd: int, operation: str, path: str) -> List[Chunk]:
    """Every chunk of the filesystem, in logical order (needs CAP_SYS_ADMIN)."""
    chunks: List[Chunk] = []
    min_offset = 0
    while True:
        buf = search_request(min_offset)
        try:
            fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, buf)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise NotRootError(operation, path, "reading the btrfs chunk tree "
                                   "(BTRFS_IOC_TREE_SEARCH_V2) needs root", exc.errno) from None
            raise DMFlakeyError(operation, path, "BTRFS_IOC_TREE_SEARCH_V2 of the chunk tree failed",
                                exc.errno or 0) from None
        items = parse_search_answer(buf)
        if not items:
            return chunks
        for _objectid, _type, offset, data in items:  # the key range holds chunk items only
            try:
                chunks.append(parse_chunk(offset, data))
            except (ValueError, struct.error) as exc:
                raise DMFlakeyError(operation, path, f"unreadable btrfs chunk item: {exc}") from None
        if items[-1][2] == 2**64 - 1:
            return chunks
        min_offset = items[-1][2] + 1


class ChunkMap:
    """Logical ranges to device offsets through the chunks, on the device devid only."""

    def __init__(self, chunks: List[Chunk], devid: int) -> None:
        self.chunks = sorted(chunks)
        self.starts = [c.logical for c in self.chunks]
        self.devid = devid

    def copies(self, logical: int, length: int, operation: str,
               path: str) -> List[Tuple[int, int, Tuple[int, ...]]]:
        """(bytes into the range, length, device offset of each copy), one per chunk crossed.

        Raises UnsupportedFeatureError for a chunk that is not SINGLE or DUP
        data on this device, DMFlakeyError for a range no chunk holds.
        """
        pieces = []
        done = 0
        while done < length:
            at = logical + done
            i = bisect.bisect_right(self.starts, at) - 1
            if i < 0 or at >= self.chunks[i].logical + self.chunks[i].length:
                raise DMFlakeyError(operation, path, f"btrfs logical address {at} lies in no chunk "
                                    "of the chunk tree", errno.ENOENT)
            chunk = self.chunks[i]
            self._check(chunk, operation, path)
            size = min(length - done, chunk.logical + chunk.length - at)
            pieces.append((done, size, tuple(off + at - chunk.logical for _devid, off in chunk.stripes)))
            done += size
        return pieces

    def _check(self, chunk: Chunk, operation: str, path: str) -> None:
        profile = chunk.profile
        expected = {"single": 1, "dup": 2}.get(profile)
        if expected is None:
            raise UnsupportedFeatureError(
                operation, path, f"the file's data lies in a btrfs {profile} chunk (logical "
                f"{chunk.logical}+{chunk.length}); only single and dup chunks are mapped, "
                "striped and mirrored ones are not", feature=f"btrfs {profile} profile", since="none",
                running=os.uname().release)
        if not chunk.type & BTRFS_BLOCK_GROUP_DATA:
            raise DMFlakeyError(operation, path, f"the file's data lies in a btrfs chunk without data "
                                f"(type {chunk.type:#x}, logical {chunk.logical})", errno.EINVAL)
        devids = {devid for devid, _off in chunk.stripes}
        if len(chunk.stripes) != expected or devids != {self.devid}:
            raise DMFlakeyError(operation, path, f"btrfs {profile} chunk at logical {chunk.logical} "
                                f"has stripes {list(chunk.stripes)}, expected {expected} on device id "
                                f"{self.devid}", errno.EINVAL)
