"""fs module against the real kernel: mkfs, mount, syncfs and umount on loop devices."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NamedTuple

import pytest

from dmflakey_ioctl import fs

from dmflakey_ioctl.kernel import loop
from dmflakey_ioctl.errors import DeviceBusyError, DMFlakeyError


class Bed(NamedTuple):
    device: str
    fs_type: fs.FSType
    mnt: Path


def mounts_under(root: Path) -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of every mount below root, innermost last."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _source, target, fstype, options = line.split()[:4]
        target = target.replace("\\040", " ")
        if Path(target) == root or root in Path(target).parents:
            found.append((target, fstype, options.split(",")))
    return found


@pytest.fixture
def bed(request, tmp_path):
    """A loop device over a sparse image of the type's minimum size, with a fresh filesystem."""
    fs_type = fs.FSType(request.param)
    image = tmp_path / "image"
    with open(image, "wb") as fh:
        fh.truncate(fs.MIN_SIZE[fs_type])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop.attach(str(image)) as dev:
        try:
            fs.mkfs(dev.path, fs_type)
            yield Bed(dev.path, fs_type, mnt)
        finally:
            for target, _type, _options in reversed(mounts_under(tmp_path)):
                fs.umount(target)


ALL = pytest.mark.parametrize("bed", [t.value for t in fs.FSType], indirect=True)
EXT4 = pytest.mark.parametrize("bed", ["ext4"], indirect=True)


@ALL
def test_detect_mount_write_sync_remount_read(bed):
    assert fs.detect_fs(bed.device) is bed.fs_type
    fs.mount(bed.device, str(bed.mnt))
    assert [m[1] for m in mounts_under(bed.mnt)] == [bed.fs_type.value]
    (bed.mnt / "file").write_bytes(b"survives a remount\n" * 1000)
    fs.syncfs(str(bed.mnt))
    fs.syncfs(str(bed.mnt / "file"))
    fs.umount(str(bed.mnt))
    assert mounts_under(bed.mnt) == []

    fs.mount(bed.device, str(bed.mnt), bed.fs_type.value, "ro,noatime")
    [(_target, fstype, options)] = mounts_under(bed.mnt)
    assert fstype == bed.fs_type.value and "ro" in options and "noatime" in options
    assert (bed.mnt / "file").read_bytes() == b"survives a remount\n" * 1000
    fs.umount(str(bed.mnt))


@EXT4
def test_data_options_reach_the_filesystem(bed):
    fs.mount(bed.device, str(bed.mnt), fs.FSType.EXT4, "nodev,commit=1000,data=journal")
    [(_target, _type, options)] = mounts_under(bed.mnt)
    assert {"rw", "nodev", "commit=1000", "data=journal"} <= set(options)


@EXT4
def test_remount_read_only_and_back(bed):
    fs.mount(bed.device, str(bed.mnt))
    fs.mount(bed.device, str(bed.mnt), options="remount,ro")
    assert "ro" in mounts_under(bed.mnt)[0][2]
    with pytest.raises(OSError) as info:
        (bed.mnt / "x").write_text("x")
    assert info.value.errno == errno.EROFS
    fs.mount(bed.device, str(bed.mnt), options="remount,rw")
    (bed.mnt / "x").write_text("x")
    assert len(mounts_under(bed.mnt)) == 1


@pytest.mark.parametrize("bed", ["xfs"], indirect=True)
def test_xfs_is_told_not_to_retry_failed_writes(bed):
    fs.mount(bed.device, str(bed.mnt))
    rdev = os.stat(bed.device).st_rdev
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))
    assert name.startswith("loop")
    error = Path(f"/sys/fs/xfs/{name}/error")
    assert (error / "fail_at_unmount").read_text().strip() == "1"
    assert (error / "metadata/EIO/max_retries").read_text().strip() == "0"
    for klass in ("ENOSPC", "ENODEV", "default"):
        knob = error / "metadata" / klass / "max_retries"
        if knob.exists():
            assert knob.read_text().strip() == "0", knob


@pytest.mark.parametrize("fs_type", [None, "ext4"])
def test_mount_of_a_missing_device_keeps_enoent(tmp_path, fs_type):
    missing = str(tmp_path / "no-such-device")
    with pytest.raises(DMFlakeyError) as info:
        fs.mount(missing, str(tmp_path), fs_type)
    assert info.value.errno == errno.ENOENT
    assert info.value.operation == "mount" and info.value.device == missing
    assert "No such file or directory" in str(info.value)
    if fs_type:  # the kernel's answer, not the superblock probe's
        assert "the device does not exist" in str(info.value)
    assert mounts_under(tmp_path) == []


@EXT4
def test_mount_on_a_missing_mount_point_says_which_is_missing(bed):
    with pytest.raises(DMFlakeyError, match="the mount point does not exist") as info:
        fs.mount(bed.device, str(bed.mnt / "missing"))
    assert info.value.errno == errno.ENOENT


@EXT4
def test_mount_of_an_exclusively_held_device_is_busy(bed):
    holder = os.open(bed.device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(DeviceBusyError) as info:
            fs.mount(bed.device, str(bed.mnt))
    finally:
        os.close(holder)
    assert info.value.errno == errno.EBUSY and str(bed.mnt) in str(info.value)
    fs.mount(bed.device, str(bed.mnt))


def test_umount_of_a_plain_directory_is_einval(tmp_path):
    with pytest.raises(DMFlakeyError) as info:
        fs.umount(str(tmp_path))
    assert not isinstance(info.value, DeviceBusyError)
    assert info.value.errno == errno.EINVAL and str(tmp_path) in str(info.value)


@EXT4
def test_umount_with_an_open_file_is_busy_until_it_is_closed(bed):
    fs.mount(bed.device, str(bed.mnt))
    fh = open(bed.mnt / "held", "w")
    try:
        with pytest.raises(DeviceBusyError) as info:
            fs.umount(str(bed.mnt), retries=3, delay=0.01)
        assert info.value.errno == errno.EBUSY
        assert "4 attempts" in str(info.value) and str(bed.mnt) in str(info.value)
        assert len(mounts_under(bed.mnt)) == 1
    finally:
        fh.close()
    fs.umount(str(bed.mnt))
    assert mounts_under(bed.mnt) == []


def test_syncfs_of_a_missing_path_keeps_enoent(tmp_path):
    with pytest.raises(DMFlakeyError) as info:
        fs.syncfs(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
