"""One exception hierarchy for everything the library refuses or the kernel rejects.

Every error is an :class:`OSError` that keeps the errno (0 when the library
refused before asking the kernel) and whose message names the operation, the
device and the cause, so that a failing test says what to fix.
"""

from __future__ import annotations

import errno as _errno
import os
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = [
    "DMFlakeyError",
    "PermissionDeniedError",
    "NotRootError",
    "KernelSupportError",
    "UnsupportedFeatureError",
    "DeviceExistsError",
    "DeviceNotFoundError",
    "DeviceBusyError",
    "InvalidArgumentError",
    "InvalidNameError",
    "InvalidTableError",
    "TableRejectedError",
    "LogFormatError",
    "LogFullError",
    "LeftAloneWarning",
    "ProgramNotFoundError",
    "ProgramFailedError",
    "opened",
    "program_start_error",
]


class DMFlakeyError(OSError):
    """Base class: ``operation``, ``device`` and ``cause`` are kept as attributes."""

    def __init__(self, operation: str, device: Optional[str], cause: str, err: int = 0,
                 **extra: str) -> None:
        self.operation = operation
        self.device = device
        self.cause = cause
        self._extra = extra
        for key, value in extra.items():
            setattr(self, key, value)
        where = f"{operation} {device}" if device else operation
        self.message = f"{where}: {cause}"
        if err:
            self.message += f" [{_errno.errorcode.get(err, err)}: {os.strerror(err)}]"
            super().__init__(err, self.message)
        else:
            super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def reframed(self, operation: str, device: Optional[str]) -> "DMFlakeyError":
        """The same error (class, errno, attributes) told as part of the caller's operation.

        ``file device /x: not on a block device`` met while switching a fault
        becomes ``drop_writes dev0: file device /x: not on a block device``.
        """
        where = f"{self.operation} {self.device}" if self.device else self.operation
        return type(self)(operation, device, f"{where}: {self.cause}", self.errno or 0,
                          **self._extra)

    def __reduce__(self):  # picklable, so errors cross multiprocessing boundaries intact
        args = (self.operation, self.device, self.cause, self.errno or 0)
        return (_rebuild, (type(self), args, self._extra))


def _rebuild(cls, args, extra):
    return cls(*args, **extra)


class PermissionDeniedError(DMFlakeyError, PermissionError):
    """The kernel said EACCES or EPERM although the caller is privileged.

    A device cgroup, a user namespace, a security module or a read-only
    backing device: the message says which cases fit the operation.
    """


class NotRootError(PermissionDeniedError):
    """The caller lacks CAP_SYS_ADMIN (device-mapper answers EACCES)."""


class KernelSupportError(DMFlakeyError):
    """A kernel module (dm-mod, dm-flakey, loop) is missing or not loaded."""


class UnsupportedFeatureError(KernelSupportError):
    """The running kernel's dm-flakey lacks a feature.

    Attributes ``feature``, ``since`` (the release that added it) and ``running``.
    """

    feature: str
    since: str
    running: str


class DeviceExistsError(DMFlakeyError, FileExistsError):
    """A device (or image file) with that name already exists."""


class DeviceNotFoundError(DMFlakeyError, FileNotFoundError):
    """No such device (the kernel answers ENXIO)."""


class DeviceBusyError(DMFlakeyError):
    """The device is open or mounted; close it and retry."""


class InvalidArgumentError(DMFlakeyError, ValueError):
    """Refused by the library before any ioctl: the kernel never saw it."""


class InvalidNameError(InvalidArgumentError):
    """A device name or uuid the kernel (or udev) would not accept."""


class InvalidTableError(InvalidArgumentError):
    """A table line the kernel would refuse."""


class TableRejectedError(DMFlakeyError):
    """The kernel refused a table; attribute ``kernel_log`` holds what it said in /dev/kmsg."""

    kernel_log: str


class LogFormatError(DMFlakeyError):
    """A dm-log-writes log that is not one, or is corrupt or truncated.

    Attribute ``offset``: the byte in the log file where the problem is.
    """

    offset: int


class LogFullError(DMFlakeyError):
    """A recording's log device ran out of space, so the log misses writes.

    Attributes ``log_size`` (bytes) and ``needed`` (about what the writes took).
    """

    log_size: int
    needed: int


class LeftAloneWarning(UserWarning):
    """Something the library would have removed was not provably its own, so it was kept."""


class ProgramNotFoundError(DMFlakeyError, FileNotFoundError):
    """A program the operation runs (``mkfs.<fs>``) is not installed.

    Attributes ``program`` (its name) and ``package`` (the Debian package that has it).
    """

    program: str
    package: str


class ProgramFailedError(DMFlakeyError):
    """A program ran and exited with a non-zero status.

    Attributes ``program``, ``returncode`` and ``output`` (what it wrote to
    stdout and stderr, interleaved); the message carries the last lines.
    """

    program: str
    returncode: int
    output: str


def program_start_error(operation: str, device: Optional[str], program: str,
                        exc: OSError) -> DMFlakeyError:
    """The error for a program that is there but could not be started, naming the real cause.

    ENOENT from exec of a file that exists means its interpreter (``#!`` line) or
    its ELF loader is missing; a file the start needed that is not the program
    (say ``/dev/null``) is named as such; the program itself is never blamed for
    a missing file it is not.
    """
    err = exc.errno or 0
    culprit = exc.filename if exc.filename not in (None, program) else None
    if culprit is not None:
        cause = f"cannot start {program}: {os.fsdecode(culprit)}: {os.strerror(err)}"
    elif err == _errno.ENOENT and os.path.exists(program):
        cause = (f"cannot start {program}: the file is there, but the interpreter on its #! line or "
                 f"its ELF loader is missing")
    elif err == _errno.ENOEXEC:
        cause = f"cannot start {program}: not an executable the kernel can run (no #! line, bad ELF)"
    elif err in (_errno.EACCES, _errno.EPERM):
        cause = (f"cannot start {program}: execution not permitted (no execute bit, a noexec mount, "
                 f"or a security policy)")
    else:
        cause = f"cannot start {program}"
    return DMFlakeyError(operation, device, cause, err)


@contextmanager
def opened(path: str, operation: str, cause: str = "cannot open it",
           flags: int = os.O_RDONLY) -> Iterator[int]:
    """A descriptor for path, closed on exit; a failed open is a DMFlakeyError with its errno."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise DMFlakeyError(operation, path, cause, exc.errno or 0) from None
    try:
        yield fd
    finally:
        os.close(fd)
