"""Teardown finds and unmounts a device's mounts whatever their names: the kernel's mount table, for real.

The mount points hold the bytes the kernel escapes in /proc/self/mountinfo
(space, tab, newline, backslash), non-ASCII letters, and elsewhere in the
table a mount whose path is not UTF-8 at all.  Whether a path is a mount point
is judged by stat (the device number or the inode a path shows), not by the
parser under test.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dmflakey_ioctl import fs
from dmflakey_ioctl.errors import DeviceNotFoundError, DMFlakeyError
from dmflakey_ioctl.flakey import init_flakey, open_flakey
from dmflakey_ioctl.kernel import mountinfo

from .helpers import dm_names, unique_name

ODD = "mnt with  spaces\tand a tab, caf\u00e9 \u00fcber \u4e2d\u6587, back\\slash\\040, new\nline"
NOT_UTF8 = b"bind \xff\xfe-not-utf8 \\ x"


def loop_bound_to(image: Path) -> bool:
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if p.read_text().rstrip("\n").removesuffix(" (deleted)") == str(image):
                return True
        except OSError:
            continue
    return False


@pytest.fixture
def place(tmp_path):
    """(folder, name, mounts to undo); whatever a failed test left mounted or mapped is removed."""
    folder = Path(os.path.realpath(tmp_path))
    name = unique_name("dmfi-mnt")
    mounted: list[bytes] = []
    yield folder, name, mounted
    if name in dm_names():  # unmounts its mounts too
        open_flakey(name).teardown()
    for point in reversed(mounted):
        try:
            fs.umount(os.fsdecode(point))
        except DMFlakeyError as exc:
            # not a mount point (any more), or gone with the mount that held it: the wanted state
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise


def same_inode(a, b) -> bool:
    """True when two paths show the same inode: a bind mount shows its source's."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_teardown_unmounts_a_mount_point_with_escaped_and_non_ascii_letters(place):
    folder, name, mounted = place
    # a mount elsewhere whose path (and bind source) is not UTF-8: it must not break the reading
    source, other = bytes(folder) + b"/src-\xe9\xff", bytes(folder) + b"/" + NOT_UTF8
    os.mkdir(source)
    os.mkdir(other)
    fs.mount(os.fsdecode(source), os.fsdecode(other), options="bind")
    mounted.append(other)
    assert same_inode(source, other)

    dev = init_flakey(name, str(folder), "ext4", size=32 << 20)
    point = folder / ODD
    point.mkdir()
    mounted.append(bytes(point))
    dev.mount(str(point))
    assert os.path.ismount(point)
    (point / "file").write_text("x")
    rdev = os.stat(dev.device_path).st_rdev
    assert os.stat(point).st_dev == rdev   # the kernel shows this mount under the device's number
    assert mountinfo.mount_points_of(rdev) == [str(point)]

    dev.teardown()
    assert not os.path.ismount(point) and not (point / "file").exists()
    assert name not in dm_names() and not os.path.lexists(dev.device_path)
    assert not Path(dev.image_path).exists() and not loop_bound_to(Path(dev.image_path))
    assert same_inode(source, other)       # not ours: left mounted


def test_teardown_unmounts_every_mount_of_the_device_innermost_first(place):
    folder, name, mounted = place
    dev = init_flakey(name, str(folder), "ext4", size=32 << 20)
    rdev = os.stat(dev.device_path).st_rdev
    outer = folder / "outer \\ dir"
    outer.mkdir()
    dev.mount(str(outer))
    mounted.append(bytes(outer))
    inner = outer / "sub dir\t\u00e9"
    inner.mkdir()
    fs.mount(str(outer), str(inner), options="bind")   # the device again, on a point inside itself
    mounted.append(bytes(inner))
    assert os.stat(outer).st_dev == rdev and same_inode(outer, inner)
    assert mountinfo.mount_points_of(rdev) == [str(outer), str(inner)]
    dev.teardown()
    assert os.stat(outer).st_dev != rdev and not inner.exists()
    assert name not in dm_names() and not Path(dev.image_path).exists()


def test_teardown_unmounts_btrfs_whose_table_shows_an_anonymous_device(place):
    """btrfs reports an anonymous major:minor for its mounts: only the mount source names the device."""
    folder, name, mounted = place
    dev = init_flakey(name, str(folder), "btrfs", size=fs.MIN_SIZE[fs.FSType.BTRFS])
    point = folder / "btrfs m\u00f6unt\\point"
    point.mkdir()
    dev.mount(str(point))
    mounted.append(bytes(point))
    assert os.path.ismount(point)
    assert os.stat(point).st_dev != os.stat(dev.device_path).st_rdev   # the rule by number cannot see it
    dev.teardown()
    assert not os.path.ismount(point)
    assert name not in dm_names() and not Path(dev.image_path).exists()


def test_a_device_that_was_never_mounted_has_no_mount_points(place):
    folder, name, _ = place
    with init_flakey(name, str(folder), None, size=1 << 20) as dev:
        assert mountinfo.mount_points_of(os.stat(dev.device_path).st_rdev) == []
    assert name not in dm_names()
    with pytest.raises(DeviceNotFoundError):
        open_flakey(name)
