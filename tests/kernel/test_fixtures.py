"""The pytest fixtures as a downstream suite uses them: devices come only from `flakey` and
`flakey_factory`, and a power failure loses what was not synced."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from .helpers import write_file

SYNCED = b"fsync()ed before the power cut\n" * 100
UNSYNCED = b"never synced\n" * 100
# ext4 commits its journal every 5 s by default, which could make unsynced data durable
OPTIONS = {"ext4": "commit=1000", "xfs": ""}
BLOCK = 4096
OFFSET = 1 << 20


def direct_read(device: str) -> bytes:
    """BLOCK bytes at OFFSET read with O_DIRECT: what the device returns, not the page cache."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BLOCK)
        assert os.preadv(fd, [buf], OFFSET) == BLOCK
        return bytes(buf)
    finally:
        os.close(fd)


def loses_unsynced(dev, mnt: Path, options: str) -> None:
    mnt.mkdir()
    dev.mount(str(mnt), options)
    write_file(mnt / "synced", SYNCED, sync=True)
    write_file(mnt / "unsynced", UNSYNCED, sync=False)
    dev.power_failure(str(mnt), options)
    assert (mnt / "synced").read_bytes() == SYNCED
    unsynced = mnt / "unsynced"
    assert not unsynced.exists() or unsynced.read_bytes() != UNSYNCED


def test_flakey_is_a_ready_ext4_device(flakey, tmp_path):
    assert flakey.filesystem.value == "ext4"
    assert Path(flakey.device_path).exists() and Path(flakey.image_path).parent == tmp_path
    assert not flakey.table().fault.drop_writes and flakey.table().fault.down_interval == 0
    loses_unsynced(flakey, tmp_path / "mnt", OPTIONS["ext4"])


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_factory_power_failure(flakey_factory, tmp_path, fs_type):
    dev = flakey_factory(fs_type=fs_type)
    assert dev.filesystem.value == fs_type
    loses_unsynced(dev, tmp_path / "mnt", OPTIONS[fs_type])


def test_factory_names_sizes_and_options(flakey_factory, tmp_path):
    first = flakey_factory(name=f"dmfl-fixture-{os.getpid()}", size=32 << 20,
                           mkfs_options=["-L", "fixturetest"])
    second = flakey_factory(fs_type=None)
    assert first.name == f"dmfl-fixture-{os.getpid()}" and second.name != first.name
    assert first.sectors * 512 == 32 << 20 and second.filesystem is None
    with open(first.device_path, "rb") as fh:
        fh.seek(1024 + 120)  # ext4 superblock: s_volume_name
        assert fh.read(16).rstrip(b"\0") == b"fixturetest"
    # a fault on one device leaves the other alone: the second fails writes, the first's land
    second.error_writes()
    data = os.urandom(BLOCK)
    fd = os.open(first.device_path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert direct_read(first.device_path) == data          # from the device, past the page cache
    with open(first.image_path, "rb") as fh:              # and in the file behind the loop device
        fh.seek(OFFSET)
        assert fh.read(BLOCK) == data
    fd = os.open(second.device_path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BLOCK)                         # page-aligned, as O_DIRECT wants
        buf.write(data)
        with pytest.raises(OSError) as failed:
            os.pwritev(fd, [buf], OFFSET)
        assert failed.value.errno == errno.EIO             # the fault is really on, there
    finally:
        os.close(fd)
