"""fs module without root: option parsing, type checks, superblock detection, mkfs."""

import errno
import os
import shutil
import sys

import pytest

from dmflakey_ioctl import fs
from dmflakey_ioctl.errors import (DMFlakeyError, InvalidArgumentError, ProgramFailedError,
                                   ProgramNotFoundError)


@pytest.mark.parametrize("options, flags, data", [
    ("", 0, ""),
    ("ro,noatime,commit=1000", fs.MS_RDONLY | fs.MS_NOATIME, "commit=1000"),
    ("ro,rw", 0, ""),
    ("rw,ro", fs.MS_RDONLY, ""),
    ("nosuid,nodev,noexec,sync,dirsync", fs.MS_NOSUID | fs.MS_NODEV | fs.MS_NOEXEC | fs.MS_SYNCHRONOUS
     | fs.MS_DIRSYNC, ""),
    ("sync,async", 0, ""),
    ("nodiratime,relatime,strictatime,lazytime", fs.MS_NODIRATIME | fs.MS_RELATIME | fs.MS_STRICTATIME
     | fs.MS_LAZYTIME, ""),
    ("remount,ro", fs.MS_REMOUNT | fs.MS_RDONLY, ""),
    ("bind", fs.MS_BIND, ""),
    ("rbind", fs.MS_BIND | fs.MS_REC, ""),
    ("defaults,noatime", fs.MS_NOATIME, ""),
    (" data=ordered , ro,,errors=remount-ro ", fs.MS_RDONLY, "data=ordered,errors=remount-ro"),
    ("nouuid,logbsize=256k", 0, "nouuid,logbsize=256k"),
])
def test_option_string_splits_into_flags_and_data(options, flags, data):
    assert fs.parse_mount_options(options) == (flags, data)


def test_flag_values_match_linux_mount_h():
    assert (fs.MS_RDONLY, fs.MS_NOSUID, fs.MS_NODEV, fs.MS_NOEXEC, fs.MS_SYNCHRONOUS, fs.MS_REMOUNT) == \
        (1, 2, 4, 8, 16, 32)
    assert (fs.MS_DIRSYNC, fs.MS_NOATIME, fs.MS_NODIRATIME, fs.MS_BIND, fs.MS_REC) == \
        (128, 1024, 2048, 4096, 16384)
    assert (fs.MS_RELATIME, fs.MS_STRICTATIME, fs.MS_LAZYTIME) == (1 << 21, 1 << 24, 1 << 25)


def test_fs_type_is_a_string_enum():
    assert fs.FSType("xfs") is fs.FSType.XFS
    assert fs.FSType.BTRFS == "btrfs"
    assert set(fs.MIN_SIZE) == set(fs.FSType)
    assert fs.MIN_SIZE[fs.FSType.BTRFS] >= 114294784 and fs.MIN_SIZE[fs.FSType.BTRFS] % (1 << 20) == 0


@pytest.mark.parametrize("call", [
    lambda dev: fs.mkfs(dev, "vfat"),
    lambda dev: fs.mkfs(dev, "EXT4"),
    lambda dev: fs.mount(dev, "/nonexistent-target", "ntfs"),
])
def test_unknown_fs_type_is_refused_before_anything_runs(tmp_path, call):
    dev = str(tmp_path / "img")
    with pytest.raises(InvalidArgumentError) as info:
        call(dev)
    assert info.value.errno is None
    assert dev in str(info.value) and "unknown filesystem type" in str(info.value)
    assert not (tmp_path / "img").exists()


def image_with(tmp_path, offset, magic, size=128 << 10):
    path = tmp_path / "img"
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.seek(offset)
        fh.write(magic)
    return str(path)


@pytest.mark.parametrize("offset, magic, expected", [
    (1080, b"\x53\xef", fs.FSType.EXT4),
    (0, b"XFSB", fs.FSType.XFS),
    (65600, b"_BHRfS_M", fs.FSType.BTRFS),
    (1080, b"\xef\x53", None),  # the ext magic is little-endian
    (65601, b"_BHRfS_M", None),
])
def test_detect_fs_reads_the_superblock_magic(tmp_path, offset, magic, expected):
    assert fs.detect_fs(image_with(tmp_path, offset, magic)) is expected


def test_detect_fs_of_short_and_empty_files(tmp_path):
    assert fs.detect_fs(image_with(tmp_path, 0, b"", size=0)) is None
    assert fs.detect_fs(image_with(tmp_path, 1080, b"\x53\xef", size=1082)) is fs.FSType.EXT4


def test_detect_fs_of_a_missing_file_keeps_enoent(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(DMFlakeyError) as info:
        fs.detect_fs(missing)
    assert info.value.errno == errno.ENOENT and missing in str(info.value)


def test_mount_refuses_an_unformatted_image_before_the_kernel(tmp_path):
    dev = image_with(tmp_path, 0, b"")
    with pytest.raises(InvalidArgumentError, match="no ext4, xfs or btrfs superblock"):
        fs.mount(dev, str(tmp_path))


@pytest.mark.parametrize("fs_type, package", [("ext4", "e2fsprogs"), (fs.FSType.XFS, "xfsprogs"),
                                              ("btrfs", "btrfs-progs")])
def test_mkfs_missing_program_names_the_package(tmp_path, monkeypatch, fs_type, package):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(fs, "_SBIN_DIRS", ())
    dev = image_with(tmp_path, 0, b"", size=16 << 20)
    with pytest.raises(ProgramNotFoundError) as info:
        fs.mkfs(dev, fs_type)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DMFlakeyError)
    assert info.value.errno == errno.ENOENT
    assert f"mkfs.{fs.FSType(fs_type).value} not found" in str(info.value)
    assert package in str(info.value) and dev in str(info.value)
    assert (info.value.program, info.value.package) == (f"mkfs.{fs.FSType(fs_type).value}", package)


def test_mkfs_is_found_in_sbin_when_path_lacks_it(tmp_path, monkeypatch):
    if not any(shutil.which("mkfs.ext4", path=d) for d in fs._SBIN_DIRS):
        pytest.skip("no mkfs.ext4 in /sbin or /usr/sbin")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    dev = image_with(tmp_path, 0, b"", size=fs.MIN_SIZE[fs.FSType.EXT4])
    fs.mkfs(dev, "ext4")
    assert fs.detect_fs(dev) is fs.FSType.EXT4


def test_real_mkfs_ext4_on_a_sparse_file(tmp_path):
    dev = image_with(tmp_path, 0, b"", size=fs.MIN_SIZE[fs.FSType.EXT4])
    assert fs.detect_fs(dev) is None
    fs.mkfs(dev, fs.FSType.EXT4, "-L 'test label' -O ^has_journal")
    assert fs.detect_fs(dev) is fs.FSType.EXT4
    with open(dev, "rb") as fh:  # the label landed in the superblock: the options were passed
        fh.seek(1024 + 120)
        assert fh.read(16).rstrip(b"\0") == b"test label"


def test_mkfs_failure_carries_the_tail_of_stderr(tmp_path):
    dev = image_with(tmp_path, 0, b"", size=fs.MIN_SIZE[fs.FSType.EXT4])
    with pytest.raises(ProgramFailedError) as info:
        fs.mkfs(dev, "ext4", ["-O", "nosuchfeature"])
    assert info.value.returncode == 1 and "nosuchfeature" in info.value.output
    assert "mkfs.ext4 failed with exit status 1" in str(info.value)
    assert "Invalid filesystem option set: nosuchfeature" in str(info.value)
    assert info.value.operation == "mkfs" and info.value.device == dev


def test_mkfs_of_a_missing_file_says_so(tmp_path):
    dev = str(tmp_path / "missing")
    with pytest.raises(DMFlakeyError, match="does not exist"):
        fs.mkfs(dev, "ext4")


@pytest.mark.parametrize("fs_type", list(fs.FSType))
def test_reformatting_changes_what_detect_fs_sees(tmp_path, fs_type):
    if not shutil.which(f"mkfs.{fs_type.value}", path=":".join(fs._SBIN_DIRS)):
        pytest.skip(f"no mkfs.{fs_type.value} on this host")
    dev = image_with(tmp_path, 0, b"", size=fs.MIN_SIZE[fs.FSType.XFS])
    for previous in fs.FSType:
        if previous is not fs_type and shutil.which(f"mkfs.{previous.value}", path=":".join(fs._SBIN_DIRS)):
            fs.mkfs(dev, previous)
    fs.mkfs(dev, fs_type)
    assert fs.detect_fs(dev) is fs_type


# ---- fake mkfs programs: what the library does when the program is odd --------------------------------

def fake_mkfs(tmp_path, monkeypatch, content: bytes, mode: int = 0o755) -> str:
    """A PATH holding only mkfs.ext4 with this content; /sbin is not searched."""
    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / "mkfs.ext4"
    program.write_bytes(content)
    program.chmod(mode)
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr(fs, "_SBIN_DIRS", ())
    return str(program)


def test_a_failing_program_is_program_failed_with_its_output_tail(tmp_path, monkeypatch):
    lines = "".join(f"echo line {i}\n" for i in range(10))
    program = fake_mkfs(tmp_path, monkeypatch, f"#!/bin/sh\n{lines}echo 'bad superblock' >&2\nexit 3\n"
                        .encode())
    dev = image_with(tmp_path, 0, b"")
    with pytest.raises(ProgramFailedError) as info:
        fs.mkfs(dev, "ext4")
    err = info.value
    assert not isinstance(err, FileNotFoundError) and err.errno is None
    assert (err.program, err.returncode) == (program, 3)
    assert err.output.splitlines() == [f"line {i}" for i in range(10)] + ["bad superblock"]
    assert str(err) == (f"mkfs {dev}: mkfs.ext4 failed with exit status 3: line 6 | line 7 | line 8 | "
                        "line 9 | bad superblock")


def test_mkfs_stdin_is_an_empty_pipe_so_no_dev_null_is_needed(tmp_path, monkeypatch):
    """subprocess.DEVNULL opens os.devnull: point that nowhere, as an empty tmpfs /dev does."""
    record = tmp_path / "stdin"
    script = (f"#!{sys.executable}\nimport os, sys\nwith open({str(record)!r}, 'w') as fh:\n"
              f"    fh.write(os.readlink('/proc/self/fd/0') + '\\n' + sys.stdin.read())\n")
    fake_mkfs(tmp_path, monkeypatch, script.encode())
    monkeypatch.setattr("os.devnull", str(tmp_path / "no-dev" / "null"))
    fs.mkfs(image_with(tmp_path, 0, b""), "ext4")
    assert record.read_text().startswith("pipe:[") and record.read_text().count("\n") == 1


@pytest.mark.parametrize("content, mode, err, words", [
    (b"\x7fELF\x02garbage", 0o755, errno.ENOEXEC, "not an executable"),
    (b"#!/nonexistent/interpreter\n", 0o755, errno.ENOENT, "interpreter on its #! line"),
])
def test_a_program_that_cannot_start_is_not_reported_missing(tmp_path, monkeypatch, content, mode, err,
                                                             words):
    program = fake_mkfs(tmp_path, monkeypatch, content, mode)
    dev = image_with(tmp_path, 0, b"")
    with pytest.raises(DMFlakeyError) as info:
        fs.mkfs(dev, "ext4")
    assert type(info.value) is DMFlakeyError and info.value.errno == err
    assert program in str(info.value) and words in str(info.value)
    assert "not found" not in str(info.value) and "install" not in str(info.value)


def test_a_program_without_execute_permission_is_named_as_such(tmp_path, monkeypatch):
    """shutil.which skips a file without x: start the found program, then take x away (a race)."""
    program = fake_mkfs(tmp_path, monkeypatch, b"#!/bin/sh\nexit 0\n")
    real_which = shutil.which

    def which_then_chmod(*args, **kwargs):
        found = real_which(*args, **kwargs)
        os.chmod(program, 0o644)
        return found

    monkeypatch.setattr(shutil, "which", which_then_chmod)
    dev = image_with(tmp_path, 0, b"")
    with pytest.raises(DMFlakeyError) as info:
        fs.mkfs(dev, "ext4")
    assert type(info.value) is DMFlakeyError and info.value.errno == errno.EACCES
    assert "execution not permitted" in str(info.value) and program in str(info.value)


def test_a_missing_file_that_is_not_the_program_is_named(tmp_path, monkeypatch):
    """The old failure: DEVNULL with no /dev/null blamed mkfs; such a cause names its own file."""
    from dmflakey_ioctl.errors import program_start_error
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/dev/null")
    err = program_start_error("mkfs", "/img", "/usr/sbin/mkfs.ext4", exc)
    assert str(err) == ("mkfs /img: cannot start /usr/sbin/mkfs.ext4: /dev/null: No such file or directory "
                        "[ENOENT: No such file or directory]")
    assert not isinstance(err, FileNotFoundError)
