"""Block device ioctls: size, logical block size, zeroing a range, dropping the page cache."""

from __future__ import annotations

import fcntl
import struct

from ..errors import DMFlakeyError, opened

__all__ = ["size", "logical_block_size", "zero_out", "flush_buffers",
           "BLKGETSIZE64", "BLKSSZGET", "BLKZEROOUT", "BLKFLSBUF"]

BLKGETSIZE64 = 0x80081272   # _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268          # _IO(0x12, 104)
BLKFLSBUF = 0x1261          # _IO(0x12, 97)
BLKZEROOUT = 0x127F         # _IO(0x12, 127), takes u64[2] = {start, length} in bytes
_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")
_RANGE = struct.Struct("=QQ")


def _ioctl(path: str, operation: str, request: int, arg: bytearray) -> bytearray:
    with opened(path, operation, "cannot open the device") as fd:
        try:
            fcntl.ioctl(fd, request, arg)
        except OSError as exc:
            raise DMFlakeyError(operation, path, "the ioctl failed", exc.errno) from None
    return arg


def size(path: str) -> int:
    """Size in bytes (BLKGETSIZE64)."""
    return _U64.unpack(_ioctl(path, "get size", BLKGETSIZE64, bytearray(8)))[0]


def logical_block_size(path: str) -> int:
    """The smallest unit the device addresses (BLKSSZGET): 512, or 4096 on a 4Kn device."""
    return _INT.unpack(_ioctl(path, "get block size", BLKSSZGET, bytearray(4)))[0]


def zero_out(fd: int, offset: int, length: int) -> None:
    """Make bytes offset..offset+length read back as zeros (BLKZEROOUT); raises OSError."""
    fcntl.ioctl(fd, BLKZEROOUT, bytearray(_RANGE.pack(offset, length)))


def flush_buffers(fd: int) -> None:
    """Drop the device's page cache (BLKFLSBUF): later reads see what the kernel wrote below it."""
    fcntl.ioctl(fd, BLKFLSBUF, 0)
