"""Which features the running kernel's targets really have, found out by trying.

The flakey target has reported version 1.5.0 since about 4.13 while features
kept arriving, and a kernel can accept a table and still do nothing with it
(read-direction ``corrupt_bio_byte`` before a 2025 fix).  So a feature counts
as supported only when its EFFECT was seen: once per process, a scratch device
with the feature is made over a small memory-backed loop device (a memfd) and
read or written, and the outcome is cached.

Probe devices carry an owner uuid of kind ``probe`` and a random name, so a
killed process's probes are found by ``cleanup_stale`` and a later process
with the same pid never collides with them.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

from .errors import DMFlakeyError, UnsupportedFeatureError
from .kernel import dm, loop
from .ownership import Kind, Owner
from .tables.delay import DelayTable
from .tables.flakey import CorruptBIOByte, Direction, FlakeyTable, PROBABILITY_MAX

__all__ = ["FEATURE_SINCE", "PROBES", "Probe", "supported", "require", "needed", "reset_cache"]

# When each feature that a supported kernel may lack arrived.
FEATURE_SINCE: Dict[str, str] = {
    "error_reads": "Linux 6.4",
    "random_read_corrupt": "Linux 6.5",
    "random_write_corrupt": "Linux 6.5",
    "corrupt_bio_byte_read": ("the mid-2025 fix \"dm-flakey: make corrupting read bios work\" "
                              "(in the 6.6, 6.12 and 6.15 stable lines and later releases)"),
    "corrupt_bio_byte_write": ("Linux 6.5 (\"dm flakey: clone pages on write bio before corrupting "
                               "them\")"),
    "delay_flush": "Linux 4.19",
}
# How the lack shows, for the error message.
_LACK = {
    "error_reads": "this kernel's dm-flakey has no error_reads",
    "random_read_corrupt": "this kernel's dm-flakey has no random_read_corrupt",
    "random_write_corrupt": "this kernel's dm-flakey has no random_write_corrupt",
    "corrupt_bio_byte_read": "this kernel's dm-flakey accepts corrupt_bio_byte in the read direction "
                             "but corrupts nothing",
    "corrupt_bio_byte_write": "this kernel's dm-flakey corrupts the written data in the caller's "
                              "own memory (the page cache, an O_DIRECT buffer), not only on disk",
    "delay_flush": "this kernel's dm-delay has no separate flush delay",
}

_SCRATCH_BYTES = 64 * 1024
_PATTERN = 0xA5
_BLOCK = 4096
_FLUSH_PROBE_MS = 150

_cache: Dict[str, bool] = {}
_lock = threading.Lock()


def needed(table: object) -> List[str]:
    """The probed features a target table uses (the others exist on every kernel supported)."""
    if isinstance(table, DelayTable):
        return ["delay_flush"] if table.needs_flush_class else []
    if not isinstance(table, FlakeyTable):
        return []
    out = [f for f in ("error_reads", "random_read_corrupt", "random_write_corrupt")
           if getattr(table, f) not in (None, False)]
    corrupt = table.corrupt_bio_byte
    if corrupt is not None:
        out.append("corrupt_bio_byte_read" if corrupt.direction is Direction.READ
                   else "corrupt_bio_byte_write")
    return out


@contextmanager
def _scratch(table: Callable[[str], tuple]) -> Iterator[tuple[str, int]]:
    """A dm device with table(backing) over a memfd-backed loop device: (node path, memfd).

    The memfd starts filled with a pattern; everything is gone on exit.  The dm
    device comes first: without device-mapper nothing else is made.
    """
    name = f"dmflakey-probe-{os.urandom(6).hex()}"
    uuid = Owner.current(Kind.PROBE).uuid()
    dm.create(name, uuid=uuid)
    try:
        memfd = os.memfd_create("dmflakey-probe", os.MFD_CLOEXEC)
        try:
            os.write(memfd, bytes([_PATTERN]) * _SCRATCH_BYTES)
            lo = loop.attach_fd(memfd, "dmflakey-probe", autoclear=True)
            try:
                dm.load(dm.ByUuid(uuid, name), [table(lo.major_minor)])
            finally:
                lo.close()  # held by the table, autoclear frees it with the device; else now
            yield dm.resume(dm.ByUuid(uuid, name)).path, memfd
        finally:
            os.close(memfd)
    finally:
        dm.remove(dm.ByUuid(uuid, name))


def _io(path: str, write: Optional[bytes] = None) -> bytes:
    """One O_DIRECT block read (or write) of the device at path, through a page-aligned buffer."""
    buf = mmap.mmap(-1, _BLOCK)
    fd = os.open(path, (os.O_RDWR if write is not None else os.O_RDONLY) | os.O_DIRECT
                 | os.O_CLOEXEC)
    try:
        if write is not None:
            buf.write(write)
            os.pwritev(fd, [buf], 0)
        else:
            os.preadv(fd, [buf], 0)
        return bytes(buf)   # after a write: what the caller's buffer holds now
    finally:
        os.close(fd)
        buf.close()


def _flakey(**feature: object) -> Callable[[str], tuple]:
    return lambda backing: (0, _SCRATCH_BYTES // 512, "flakey",
                            FlakeyTable(backing, 0, 1, **feature).params())  # type: ignore[arg-type]


def _differs_from_pattern(data: bytes) -> bool:
    return data != bytes([_PATTERN]) * len(data)


@dataclass(frozen=True)
class Probe:
    """How to see a feature work: a table over the scratch loop device, and its expected effect.

    ``table(backing)`` gives ``(start, length, type, params)`` for a backing
    ``major:minor``; ``effect(path, memfd)`` looks at the scratch device at path
    (whose loop device reads and writes the memfd) and says whether the feature
    did what it should.
    """

    table: Callable[[str], tuple]
    effect: Callable[[str, int], bool]

    def run(self) -> bool:
        """True when the kernel took the table and the effect was seen; False when refused or inert."""
        try:
            with _scratch(self.table) as (path, memfd):
                return self.effect(path, memfd)
        except DMFlakeyError as exc:
            if exc.errno == errno.EINVAL:   # the kernel refused the table: no such feature
                return False
            raise


def _reads_fail(path: str, memfd: int) -> bool:
    try:
        _io(path)
    except OSError as exc:
        return exc.errno == errno.EIO
    return False


_ATTEMPTS = 3   # a random corruption may write the value that was there already (1 in 256)


def _reads_corrupted(path: str, memfd: int) -> bool:
    return any(_differs_from_pattern(_io(path)) for _ in range(_ATTEMPTS))


def _writes_corrupted(path: str, memfd: int) -> bool:
    for _ in range(_ATTEMPTS):
        _io(path, bytes([_PATTERN]) * _BLOCK)
        if _differs_from_pattern(os.pread(memfd, _BLOCK, 0)):
            return True
    return False


def _first_byte_read_as(value: int) -> Callable[[str, int], bool]:
    return lambda path, memfd: _io(path)[0] == value and os.pread(memfd, 1, 0)[0] == _PATTERN


def _write_corrupted_buffer_intact(path: str, memfd: int) -> bool:
    """The stored byte changed, and the caller's buffer did not (kernels before 6.5 corrupt the
    bio's pages in place: the caller's memory, a page cache page, a shared library's page)."""
    data = bytes([_PATTERN ^ 0x0F]) * _BLOCK
    left = _io(path, data)
    return os.pread(memfd, 1, 0)[0] == _PATTERN ^ 0xFF and left == data


def _flush_held_back(path: str, memfd: int) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        started = time.monotonic()
        os.fsync(fd)   # a flush of the device: held back by the flush delay alone
        return time.monotonic() - started >= _FLUSH_PROBE_MS / 1000 * 0.9
    finally:
        os.close(fd)


PROBES: Dict[str, Probe] = {
    "error_reads": Probe(_flakey(error_reads=True), _reads_fail),
    "corrupt_bio_byte_read": Probe(
        _flakey(corrupt_bio_byte=CorruptBIOByte(1, Direction.READ, _PATTERN ^ 0xFF)),
        _first_byte_read_as(_PATTERN ^ 0xFF)),
    "corrupt_bio_byte_write": Probe(
        _flakey(corrupt_bio_byte=CorruptBIOByte(1, Direction.WRITE, _PATTERN ^ 0xFF)),
        _write_corrupted_buffer_intact),
    "random_read_corrupt": Probe(_flakey(random_read_corrupt=PROBABILITY_MAX), _reads_corrupted),
    "random_write_corrupt": Probe(_flakey(random_write_corrupt=PROBABILITY_MAX), _writes_corrupted),
    "delay_flush": Probe(lambda backing: (0, _SCRATCH_BYTES // 512, "delay", DelayTable(
        backing, 0, 0, 0, _FLUSH_PROBE_MS).params()), _flush_held_back),
}


def supported(feature: str, *, probe: Optional[Callable[[str], bool]] = None) -> bool:
    """Whether the running kernel has feature, with its effect seen (probed once per process)."""
    if feature not in FEATURE_SINCE:
        raise ValueError(f"unknown feature {feature!r}")
    with _lock:
        if feature not in _cache:
            _cache[feature] = probe(feature) if probe else PROBES[feature].run()
        return _cache[feature]


def require(feature: str, device: Optional[str], *,
            probe: Optional[Callable[[str], bool]] = None) -> None:
    """Raise UnsupportedFeatureError, before any change to device, when feature is missing."""
    if supported(feature, probe=probe):
        return
    since, running = FEATURE_SINCE[feature], os.uname().release
    raise UnsupportedFeatureError(
        feature, device, f"{_LACK[feature]} (added in {since}; running Linux {running})",
        errno.EOPNOTSUPP, feature=feature, since=since, running=running)


def reset_cache() -> None:
    """Forget what was probed (tests, or after loading a newer module)."""
    with _lock:
        _cache.clear()
