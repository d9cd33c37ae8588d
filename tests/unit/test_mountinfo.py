"""The mount table parser against synthetic mountinfo bytes written the way the kernel writes them.

The kernel's rules (fs/proc_namespace.c, proc(5)): fields are separated by one
space; a space, tab, newline or backslash in a path, the source or the type is
written as a 3-digit octal escape; every other byte (UTF-8 or not) is written
as it is; a variable number of optional fields ends with a lone "-".
"""

from __future__ import annotations

import os
import stat

import pytest

from dmflakey_ioctl.errors import DMFlakeyError
from dmflakey_ioctl.kernel import mountinfo


def escape(raw: bytes) -> bytes:
    """What the kernel writes for a path: the four special bytes as octal, the rest unchanged."""
    return b"".join(b"\\%03o" % b if b in b" \t\n\\" else bytes([b]) for b in raw)


def line(mount_id: int, parent: int, dev: str, root: bytes, point: bytes, optional: bytes = b"",
         fs_type: bytes = b"ext4", source: bytes = b"/dev/sda1", options: bytes = b"rw,relatime",
         super_options: bytes = b"rw") -> bytes:
    fields = [b"%d" % mount_id, b"%d" % parent, dev.encode(), escape(root), escape(point), options]
    if optional:
        fields.append(optional)
    fields += [b"-", escape(fs_type), escape(source), super_options]
    return b" ".join(fields) + b"\n"


ODD_POINTS = [
    b"/tmp/with space",
    b"/tmp/tab\there",
    b"/tmp/new\nline",
    b"/tmp/back\\slash",
    b"/tmp/\\040 is not a space",                    # a literal backslash-040 in the name
    "/tmp/caf\u00e9 \u4e2d\u6587 \U0001f642".encode(),  # non-ASCII UTF-8
    b"/tmp/latin1-\xe9\xff\xfe",                      # not UTF-8 at all
    b"/tmp/ -",                                        # a name that looks like the separator
    b"/tmp/-",
]


@pytest.mark.parametrize("raw", ODD_POINTS)
def test_odd_mount_points_round_trip_to_the_kernels_bytes(raw):
    data = line(40, 1, "253:3", b"/", raw)
    (mount,) = mountinfo.parse(data)
    assert os.fsencode(mount.mount_point) == raw      # what umount2() will be given
    assert mount.mount_point == os.fsdecode(raw)
    assert (mount.mount_id, mount.parent_id, mount.dev) == (40, 1, os.makedev(253, 3))
    assert (mount.fs_type, mount.source, mount.options) == ("ext4", "/dev/sda1", "rw,relatime")


def test_every_field_of_the_proc5_example():
    data = b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    assert mountinfo.parse(data) == [mountinfo.Mount(
        36, 35, os.makedev(98, 0), "/mnt1", "/mnt2", "rw,noatime", ("master:1",), "ext3", "/dev/root",
        "rw,errors=continue")]


def test_optional_fields_none_or_many():
    data = (line(1, 0, "0:21", b"/", b"/proc", fs_type=b"proc", source=b"proc")
            + line(2, 1, "8:1", b"/sub dir", b"/a", optional=b"shared:5 master:3 propagate_from:2 unbindable")
            + line(3, 1, "0:55", b"/", b"/b", fs_type=b"fuse.sshfs", source=b"user@host:/x y"))
    first, second, third = mountinfo.parse(data)
    assert first.optional == () and (first.fs_type, first.source) == ("proc", "proc")
    assert second.optional == ("shared:5", "master:3", "propagate_from:2", "unbindable")
    assert second.root == "/sub dir" and second.mount_point == "/a"
    assert (third.fs_type, third.source) == ("fuse.sshfs", "user@host:/x y")


def test_every_octal_escape_is_undone_and_nothing_else():
    data = b"7 1 0:5 /r\\043oot /m\\101\\040\\1x\\\\ rw - tmpfs src\\011x rw\n"
    (mount,) = mountinfo.parse(data)
    assert mount.root == "/r#oot"
    assert mount.mount_point == "/mA \\1x\\\\"   # incomplete escapes stay as the bytes they are
    assert mount.source == "src\tx"


def test_an_empty_source_keeps_the_fields_in_place():
    data = b"9 1 0:40 / /mnt rw - tmpfs  rw,size=4k\n"
    (mount,) = mountinfo.parse(data)
    assert (mount.fs_type, mount.source, mount.super_options) == ("tmpfs", "", "rw,size=4k")


def test_a_line_that_is_not_mountinfo_is_an_error_naming_it():
    with pytest.raises(DMFlakeyError, match="line 2 is not in mountinfo format"):
        mountinfo.parse(line(1, 0, "8:1", b"/", b"/") + b"1 0 8:1 / / rw ext4 /dev/sda1 rw\n")
    with pytest.raises(DMFlakeyError, match="major:minor"):
        mountinfo.parse(b"1 0 8-1 / / rw - ext4 /dev/sda1 rw\n")


def test_mount_points_of_a_device_in_order():
    rdev = os.makedev(253, 7)
    data = (line(1, 0, "8:1", b"/", b"/")
            + line(2, 1, "253:7", b"/", b"/mnt/outer dir")
            + line(3, 2, "0:30", b"/", b"/mnt/outer dir/tmp", fs_type=b"tmpfs", source=b"tmpfs")
            + line(4, 3, "253:7", b"/sub", b"/mnt/outer dir/tmp/inner\xff")
            + line(5, 1, "253:70", b"/", b"/mnt/other"))
    points = mountinfo.mount_points_of(rdev, mountinfo.parse(data))
    assert points == ["/mnt/outer dir", os.fsdecode(b"/mnt/outer dir/tmp/inner\xff")]


def _some_block_node() -> str | None:
    for entry in sorted(os.scandir("/dev"), key=lambda e: e.name):
        try:
            if stat.S_ISBLK(os.stat(entry.path).st_mode):
                return entry.path
        except OSError:
            continue
    return None


def test_a_mount_whose_source_is_the_device_node_counts_too(tmp_path):
    """btrfs shows an anonymous 0:N in field 3: the source path must then match the device."""
    node = _some_block_node()
    if node is None:
        pytest.skip("this host's /dev has no block device node to stand for the device")
    rdev = os.stat(node).st_rdev
    not_a_node = tmp_path / "file"
    not_a_node.write_bytes(b"")
    data = (line(1, 0, "0:61", b"/", b"/mnt/btrfs", fs_type=b"btrfs", source=node.encode())
            + line(2, 0, "0:62", b"/", b"/mnt/relative", fs_type=b"btrfs", source=node.encode()[1:])
            + line(3, 0, "0:63", b"/", b"/mnt/file", source=bytes(not_a_node))
            + line(4, 0, "0:64", b"/", b"/mnt/missing", source=b"/nonexistent/\xff"))
    assert mountinfo.mount_points_of(rdev, mountinfo.parse(data)) == ["/mnt/btrfs"]


def test_this_hosts_table_parses_and_agrees_with_stat():
    mounts = mountinfo.read()
    assert len({m.mount_id for m in mounts}) == len(mounts) > 1
    by_point = {m.mount_point: m for m in mounts}   # the last mount at a path is the visible one
    for point in ("/", "/proc"):
        assert by_point[point].dev == os.stat(point).st_dev, point
    assert by_point["/proc"].fs_type == "proc"


def test_an_unreadable_table_is_a_library_error(tmp_path):
    with pytest.raises(DMFlakeyError) as info:
        mountinfo.read(str(tmp_path / "missing"))
    assert info.value.errno == 2 and info.value.operation == "read mount table"
