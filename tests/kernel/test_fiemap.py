"""file_extents and file_device against real ext4, xfs and btrfs filesystems.

Every mapping is proven by reading the device at the mapped sectors with
O_DIRECT and finding the file's own bytes there.  Each 4 KiB block of a test
file names its file and its block number, so a block read from the wrong
place cannot match by accident, and the order of the blocks read back shows
that the ranges come in file order.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import mmap
import os
import re
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import pytest

from dmflakey_ioctl import fs, init_flakey
from dmflakey_ioctl.errors import InvalidArgumentError, UnsupportedFeatureError
from dmflakey_ioctl.flakey import Flakey
from dmflakey_ioctl.kernel import blockdev, loop
from dmflakey_ioctl.kernel.fiemap import file_device, file_extents, read_extents

from .helpers import Direct, sparse_file, unique_name

MiB = 1 << 20
BS = 4096
SIZES = {"ext4": 64 * MiB, "xfs": 320 * MiB, "btrfs": 128 * MiB}
TAG = re.compile(rb"<([A-Za-z0-9]+) block (\d{6})>")
FALLOC_FL_KEEP_SIZE = 1
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR, FS_XFLAG_REALTIME = 0x801C581F, 0x401C5820, 1


class Bed(NamedTuple):
    fs_type: str
    dev: Flakey
    mnt: Path
    rdev: int


def block(tag: str, i: int) -> bytes:
    """4 KiB that say which file and which block they are."""
    return (f"<{tag} block {i:06d}>".encode() * (BS // 16))[:BS]


def blocks_in(data: bytes) -> List[Optional[Tuple[str, int]]]:
    """(tag, number) of each 4 KiB block of data read from the device, None where there is none."""
    out = []
    for pos in range(0, len(data), BS):
        m = TAG.match(data, pos)
        name = (m.group(1).decode(), int(m.group(2))) if m else None
        out.append(name if name and data[pos:pos + BS] == block(*name) else None)
    return out


def write_blocks(path: Path, tag: str, numbers, size: Optional[int] = None) -> None:
    """Write the numbered blocks of path (buffered, no sync: file_extents must sync them itself)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if size is not None:
            os.ftruncate(fd, size)
        for i in numbers:
            os.pwrite(fd, block(tag, i), i * BS)
    finally:
        os.close(fd)


def read_device(device: str, ranges: List[Tuple[int, int]]) -> bytes:
    """The bytes at the ranges, in order, read with O_DIRECT (no page cache between us and the device)."""
    with Direct(device) as direct:
        return b"".join(direct.read(start * 512, count * 512) for start, count in ranges)


def check_ranges(device: str, ranges: List[Tuple[int, int]]) -> None:
    """Every range lies on the device and no two overlap."""
    size = blockdev.size(device) // 512
    assert ranges and all(n > 0 and 0 <= s and s + n <= size for s, n in ranges), (ranges, size)
    ordered = sorted(ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ordered, ordered[1:])), f"overlapping ranges {ranges}"


def proven(device: str, path: Path) -> List[Tuple[int, int]]:
    """file_extents(path), checked: the device holds exactly the file's bytes at those sectors."""
    ranges = file_extents(str(path))
    fs.syncfs(str(path))
    check_ranges(device, ranges)
    data, content = read_device(device, ranges), path.read_bytes()
    assert len(data) == -(-len(content) // 512) * 512
    assert data[:len(content)] == content, "the mapped sectors do not hold the file's bytes"
    return ranges


def mounts_under(folder: Path) -> List[str]:
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [p for p in points if folder == Path(p) or folder in Path(p).parents]


@contextmanager
def flakey_fs(folder: Path, fs_type: str, size: int, mkfs_options: Optional[str] = None,
              mount_options: str = "") -> Iterator[Bed]:
    """A flakey device with a fresh filesystem mounted on folder/mnt; torn down (unmounted) on exit."""
    dev = init_flakey(unique_name("dmfi-fm"), str(folder), fs_type, mkfs_options, size=size)
    try:
        mnt = folder / "mnt"
        mnt.mkdir()
        dev.mount(str(mnt), mount_options)
        yield Bed(fs_type, dev, mnt, os.stat(dev.device_path).st_rdev)
    finally:
        dev.teardown()


@contextmanager
def loop_devices(folder: Path, *sizes: int) -> Iterator[List[loop.LoopDevice]]:
    """Loop devices over new sparse images in folder; on exit what is mounted below folder is
    unmounted, the devices detached and the images deleted."""
    devices: List[loop.LoopDevice] = []
    try:
        for i, size in enumerate(sizes):
            devices.append(loop.attach(str(sparse_file(folder / f"disk{i}.img", size))))
        yield devices
    finally:
        for point in reversed(mounts_under(folder)):
            fs.umount(point)
        for dev in devices:
            dev.detach()
        for i in range(len(sizes)):
            (folder / f"disk{i}.img").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def bed(request, tmp_path_factory) -> Iterator[Bed]:
    """One mounted flakey device per filesystem type, shared by the tests of this module."""
    with flakey_fs(tmp_path_factory.mktemp(f"fiemap-{request.param}"), request.param,
                   SIZES[request.param]) as made:
        yield made


ALL = pytest.mark.parametrize("bed", ["ext4", "xfs", "btrfs"], indirect=True)
EXT4 = pytest.mark.parametrize("bed", ["ext4"], indirect=True)
BTRFS = pytest.mark.parametrize("bed", ["btrfs"], indirect=True)


def refusal(error: type, path: Path, call=file_extents) -> str:
    """The message of the error call(path) raises, checked to name the operation and the path."""
    with pytest.raises(error) as info:
        call(str(path))
    operation = "file extents" if call is file_extents else "file device"
    assert str(info.value).startswith(f"{operation} {path}: "), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- every filesystem

@ALL
def test_a_file_maps_to_the_sectors_that_hold_its_bytes(bed):
    path = bed.mnt / "plain"
    write_blocks(path, "plain", range(40))
    with open(path, "ab") as fh:
        fh.write(b"a tail shorter than a sector " * 30)   # 870 bytes: the last range ends mid-block
    ranges = proven(bed.dev.device_path, path)   # not synced before: FIEMAP_FLAG_SYNC resolved delalloc
    assert sum(n for _s, n in ranges) == (40 * BS) // 512 + 2
    assert file_device(str(path)) == file_device(str(bed.mnt)) == bed.rdev


@ALL
def test_a_fragmented_file_maps_extent_by_extent(bed):
    """Two files grown in turns, one block and one fsync at a time, interleave on the device."""
    knob, old = None, ""
    if bed.fs_type == "ext4":   # else ext4 gives each growing file a private preallocation window
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(bed.rdev)}:{os.minor(bed.rdev)}"))
        knob = Path(f"/sys/fs/ext4/{name}/mb_stream_req")
        old = knob.read_text()
        knob.write_text("100000")
    a, b = bed.mnt / "frag-a", bed.mnt / "frag-b"
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644) for p in (a, b)]
    buf = mmap.mmap(-1, BS)
    # ext4's small-file preallocation is per CPU: on one CPU both files draw from the same window
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        for i in range(48):
            for fd, tag in zip(fds, ("fragA", "fragB")):
                buf[:] = block(tag, i)
                assert os.pwritev(fd, [buf], i * BS) == BS
                os.fsync(fd)
    finally:
        os.sched_setaffinity(0, cpus)
        buf.close()
        for fd in fds:
            os.close(fd)
        if knob is not None:
            knob.write_text(old)
    ranges = proven(bed.dev.device_path, a)
    assert len(ranges) >= 16, f"only {len(ranges)} extents: the file did not fragment"
    assert blocks_in(read_device(bed.dev.device_path, ranges)) == [("fragA", i) for i in range(48)]
    # the same map asked for a few extents per ioctl: several calls, each going on where the last ended
    with open(a, "rb") as fh:
        whole = read_extents(fh.fileno(), "test", str(a), 48 * BS, per_call=1000)
        assert len(whole) >= 16
        for per_call in (1, 3):
            assert read_extents(fh.fileno(), "test", str(a), 48 * BS, per_call=per_call) == whole


@ALL
def test_a_sparse_file_maps_its_data_and_not_its_holes(bed):
    path = bed.mnt / "sparse"
    data = [0, 1, 5, 9, 10, 11, 30]
    write_blocks(path, "sparse", data, size=40 * BS)   # written inside EOF: nothing fills the holes
    ranges = file_extents(str(path))
    fs.syncfs(str(bed.mnt))
    check_ranges(bed.dev.device_path, ranges)
    assert sum(n for _s, n in ranges) == len(data) * BS // 512
    assert blocks_in(read_device(bed.dev.device_path, ranges)) == [("sparse", i) for i in data]


@ALL
def test_a_tiny_file_maps_unless_btrfs_keeps_it_inline(bed):
    path = bed.mnt / "tiny"
    path.write_bytes(b"a hundred bytes " * 6 + b"1234")
    if bed.fs_type == "btrfs":   # btrfs stores files up to max_inline (2 KiB) inside its metadata
        message = refusal(InvalidArgumentError, path)
        assert "it has inline data at file bytes 0..99" in message
    else:
        assert len(proven(bed.dev.device_path, path)) == 1


@ALL
def test_unwritten_extents_are_refused_but_preallocation_past_eof_is_not(bed):
    path = bed.mnt / "preallocated"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 16 * BS)
    finally:
        os.close(fd)
    message = refusal(InvalidArgumentError, path)
    assert "it has an unwritten (preallocated, never written) extent at file bytes 0..65535" in message
    write_blocks(path, "prealloc", [0])
    message = refusal(InvalidArgumentError, path)   # block 0 is written now, the rest is not
    assert "unwritten" in message and "at file bytes 4096.." in message

    kept = bed.mnt / "keep-size"
    write_blocks(kept, "kept", range(2))
    fd = os.open(kept, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 * BS, 14 * BS) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    assert kept.stat().st_size == 2 * BS
    ranges = proven(bed.dev.device_path, kept)   # the unwritten space past EOF is not the file's data
    assert sum(n for _s, n in ranges) == 2 * BS // 512


# --------------------------------------------------------------------------- devices

@EXT4
def test_a_file_on_another_device_is_told_apart(bed, tmp_path):
    on_tmpfs = tmp_path / "on-tmpfs"
    on_tmpfs.write_bytes(b"x" * BS)
    with pytest.raises(UnsupportedFeatureError) as info:
        file_extents(str(on_tmpfs))
    assert info.value.errno == errno.EOPNOTSUPP and info.value.feature == "FIEMAP on tmpfs"
    assert "tmpfs cannot say where a file's data lies" in str(info.value)
    assert "is not on one block device" in refusal(UnsupportedFeatureError, on_tmpfs, file_device)

    with loop_devices(tmp_path, 16 * MiB) as (other,):
        fs.mkfs(other.path, "ext4")
        (tmp_path / "mnt").mkdir()
        fs.mount(other.path, str(tmp_path / "mnt"))
        path = tmp_path / "mnt" / "elsewhere"
        write_blocks(path, "elsewhere", range(8))
        assert file_device(str(path)) == other.rdev != bed.rdev
        proven(other.path, path)


@BTRFS
def test_btrfs_logical_addresses_are_translated_to_device_offsets(bed):
    """16 MiB outgrow the first data chunk (where logical and device offsets coincide) into the next."""
    path = bed.mnt / "big"
    write_blocks(path, "big", range(16 * MiB // BS))
    ranges = proven(bed.dev.device_path, path)
    assert file_device(str(path)) == bed.rdev != os.stat(path).st_dev
    device_bytes = []   # device offset of each file byte range, walking the ranges in file order
    at = 0
    for start, count in ranges:
        device_bytes.append((at, start * 512, count * 512))
        at += count * 512
    with open(path, "rb") as fh:
        raw = read_extents(fh.fileno(), "test", str(path), 16 * MiB)
    moved = [e for e in raw for f_at, d_at, n in device_bytes
             if f_at <= e.logical < f_at + n and d_at + e.logical - f_at != e.physical]
    assert moved, f"every extent's btrfs address equals its device offset; nothing was translated: {raw}"


@BTRFS
def test_btrfs_file_in_a_subvolume_maps(bed):
    """A subvolume has an anonymous st_dev of its own; the device and the chunk map are the same."""
    subvolume = bed.mnt / "subvolume"
    subprocess.run(["btrfs", "subvolume", "create", str(subvolume)], check=True, capture_output=True)
    path = subvolume / "inside"
    write_blocks(path, "sub", range(24))
    assert os.stat(path).st_dev != os.stat(bed.mnt).st_dev   # a different anonymous number
    assert file_device(str(path)) == bed.rdev
    proven(bed.dev.device_path, path)


# --------------------------------------------------------------------------- special filesystems

def test_ext4_inline_data_is_refused(tmp_path):
    with flakey_fs(tmp_path, "ext4", 16 * MiB, "-O inline_data") as bed:
        tiny = bed.mnt / "tiny"
        tiny.write_bytes(b"hello")
        assert "it has inline data at file bytes 0..4" in refusal(InvalidArgumentError, tiny)
        larger = bed.mnt / "larger"
        write_blocks(larger, "larger", range(3))
        proven(bed.dev.device_path, larger)


def test_btrfs_compressed_extents_are_refused(tmp_path):
    with flakey_fs(tmp_path, "btrfs", 128 * MiB, mount_options="compress=zlib") as bed:
        packed = bed.mnt / "compressible"
        packed.write_bytes(b"a" * MiB)
        assert "it has an encoded (compressed) extent at file bytes 0.." in \
            refusal(InvalidArgumentError, packed)
        noise = bed.mnt / "incompressible"   # compression does not pay: stored as it is
        noise.write_bytes(os.urandom(256 * 1024))
        proven(bed.dev.device_path, noise)


def test_btrfs_dup_maps_both_copies(tmp_path):
    with flakey_fs(tmp_path, "btrfs", 256 * MiB, "-d dup -m dup") as bed:
        path = bed.mnt / "twice"
        write_blocks(path, "dup", range(40))
        ranges = file_extents(str(path))
        fs.syncfs(str(bed.mnt))
        check_ranges(bed.dev.device_path, ranges)
        assert sum(n for _s, n in ranges) == 2 * 40 * BS // 512
        found = collections.Counter(blocks_in(read_device(bed.dev.device_path, ranges)))
        assert found == {("dup", i): 2 for i in range(40)}


def test_multi_device_btrfs_is_refused(tmp_path):
    with loop_devices(tmp_path, 128 * MiB, 128 * MiB) as (first, second):
        fs.mkfs(first.path, "btrfs", [second.path])
        (tmp_path / "mnt").mkdir()
        fs.mount(first.path, str(tmp_path / "mnt"), "btrfs", f"device={second.path}")
        path = tmp_path / "mnt" / "spread"
        write_blocks(path, "spread", range(16))
        for call in (file_extents, file_device):
            with pytest.raises(UnsupportedFeatureError) as info:
                call(str(path))
            assert "spans 2 devices" in str(info.value) and info.value.feature == "multi-device btrfs"


def test_xfs_realtime_file_is_refused(tmp_path):
    with loop_devices(tmp_path, 320 * MiB, 64 * MiB) as (data, rt):
        fs.mkfs(data.path, "xfs", ["-r", f"rtdev={rt.path}"])
        (tmp_path / "mnt").mkdir()
        fs.mount(data.path, str(tmp_path / "mnt"), "xfs", f"rtdev={rt.path}")
        path = tmp_path / "mnt" / "realtime"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:   # the realtime flag can only be set while the file is empty
            attr = bytearray(28)
            fcntl.ioctl(fd, FS_IOC_FSGETXATTR, attr)
            struct.pack_into("=I", attr, 0, struct.unpack_from("=I", attr)[0] | FS_XFLAG_REALTIME)
            fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr)
            os.write(fd, block("rt", 0) * 16)
        finally:
            os.close(fd)
        for call in (file_extents, file_device):
            assert "lies on the XFS realtime device" in refusal(UnsupportedFeatureError, path, call)
        regular = tmp_path / "mnt" / "regular"
        write_blocks(regular, "regular", range(4))
        assert file_device(str(regular)) == data.rdev
        proven(data.path, regular)
