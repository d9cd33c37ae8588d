"""The pytest fixtures as a downstream suite uses them: devices come only from `flakey` and
`flakey_factory`, and a power failure loses what was not synced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SYNCED = b"fsync()ed before the power cut\n" * 100
UNSYNCED = b"never synced\n" * 100
# ext4 commits its journal every 5 s by default, which could make unsynced data durable
OPTIONS = {"ext4": "commit=1000", "xfs": ""}


def write(path: Path, data: bytes, sync: bool) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    if sync:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def loses_unsynced(dev, mnt: Path, options: str) -> None:
    mnt.mkdir()
    dev.mount(str(mnt), options)
    write(mnt / "synced", SYNCED, sync=True)
    write(mnt / "unsynced", UNSYNCED, sync=False)
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
    # a fault on one device leaves the other alone
    second.error_writes()
    fd = os.open(first.device_path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
