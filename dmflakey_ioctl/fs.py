"""Filesystems on the test device: make, detect, mount, unmount and sync them.

The library runs no program but ``mkfs.<fs>``: mount, umount and syncfs are
libc calls through ctypes (so no util-linux is needed and the errno reaches the
caller, which matters when a fault turns a sync into EIO), and the filesystem
type is read from the superblock instead of asking blkid.  XFS is told to give
up on failed metadata writes at unmount, or an unmount after write faults
retries forever.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import os
import struct
import time
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, Union

from .errors import (DeviceBusyError, DMFlakeyError, InvalidArgumentError, NotRootError,
                     ProgramFailedError, ProgramNotFoundError, opened, program_start_error)

# ctypes, subprocess, shlex and shutil are imported where they are used: together they
# were a sixth of `import dmflakey_ioctl`, and most programs never mkfs or mount.
if TYPE_CHECKING:
    import ctypes

__all__ = ["FSType", "MIN_SIZE", "check_fs_type", "mkfs", "detect_fs", "mount", "umount", "syncfs",
           "shut_down", "parse_mount_options"]

MiB = 1 << 20
FS_IOC_SHUTDOWN = 0x8004587D    # _IOR('X', 125, __u32): ext4 (4.10), xfs; not btrfs in 6.12
SHUTDOWN_NOLOGFLUSH = 2         # EXT4_GOING_FLAGS_NOLOGFLUSH, XFS_FSOP_GOING_FLAGS_NOLOGFLUSH


class FSType(str, enum.Enum):
    """Filesystems the library can make, detect and mount."""

    EXT4 = "ext4"
    XFS = "xfs"
    BTRFS = "btrfs"


# The smallest image each mkfs accepts (seen: xfs refuses 299 MiB, btrfs needs 114294784 bytes).
MIN_SIZE: Dict[FSType, int] = {FSType.EXT4: 16 * MiB, FSType.XFS: 320 * MiB, FSType.BTRFS: 115 * MiB}

# Force (old signatures, regular files) and quiet, for every mkfs.
_MKFS_FLAGS = {FSType.EXT4: ["-F", "-q"], FSType.XFS: ["-f", "-q"], FSType.BTRFS: ["-f", "-q"]}
_PACKAGE = {FSType.EXT4: "e2fsprogs", FSType.XFS: "xfsprogs", FSType.BTRFS: "btrfs-progs"}
# Searched after PATH: mkfs lives in sbin, which a non-root PATH often lacks.
_SBIN_DIRS: Tuple[str, ...] = ("/sbin", "/usr/sbin")

# (offset, magic) per filesystem.  ext2 and ext3 share ext4's magic; the ext4 driver mounts them.
_MAGIC = [
    (FSType.XFS, 0, b"XFSB"),
    (FSType.EXT4, 1080, b"\x53\xef"),
    (FSType.BTRFS, 65600, b"_BHRfS_M"),
]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# word -> (bits to set, bits to clear), as mount(8) translates them
_FLAG_WORDS: Dict[str, Tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
    "silent": (MS_SILENT, 0), "loud": (0, MS_SILENT),
    "remount": (MS_REMOUNT, 0),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
}

# XFS error classes whose retries are turned off; EIO must exist, the others may not.
_XFS_ERROR_CLASSES = ("EIO", "ENOSPC", "ENODEV", "default")
_UMOUNT_MAX_DELAY = 0.5


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    """libc with errno capture; the process's own symbols, so no ldconfig run to find it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    libc.syncfs.argtypes = [ctypes.c_int]
    libc.syncfs.restype = ctypes.c_int
    return libc


def _errno() -> int:
    """errno of the last libc call made through _libc()."""
    import ctypes
    return ctypes.get_errno()


def check_fs_type(value: Union[FSType, str], operation: str, device: str) -> FSType:
    try:
        return FSType(value)
    except ValueError:
        known = ", ".join(t.value for t in FSType)
        raise InvalidArgumentError(operation, device,
                                   f"unknown filesystem type {value!r} (known: {known})") from None


def mkfs(device: str, fs_type: Union[FSType, str],
         options: Union[Sequence[str], str, None] = None) -> None:
    """Make a filesystem on device (a block device or an image file), overwriting what is there.

    options are extra mkfs arguments, a list or a shell-like string.  stdin is
    an empty pipe, not /dev/null, so that a /dev without a null node (an empty
    tmpfs in a container) does not stop mkfs.  ProgramNotFoundError when mkfs.<fs>
    is not installed, ProgramFailedError (with its output) when it fails.
    """
    import shlex
    import shutil
    import subprocess
    fs = check_fs_type(fs_type, "mkfs", device)
    extra = shlex.split(options) if isinstance(options, str) else list(options or [])
    name = f"mkfs.{fs.value}"
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN_DIRS])
    program = shutil.which(name, path=search)
    if program is None:
        raise ProgramNotFoundError("mkfs", device, f"{name} not found in PATH or "
                                   f"{':'.join(_SBIN_DIRS)}; install the Debian package "
                                   f"{_PACKAGE[fs]}", errno.ENOENT, program=name, package=_PACKAGE[fs])
    try:
        result = subprocess.run([program, *_MKFS_FLAGS[fs], *extra, device], input=b"",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "LC_ALL": "C"})
    except OSError as exc:
        raise program_start_error("mkfs", device, program, exc) from None
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-5:])
        raise ProgramFailedError("mkfs", device, f"{name} failed with exit status {result.returncode}: "
                                 f"{tail or 'no output'}", program=program,
                                 returncode=result.returncode, output=output)


def _detect(device: str, operation: str) -> Optional[FSType]:
    with opened(device, operation, "cannot open the device to read its superblock") as fd:
        try:
            for fs, offset, magic in _MAGIC:
                if os.pread(fd, len(magic), offset) == magic:
                    return fs
            return None
        except OSError as exc:
            raise DMFlakeyError(operation, device, "cannot read the superblock", exc.errno) from None


def detect_fs(device: str) -> Optional[FSType]:
    """The filesystem whose superblock magic is on device, or None."""
    return _detect(device, "detect filesystem")


def parse_mount_options(options: str) -> Tuple[int, str]:
    """Split a mount(8)-style option string into MS_* flags and the filesystem's data string."""
    flags, data = 0, []
    for word in (w.strip() for w in options.split(",")):
        if not word:
            continue
        if word in _FLAG_WORDS:
            set_bits, clear_bits = _FLAG_WORDS[word]
            flags = (flags & ~clear_bits) | set_bits
        else:
            data.append(word)
    return flags, ",".join(data)


def mount(device: str, target: str, fs_type: Union[FSType, str, None] = None, options: str = "") -> None:
    """Mount device on target (mount(2)); fs_type None reads it from the superblock.

    An XFS mount is configured to fail, not retry forever, on metadata write
    errors, so that unmounting after write faults cannot hang.
    """
    flags, data = parse_mount_options(options)
    if fs_type is not None:
        fs: Optional[FSType] = check_fs_type(fs_type, "mount", device)
    elif flags & (MS_BIND | MS_REMOUNT):
        fs = None  # the kernel ignores the type of a bind mount or a remount
    else:
        fs = _detect(device, "mount")
        if fs is None:
            raise InvalidArgumentError("mount", device, "no ext4, xfs or btrfs superblock found; "
                                       "make a filesystem first or pass fs_type")
    fs_name = fs.value if fs is not None else None
    libc = _libc()
    if libc.mount(os.fsencode(device), os.fsencode(target), fs_name.encode() if fs_name else None,
                  flags, data.encode() if data else None) != 0:
        err = _errno()
        cause = f"cannot mount on {target} as {fs_name or 'its current type'}"
        if err == errno.EBUSY:
            raise DeviceBusyError("mount", device, f"{cause}: already mounted or held by another user", err)
        if err == errno.EPERM:
            raise NotRootError("mount", device, f"{cause}: mounting needs root", err)
        if err == errno.ENOENT:
            missing = "mount point" if os.path.exists(device) else "device"
            cause += f": the {missing} does not exist"
        raise DMFlakeyError("mount", device, cause, err)
    if fs is FSType.XFS and not flags & (MS_BIND | MS_REMOUNT):
        try:
            _xfs_fail_fast(device)
        except OSError as exc:
            umount(target)
            raise DMFlakeyError("mount", device, f"cannot configure XFS error handling ({exc}); "
                                "unmounted again", exc.errno or 0) from None


def _sysfs_name(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))


def _xfs_fail_fast(device: str) -> None:
    base = f"/sys/fs/xfs/{_sysfs_name(device)}/error"
    with open(f"{base}/fail_at_unmount", "w") as fh:
        fh.write("1")
    for klass in _XFS_ERROR_CLASSES:
        path = f"{base}/metadata/{klass}/max_retries"
        if klass == "EIO" or os.path.exists(path):
            with open(path, "w") as fh:
                fh.write("0")


def umount(target: str, *, retries: int = 20, delay: float = 0.05) -> None:
    """Unmount target (umount2, no lazy detach), retrying EBUSY up to retries times.

    The pause between attempts doubles from delay up to 0.5 s.
    """
    libc = _libc()
    path = os.fsencode(target)
    for attempt in range(max(retries, 0) + 1):
        if libc.umount2(path, 0) == 0:
            return
        err = _errno()
        if err != errno.EBUSY:
            break
        if attempt < retries:
            time.sleep(min(delay * 2 ** attempt, _UMOUNT_MAX_DELAY))
    else:
        raise DeviceBusyError("umount", target, f"still busy after {max(retries, 0) + 1} attempts: "
                              "a process has a file or directory open inside", err)
    if err == errno.EINVAL:
        raise DMFlakeyError("umount", target, "not a mount point", err)
    if err == errno.EPERM:
        raise NotRootError("umount", target, "unmounting needs root", err)
    raise DMFlakeyError("umount", target, "cannot unmount", err)


def syncfs(path: str) -> None:
    """Write back the whole filesystem that holds path (syncfs(2)); EIO is kept in the error."""
    with opened(path, "syncfs", "cannot open") as fd:
        if _libc().syncfs(fd) != 0:
            raise DMFlakeyError("syncfs", path, "writeback of the filesystem failed", _errno())


def shut_down(path: str) -> bool:
    """Stop the filesystem mounted at path, its log unflushed (FS_IOC_SHUTDOWN): writes fail.

    For a mount that is thrown away, such as a crash state's view: its unmount
    then writes back nothing that was pending (ext4 still writes a few metadata
    blocks, its super block among them).  False where the filesystem has no
    such ioctl (btrfs in 6.12, for one).
    """
    with opened(path, "shut down", "cannot open the mount point") as fd:
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("=I", SHUTDOWN_NOLOGFLUSH))
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise DMFlakeyError("shut down", path, "FS_IOC_SHUTDOWN failed", exc.errno) from None
    return True
