"""Read and replay dm-log-writes logs in pure Python: no C replay tool, no dmsetup.

The format (little-endian; the kernel's ``drivers/md/dm-log-writes.c``):

* byte 0, one block of ``sector_size`` bytes: the super block, ``magic u64``
  (0x6a736677736872), ``version u64`` (1), ``nr_entries u64``, ``sector_size
  u32``.  ``sector_size`` is the DATA device's logical block size (512, or 4096
  on a 4Kn device) and is the unit of every position and size below.
* from byte ``sector_size`` on, entry after entry: one header block (``sector
  u64, nr_sectors u64, flags u64, data_len u64``, zero padded), then
  ``nr_sectors`` blocks of the data written.  A discard carries no data; a pure
  flush has 0 sectors; a mark has 0 sectors and its label right after the 32
  header bytes (``data_len`` bytes, at most ``sector_size - 33``).

Reading.  :meth:`WriteLog.open` maps the log (a file, or a block device after
dropping its page cache: the kernel writes the log with bios that bypass it)
and walks the headers ONCE, keeping four compact columns (``array``: 25 bytes
per entry) and the mark labels; data is never read until a replay needs it.
``nr_entries`` is rewritten by the kernel only after a FUA write or a mark, so
it can lag behind the entries on disk (a live recording, a crash): the walk
goes on past the count, validates each entry as fstests' replay tool does, and
stops at the first one that is not valid, or right after the ``dm-log-writes-end``
mark the kernel logs when the device is removed (what follows it is left over
from an earlier use of the log device).  Inside the count an invalid entry is a
:class:`LogFormatError` naming its byte offset.

Replaying.  A :class:`Replayer` applies entries onto a target (a block device or
a big enough file) in log order: writes of entries that are adjacent on the
target go out as one ``os.pwritev`` of slices of the mapped log (no copy in
Python), discards become zeroed ranges (a punched hole in a file, BLKZEROOUT on
a block device, written zeros where neither works; never skipped, however
large).  Applying in log order makes a later write over the same bytes win, as
on the recorded device.  ``replay()`` and ``materialize()`` are built on it; the
crash-state explorer drives one forward with ``advance()``.

The log does not record the data device's size.  A log made by this library
starts with a mark ``dmflakey-size:<bytes>`` (:data:`SIZE_MARK_PREFIX`); for
other logs ``device_size`` is the highest byte any entry touches, so a replay
target must be at least that (and the original device may have been larger).
"""

from __future__ import annotations

import bisect
import enum
import errno
import fcntl
import functools
import mmap
import operator
import os
import stat
import struct
from array import array
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .errors import (DeviceBusyError, DeviceExistsError, DMFlakeyError, InvalidArgumentError,
                     LogFormatError)
from .kernel.blockdev import BLKGETSIZE64, BLKZEROOUT

if TYPE_CHECKING:
    from typing import Callable

    from .crashreport import CrashReport
    import ctypes

__all__ = ["LogFlags", "LogEntry", "ReplayResult", "WriteLog", "Replayer", "check_mark_label",
           "SIZE_MARK_PREFIX", "END_MARK", "MAGIC", "VERSION"]

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
HEADER = struct.Struct("<QQQQB")   # sector, nr_sectors, flags, data_len, and byte 32 of the block
HEADER_BYTES = 32
SIZE_MARK_PREFIX = "dmflakey-size:"
END_MARK = "dm-log-writes-end"     # the kernel's last entry when the device is removed
MIN_SECTOR, MAX_SECTOR = 512, 65536

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
WRITE_CHUNK = 64 << 20             # most bytes one pwritev carries
POPULATE_WINDOW = 64 << 20         # log bytes mapped ahead of a forward replay
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
ZERO_BLOCK = bytes(1 << 20)        # the zeros written where no hole can be punched

Until = Union[int, str]


class LogFlags(enum.IntFlag):
    """An entry's flags, as the kernel sets them from the bio."""

    FLUSH = 1       # REQ_PREFLUSH: the writes logged before it are on stable storage
    FUA = 2         # REQ_FUA: this write is on stable storage when it completes
    DISCARD = 4     # the range was discarded (replayed as zeros)
    MARK = 8        # a label sent with the `mark` message
    METADATA = 16   # REQ_META; informational


# the bits as plain ints for the loops: IntFlag operators run Python code of the enum module
KNOWN_FLAGS = 0x1F
FLUSH_OR_FUA, FUA_BIT, DISCARD_BIT, MARK_BIT = 0x3, 0x2, 0x4, 0x8
NO_DATA = DISCARD_BIT | MARK_BIT   # entries whose sectors are not followed by data
PLAIN = 0x1 | 0x2 | 0x10           # FLUSH, FUA, METADATA: the flags of an ordinary write


def _flag_names(flags: int) -> List[str]:
    return [member.name for member in LogFlags if flags & member]  # type: ignore[misc]


def _human(size: int) -> str:
    """4096 -> '4 KiB', 1536 -> '1.5 KiB', 100 -> '100 B'."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"


class LogEntry(NamedTuple):
    """One logged write, discard, flush or mark; ``sector`` and ``nr_sectors`` in the log's units."""

    index: int
    sector: int
    nr_sectors: int
    flags: LogFlags
    label: Optional[str]
    sector_size: int

    @property
    def offset(self) -> int:
        """Byte offset on the recorded device."""
        return self.sector * self.sector_size

    @property
    def size(self) -> int:
        """Bytes written or discarded."""
        return self.nr_sectors * self.sector_size

    def describe(self) -> str:
        """One line as a person reads it: index, sector, size, flags, label."""
        flags = "|".join(_flag_names(self.flags)) or "-"
        line = f"{self.index:>7}  sector {self.sector:<12} {_human(self.size):>10}  {flags}"
        return f"{line}  {self.label}" if self.label is not None else line

    def as_dict(self) -> dict:
        """The entry for JSON: flags as a list of names, sizes in sectors and bytes."""
        return {"index": self.index, "sector": self.sector, "nr_sectors": self.nr_sectors,
                "offset": self.offset, "size": self.size, "sector_size": self.sector_size,
                "flags": _flag_names(self.flags), "label": self.label}


class ReplayResult(NamedTuple):
    """What a replay did: entries applied, bytes written, bytes zeroed for discards."""

    entries: int
    bytes_written: int
    bytes_zeroed: int


def check_mark_label(label: object, sector_size: int, operation: str, device: Optional[str]) -> str:
    """The label if the kernel stores it exactly as given; InvalidArgumentError otherwise.

    The kernel splits a message on whitespace and treats ``\\`` as an escape, so a
    label is one word without either; it silently truncates a label at
    ``sector_size - 33`` bytes.  Labels are kept to printable ASCII, and the
    kernel's own end mark is reserved (readers stop scanning after it).
    """
    if isinstance(sector_size, bool) or not isinstance(sector_size, int) \
            or not MIN_SECTOR <= sector_size <= MAX_SECTOR or sector_size & (sector_size - 1):
        raise InvalidArgumentError(operation, device, f"sector size {sector_size!r} is not a power "
                                   f"of two from {MIN_SECTOR} to {MAX_SECTOR}")
    limit = sector_size - HEADER_BYTES - 1
    problem = None
    if not isinstance(label, str):
        problem = f"a mark label must be a str, not {type(label).__name__}"
    elif not label:
        problem = "the mark label is empty"
    elif not label.isascii():
        problem = "a mark label must be ASCII"
    elif any(c.isspace() for c in label):
        problem = "a mark label is one word: the kernel splits its message on whitespace"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in label):
        problem = "a mark label cannot contain control characters"
    elif "\\" in label:
        problem = "a mark label cannot contain '\\': the kernel reads it as an escape"
    elif len(label) > limit:
        problem = (f"the mark label is {len(label)} bytes long; with {sector_size}-byte sectors "
                   f"the kernel keeps {limit}")
    elif label == END_MARK:
        problem = f"{END_MARK!r} is the mark the kernel logs when the device is removed"
    if problem:
        raise InvalidArgumentError(operation, device, f"{problem} (label {label!r})")
    return label  # type: ignore[return-value]


class WriteLog:
    """An indexed dm-log-writes log: ``len(log)``, ``log[i]``, iteration, marks, replay.

    Build it with :meth:`open`.  The log file stays mapped until :meth:`close`;
    a log the library made for itself (``owned_identity``) is deleted on close.
    """

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, view: memoryview, sector_size: int,
                 nr_entries: int, owned_identity: Optional[Tuple[int, int]]) -> None:
        """Use :meth:`open`; this indexes the mapped log (``view`` is ``memoryview(mapping)``)."""
        self.path = path
        self.sector_size = sector_size
        self.nr_entries = nr_entries
        self._fd = fd
        self._map = mapping
        self._view = view
        self._owned = owned_identity
        self._closed = False
        self._can_populate = True
        self._populated = 0              # log bytes below this one were mapped by _populate
        (self._sectors, self._counts, self._flags, self._offsets, self._labels,
         highest) = _index(view, len(mapping), sector_size, nr_entries, path)
        marks: Dict[str, List[int]] = {}
        for index, label in self._labels.items():
            marks.setdefault(label, []).append(index)
        self._marks = marks
        self.device_size = max(self._size_from_mark(), highest * sector_size)

    @classmethod
    def open(cls, path: Union[str, "os.PathLike[str]"], *,
             owned_identity: Optional[Tuple[int, int]] = None) -> "WriteLog":
        """Validate and index the log at path (a regular file or a block device).

        ``owned_identity`` = ``(st_dev, st_ino)`` of a log file the library made:
        ``close()`` then deletes it (if that path still is that inode).  A log
        opened without it is never deleted.
        """
        path = os.fspath(path)
        operation = "read log"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DMFlakeyError(operation, path, "cannot open the log", exc.errno or 0) from None
        mapping = view = None
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                size = _block_size(fd, operation, path)
                _drop_page_cache(fd, operation, path)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise InvalidArgumentError(operation, path, "a log is a regular file or a block device")
            if size < MIN_SECTOR:
                raise LogFormatError(operation, path, f"the log is {size} bytes long, too short for "
                                     f"a super block of at least {MIN_SECTOR} bytes", offset=0)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            view = memoryview(mapping)
            sector_size, nr_entries = _read_super(mapping, size, path)
            return cls(path, fd, mapping, view, sector_size, nr_entries, owned_identity)
        except BaseException:
            if view is not None:
                view.release()
            if mapping is not None:
                mapping.close()
            os.close(fd)
            raise

    # -- the entries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._flags)

    def __getitem__(self, index: int) -> LogEntry:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"log indexes are int, not {type(index).__name__}")
        count = len(self._flags)
        i = index + count if index < 0 else index
        if not 0 <= i < count:
            raise IndexError(f"entry {index} is out of range: the log has {count} entries")
        return self._entry(i)

    def __iter__(self) -> Iterator[LogEntry]:
        return (self._entry(i) for i in range(len(self._flags)))

    def _entry(self, i: int) -> LogEntry:
        return LogEntry(i, self._sectors[i], self._counts[i], LogFlags(self._flags[i]),
                        self._labels.get(i), self.sector_size)

    @property
    def entries_beyond_count(self) -> int:
        """Valid entries found past the super block's ``nr_entries`` (it lags while recording)."""
        return max(0, len(self._flags) - self.nr_entries)

    @property
    def marks(self) -> Dict[str, List[int]]:
        """label -> indexes of the marks with that label, in log order."""
        return {label: list(indexes) for label, indexes in self._marks.items()}

    def flush_points(self) -> List[int]:
        """Indexes of FLUSH or FUA entries: the points a crash-consistent state ends at."""
        return [i for i, f in enumerate(self._flags) if f & FLUSH_OR_FUA]

    def fua_points(self) -> List[int]:
        """Indexes of FUA entries."""
        return [i for i, f in enumerate(self._flags) if f & FUA_BIT]

    def mark_points(self) -> List[int]:
        """Indexes of marks, in log order."""
        return sorted(self._labels)

    def index_of(self, until: Until) -> int:
        """The entry index for an int (negative counts from the end) or a mark label.

        A label that was marked more than once means its LAST mark.
        """
        if isinstance(until, str):
            indexes = self._marks.get(until)
            if indexes is None:
                known = ", ".join(sorted(self._marks)[:10]) or "none"
                raise InvalidArgumentError("find entry", self.path, f"no mark {until!r} in the log "
                                           f"(marks: {known})")
            return indexes[-1]
        if isinstance(until, bool) or not isinstance(until, int):
            raise InvalidArgumentError("find entry", self.path, f"{until!r} is neither an entry index "
                                       "nor a mark label")
        count = len(self._flags)
        i = until + count if until < 0 else until
        if not 0 <= i < count:
            raise InvalidArgumentError("find entry", self.path, f"entry {until} is out of range: the "
                                       f"log has {count} entries")
        return i

    def read_data(self, index: int) -> bytes:
        """The data an entry wrote (empty for discards, flushes and marks)."""
        i = self.index_of(index)
        if self._flags[i] & NO_DATA:
            return b""
        start = self._offsets[i] + self.sector_size
        return bytes(self._view[start:start + self._counts[i] * self.sector_size])

    def _entry_end(self, i: int) -> int:
        """The log byte just past entry i (its header block and its data)."""
        data = 0 if self._flags[i] & NO_DATA else self._counts[i]
        return self._offsets[i] + (1 + data) * self.sector_size

    def _populate(self, start: int, end: int) -> None:
        """Map log bytes start..end into this process at once (MADV_POPULATE_READ, Linux 5.14).

        pwritev from the mapping otherwise takes a page fault every 16 pages;
        one madvise is cheaper.  What an earlier replay mapped stays mapped,
        so only bytes past the furthest mapped one are asked for.  Kernels
        without the advice answer EINVAL: page faults then.
        """
        start = max(start, self._populated)
        if not self._can_populate or start >= end:
            return
        start -= start % mmap.PAGESIZE
        try:
            self._map.madvise(MADV_POPULATE_READ, start, end - start)
        except OSError:
            self._can_populate = False
        self._populated = end

    def _size_from_mark(self) -> int:
        for label, indexes in self._marks.items():
            if label.startswith(SIZE_MARK_PREFIX):
                value = label[len(SIZE_MARK_PREFIX):]
                if not value.isdigit() or int(value) % self.sector_size:
                    offset = self._offsets[indexes[0]]
                    raise LogFormatError("read log", self.path, f"mark {label!r} (entry {indexes[0]} "
                                         f"at byte {offset}) does not hold a device size in bytes",
                                         offset=offset)
                return int(value)
        return 0

    # -- replay -----------------------------------------------------------------------------

    def replayer(self, target: Union[str, "os.PathLike[str]"], *, start: int = 0,
                 discard: str = "zero") -> "Replayer":
        """A :class:`Replayer` onto target whose next entry is ``start``."""
        return Replayer(self, target, start=start, discard=discard)

    def replay(self, target: Union[str, "os.PathLike[str]"], *, until: Optional[Until] = None,
               start: int = 0, discard: str = "zero") -> ReplayResult:
        """Apply entries ``start`` .. ``until`` (inclusive; an index or a mark label, None = all).

        The target (a block device, or a regular file of at least
        ``device_size`` bytes) is checked before anything is written and
        fsynced at the end.  ``discard="ignore"`` leaves discarded ranges as
        they are instead of zeroing them.
        """
        last = len(self) - 1 if until is None else self.index_of(until)
        if isinstance(start, int) and start > last + 1:
            raise InvalidArgumentError("replay", self.path, f"start entry {start} comes after the "
                                       f"last entry to apply ({last})")
        with self.replayer(target, start=start, discard=discard) as replayer:
            result = replayer.advance(until)
            replayer.flush()
        return result

    def materialize(self, index: Until, path: Union[str, "os.PathLike[str]"]) -> ReplayResult:
        """A new sparse image at path, ``device_size`` bytes, with entries 0..index replayed."""
        last = self.index_of(index)
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError as exc:
            raise DeviceExistsError("materialize", path, "the file exists; refusing to overwrite it",
                                    exc.errno) from None
        except OSError as exc:
            raise DMFlakeyError("materialize", path, "cannot create the image", exc.errno or 0) from None
        try:
            try:
                os.ftruncate(fd, self.device_size)
            except OSError as exc:
                raise DMFlakeyError("materialize", path, f"cannot size the image to "
                                    f"{self.device_size} bytes", exc.errno or 0) from None
            finally:
                os.close(fd)
            return self.replay(path, until=last)
        except BaseException:
            os.unlink(path)
            raise

    # -- life cycle -------------------------------------------------------------------------

    def explore(self, check: "Callable[[str], object]", **options: object) -> "CrashReport":
        """Check the disk state at every crash point: ``explore(self, check, **options)``.

        See :func:`dmflakey_ioctl.explorer.explore` for the options.
        """
        from .explorer import explore
        return explore(self, check, **options)  # type: ignore[arg-type]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, keep: bool = False) -> None:
        """Unmap the log; a log the library owns is deleted unless ``keep``.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        self._map.close()
        os.close(self._fd)
        if self._owned is not None and not keep:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == self._owned:
                os.unlink(self.path)

    def __enter__(self) -> "WriteLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<WriteLog {self.path!r} entries={len(self)} sector_size={self.sector_size} "
                f"device_size={self.device_size}{' closed' if self._closed else ''}>")


class Replayer:
    """Applies a log's entries onto one target, forward from ``position``.

    The target is a regular file of at least ``log.device_size`` bytes or a
    block device that nothing mounts or holds (checked when the replayer is
    made, before any write).  Writes go through the target's page cache: call
    :meth:`flush` before any other device or program reads the target (a dm
    snapshot over it, a mount).  After an error the target holds a partial
    replay.
    """

    def __init__(self, log: WriteLog, target: Union[str, "os.PathLike[str]"], *, start: int = 0,
                 discard: str = "zero") -> None:
        self.target = os.fspath(target)
        operation = "replay"
        if log.closed:
            raise InvalidArgumentError(operation, log.path, "the log is closed")
        if discard not in ("zero", "ignore"):
            raise InvalidArgumentError(operation, self.target, f"discard={discard!r}: use 'zero' or "
                                       "'ignore'")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(log):
            raise InvalidArgumentError(operation, self.target, f"start entry {start!r} is not an "
                                       f"index from 0 to {len(log)}")
        self._log = log
        self._zero_discards = discard == "zero"
        self.position = start
        self.totals = ReplayResult(0, 0, 0)   # everything this replayer applied
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DMFlakeyError(operation, self.target, "cannot open the replay target",
                                exc.errno or 0) from None
        try:
            st = os.fstat(fd)
            self._block = stat.S_ISBLK(st.st_mode)
            if self._block:
                size = _block_size(fd, operation, self.target)
                _refuse_if_in_use(self.target, operation)
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise InvalidArgumentError(operation, self.target, "the target must be a block "
                                           "device or a regular file")
            if size < log.device_size:
                raise InvalidArgumentError(operation, self.target, f"the target is {size} bytes; the "
                                           f"log needs {log.device_size}")
        except BaseException:
            os.close(fd)
            raise
        self._fd: Optional[int] = fd

    def advance(self, until: Optional[Until] = None) -> ReplayResult:
        """Apply the entries from ``position`` through ``until`` (inclusive; None = the last)."""
        log = self._log
        last = len(log) - 1 if until is None else log.index_of(until)
        if last < self.position - 1:
            raise InvalidArgumentError("replay", self.target, f"entry {last} was applied already "
                                       f"(the next one is {self.position})")
        entries = written = zeroed = 0
        offsets, first = log._offsets, self.position
        while first <= last:
            # a window of about POPULATE_WINDOW bytes of log, mapped in one go, then applied
            stop = max(first + 1, bisect.bisect_right(offsets, offsets[first] + POPULATE_WINDOW,
                                                      first, last + 1))
            log._populate(offsets[first], log._entry_end(stop - 1))
            part = self._apply(range(first, stop))
            entries, written, zeroed = (entries + part.entries, written + part.bytes_written,
                                        zeroed + part.bytes_zeroed)
            first = self.position = stop
        return ReplayResult(entries, written, zeroed)

    def apply_only(self, indexes: Iterable[int]) -> ReplayResult:
        """Apply exactly these entries, in the order given; ``position`` does not move."""
        wanted = [self._log.index_of(i) for i in indexes]
        return self._apply(wanted)

    def flush(self) -> None:
        """fsync the target: what was applied is on it for every reader."""
        try:
            os.fsync(self._open_fd())
        except OSError as exc:
            raise DMFlakeyError("replay", self.target, "fsync failed", exc.errno or 0) from None

    def close(self) -> None:
        """Close the target (without an fsync; call :meth:`flush` first to have one).  Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Replayer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_fd(self) -> int:
        if self._fd is None or self._log.closed:
            raise InvalidArgumentError("replay", self.target, "the replayer or its log is closed")
        return self._fd

    def _apply(self, indexes: Sequence[int]) -> ReplayResult:
        """Coalesce runs of target-adjacent writes into pwritev calls; zero discards in order.

        The loop costs about a microsecond per entry, so it does the least:
        marks and pure flushes are skipped by their 0 sectors, and one compare
        each tells whether a write continues the run (``run_end`` is -1 when
        there is no run) and whether the run is full (``run_limit`` bytes).
        """
        fd = self._open_fd()
        log = self._log
        view, ss = log._view, log.sector_size
        sectors, counts, flags, offsets = log._sectors, log._counts, log._flags, log._offsets
        discard, zero_discards, iov_max = DISCARD_BIT, self._zero_discards, IOV_MAX
        run: List[memoryview] = []
        append = run.append
        run_pos = run_first = run_limit = 0
        run_end = -1
        written = zeroed = 0
        for i in indexes:
            nr = counts[i]
            if not nr:
                continue
            pos, size = sectors[i] * ss, nr * ss
            if flags[i] & discard:
                if zero_discards:
                    if run:
                        written += self._write(fd, run, run_pos, run_end, run_first, i)
                    run_end = -1
                    self._zero(fd, pos, size, i)
                    zeroed += size
                continue
            if pos != run_end or pos >= run_limit or len(run) >= iov_max:
                if run:
                    written += self._write(fd, run, run_pos, run_end, run_first, i)
                run_pos, run_limit, run_first = pos, pos + WRITE_CHUNK, i
            data = offsets[i] + ss
            append(view[data:data + size])
            run_end = pos + size
        if run:
            written += self._write(fd, run, run_pos, run_end, run_first, None)
        result = ReplayResult(len(indexes), written, zeroed)
        total = self.totals
        self.totals = ReplayResult(total.entries + result.entries, total.bytes_written + written,
                                   total.bytes_zeroed + zeroed)
        return result

    def _write(self, fd: int, run: List[memoryview], pos: int, end: int, first: int,
               before: Optional[int]) -> int:
        """Write a run (target bytes pos..end) and empty it; returns the bytes written."""
        try:
            _pwritev_all(fd, run, pos, end - pos)
        except OSError as exc:
            which = f"entries from {first}" + (f" to before {before}" if before is not None else "")
            raise DMFlakeyError("replay", self.target, f"writing {which} ({end - pos} bytes at byte "
                                f"{pos}) failed", exc.errno or 0) from None
        run.clear()
        return end - pos

    def _zero(self, fd: int, pos: int, size: int, index: int) -> None:
        try:
            if self._block:
                try:
                    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", pos, size))
                    return
                except OSError:  # unaligned, unsupported, or the device is held: write zeros
                    pass
            elif _punch_hole(fd, pos, size):
                return
            _write_zeros(fd, pos, size)
        except OSError as exc:
            raise DMFlakeyError("replay", self.target, f"zeroing discard entry {index} ({size} bytes "
                                f"at byte {pos}) failed", exc.errno or 0) from None


# -- helpers ----------------------------------------------------------------------------------

def _read_super(mapping: mmap.mmap, size: int, path: str) -> Tuple[int, int]:
    magic, version, nr_entries, sector_size = SUPER.unpack_from(mapping, 0)
    operation = "read log"
    if magic != MAGIC:
        raise LogFormatError(operation, path, f"not a dm-log-writes log: magic 0x{magic:x} at byte 0, "
                             f"expected 0x{MAGIC:x}", offset=0)
    if version != VERSION:
        raise LogFormatError(operation, path, f"log format version {version} at byte 8; only "
                             f"version {VERSION} exists", offset=8)
    if not MIN_SECTOR <= sector_size <= MAX_SECTOR or sector_size & (sector_size - 1):
        raise LogFormatError(operation, path, f"sector size {sector_size} at byte 24 is not a power "
                             f"of two from {MIN_SECTOR} to {MAX_SECTOR}", offset=24)
    if size < sector_size:
        raise LogFormatError(operation, path, f"the log is {size} bytes long, shorter than its "
                             f"{sector_size}-byte super block", offset=0)
    return sector_size, nr_entries


def _index(view: memoryview, size: int, ss: int, nr_entries: int, path: str):
    """Walk the entry headers once; return the columns, the labels and the highest sector touched.

    The loop is the indexing cost, so it does the least per plain write or
    flush: everything else (marks, discards, anything invalid) goes through
    :func:`_check_special`, and an entry whose data runs past the end of the
    log ends the loop by itself (its end is past ``limit``) and is taken back.
    """
    sectors, counts, flags, offsets = array("Q"), array("Q"), array("B"), array("Q")
    labels: Dict[int, str] = {}
    add_sector, add_count, add_flags, add_offset = (sectors.append, counts.append, flags.append,
                                                    offsets.append)
    unpack = HEADER.unpack_from
    special = ~PLAIN
    off, limit = ss, size - ss          # a header starting after limit does not fit
    problem = None
    while off <= limit:
        sector, nr, f, data_len, byte32 = unpack(view, off)
        if byte32 or f & special or not (f or nr):
            problem, label = _check_special(view, off, ss, sector, nr, f, data_len, byte32)
            if problem:
                break
            if label is not None:
                index = len(flags)
                labels[index] = label
                if label == END_MARK and index + 1 >= nr_entries:
                    limit = -1          # the kernel's last entry: what follows is left over
            end = off + ss if f & NO_DATA else off + ss + nr * ss
        else:
            end = off + ss + nr * ss
        add_sector(sector)
        add_count(nr)
        add_flags(f)
        add_offset(off)
        off = end
    if problem is None and off > size:  # the last entry's data runs past the end: take it back
        off = offsets.pop()
        for column in (sectors, counts, flags):
            column.pop()
        problem = (f"its {nr} sectors of data run past the end of the log (byte {size}); the log "
                   "is truncated")
    elif problem is None and len(flags) < nr_entries:
        problem = f"the log ends at byte {size}" + (", inside its header" if off < size else "") \
            + "; the log is truncated"
    if problem and len(flags) < nr_entries:
        raise LogFormatError("read log", path, f"entry {len(flags)} of the {nr_entries} the super "
                             f"block counts, at byte {off}: {problem}", offset=off)
    highest = max(map(operator.add, sectors, counts), default=0)
    return sectors, counts, flags, offsets, labels, highest


def _check_special(view: memoryview, off: int, ss: int, sector: int, nr: int, f: int, data_len: int,
                   byte32: int) -> Tuple[Optional[str], Optional[str]]:
    """(problem, label) of an entry that is a discard or a mark, has unknown flags or looks empty."""
    if f & ~KNOWN_FLAGS:
        return f"flags 0x{f:x} have bits dm-log-writes never sets", None
    if not (f or nr):
        return "flags and sector count are both 0 (no entry is logged like that)", None
    if not f & MARK_BIT:
        if byte32:
            return "byte 32 of the header is not 0 in an entry that is not a mark", None
        return None, None               # a discard
    if f != MARK_BIT or nr or sector:
        return (f"a mark with sector {sector}, {nr} sectors and flags 0x{f:x} (a mark has only "
                "the MARK flag and no sectors)"), None
    if data_len > ss - HEADER_BYTES:
        return f"a mark label of {data_len} bytes does not fit in a {ss}-byte block", None
    raw = bytes(view[off + HEADER_BYTES:off + HEADER_BYTES + data_len])
    if b"\0" in raw:
        return "the mark label holds a NUL byte", None
    return None, raw.decode("utf-8", "surrogateescape")


def _block_size(fd: int, operation: str, path: str) -> int:
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "BLKGETSIZE64 failed", exc.errno or 0) from None
    return struct.unpack("=Q", buf)[0]


def _refuse_if_in_use(path: str, operation: str) -> None:
    """DeviceBusyError for a block device that is mounted or held (an exclusive open fails).

    Writing under a filesystem or a dm table corrupts what they see; the probe
    runs while the replayer's own descriptor is open, so closing it is not the
    device's last close.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusyError(operation, path, "the target is in use (mounted, or held by a dm "
                                  "device): replaying under it would corrupt it", exc.errno) from None
        raise DMFlakeyError(operation, path, "cannot open the replay target", exc.errno or 0) from None
    os.close(fd)


def _drop_page_cache(fd: int, operation: str, path: str) -> None:
    """Forget cached blocks of a block device: the kernel wrote the log with bios past the cache.

    POSIX_FADV_DONTNEED drops the clean cached pages as BLKFLSBUF does, without
    needing CAP_SYS_ADMIN.
    """
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        raise DMFlakeyError(operation, path, "cannot drop the device's page cache", exc.errno or 0) \
            from None


def _pwritev_all(fd: int, bufs: List[memoryview], pos: int, total: int) -> None:
    while True:
        done = os.pwritev(fd, bufs, pos)
        total -= done
        if total <= 0:
            return
        if done == 0:
            raise OSError(errno.EIO, "the target accepted no more bytes")
        pos += done
        while done >= len(bufs[0]):
            done -= len(bufs.pop(0))
        bufs[0] = bufs[0][done:]


def _write_zeros(fd: int, pos: int, size: int) -> None:
    zero = memoryview(ZERO_BLOCK)
    while size:
        count = min(size // len(zero), IOV_MAX)
        bufs = [zero] * count if count else [zero[:size]]
        total = sum(len(b) for b in bufs)
        _pwritev_all(fd, bufs, pos, total)
        pos += total
        size -= total


@functools.lru_cache(maxsize=None)
def _fallocate() -> "ctypes._CFuncPtr":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


def _punch_hole(fd: int, pos: int, size: int) -> bool:
    """Deallocate a file range (it reads back as zeros); False where the filesystem cannot."""
    import ctypes
    if _fallocate()(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))
