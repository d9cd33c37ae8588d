"""The crash-state explorer: every crash point of a recorded workload mounted and checked.

A write log (``WriteLog``) says, entry by entry, what reached the disk.  Replay
up to an entry is one state the disk could have been in had the power gone
then; ``explore`` checks such states at every crash point the caller asks for.

Design, so that the cost is one pass over the log plus a small constant per state:

* Replay goes FORWARD once, onto one replay image (a sparse file on a loop
  device, the *origin*).  Between two crash points only the entries in
  between are applied; nothing is ever replayed twice.  Writes go into the
  image file, whose page cache the loop device reads: no sync is needed
  before a state is looked at.
* A state is never mounted directly: mounting writes (journal recovery), and
  so would the check.  Each state gets a throwaway copy-on-write view, a dm
  ``snapshot`` target over the origin with a transient exception store on a
  COW loop device (a sparse file, reused: a transient snapshot ignores what an
  earlier one left there).  The user's fsck (if named) runs on the view, it is
  mounted, the check runs, and replay continues.  The view's filesystem is
  then shut down (FS_IOC_SHUTDOWN without a log flush, where it has the
  ioctl) before its unmount: nothing of it is kept, so nothing of it need be
  written back (ext4 still writes a few blocks), and the unmount is quicker.
  A state's kernel log ends with its check, before that teardown.
* One dm device shows every view: made at the first state, removed at the
  end.  Each state swaps a fresh snapshot table into it (a load and a resume,
  two ioctls), about a tenth of the cost of making and removing a device per
  state (the README's "Performance" has the figures).  The tables alternate
  between two COW devices: a snapshot loaded over the COW device of the table
  it replaces would be handed that table's exceptions (dm-snapshot's
  handover), the previous state's writes.  Nobody may have the device open at
  a swap (the state would change under a mount, and an opener's page cache
  would go stale): that is checked first.
* ``reorder=K`` adds, per crash point, up to K states in which only a random
  subset (from ``seed``) of the writes logged since the previous flush
  persisted, as a disk may reorder writes between flushes.  Only a FLUSH
  entry orders the writes before it; a FUA write persists itself (it is
  always kept) and nothing else.  The states are built on a view of the state
  at that flush, the origin not replayed past it: the kept writes are applied
  to the view alone.  The crash point itself is built the same way (every
  write kept) while a later point still needs the state at that flush.
* Every device, loop device, image, mount point and mount is removed at the
  end, also after a failed check, a failed mount or an exception.  The
  devices carry an owner uuid of kind ``scratch``: a killed explorer's are
  found by ``cleanup_stale``.

The verdicts come back as a :class:`~dmflakey_ioctl.crashreport.CrashReport`.
"""

from __future__ import annotations

import bisect
import errno
import os
import random
import shutil
import tempfile
import time
from contextlib import ExitStack
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from . import fs
from .crashreport import CrashReport, CrashState, Timeline, describe_exception, describe_fsck
from .errors import DeviceBusyError, DMFlakeyError, InvalidArgumentError
from .images import BackingImage, attach_image, create_image, delete_image, release
from .kernel import dm
from .kernel.kmsg import KernelLogTail
from .ownership import Kind, Owner
from .tables.snapshot import SnapshotTable
from .userprog import run_user_program
from .writelog import LogFlags, WriteLog

__all__ = ["explore", "crash_points", "Points"]

Points = Union[str, int, Sequence[int]]
Check = Callable[[str], object]
_OPERATION = "explore"
_DEFAULT_AFTER = "mkfs"
_MOUNT_FAILED = "mount failed:"


def crash_points(log: WriteLog, points: Points = "flush", after: Union[int, str, None] = None
                 ) -> List[int]:
    """The entry indexes ``explore`` checks: the points mode, strictly after ``after``.

    ``after`` is an entry index or a mark label; None means the ``mkfs`` mark
    when the log has one (states before a filesystem exists are not worth
    mounting), else the start.
    """
    if after is None:
        start = log.index_of(_DEFAULT_AFTER) if _DEFAULT_AFTER in log.marks else -1
    else:
        start = log.index_of(after)
    n = len(log)
    if isinstance(points, str):
        if points == "flush":
            chosen = log.flush_points()
        elif points == "fua":
            chosen = log.fua_points()
        elif points == "mark":
            chosen = log.mark_points()
        elif points == "entry":
            chosen = list(range(n))
        else:
            raise InvalidArgumentError(_OPERATION, log.path, f"points must be 'flush', 'fua', "
                                       f"'mark', 'entry', an int N or a list of entries, got "
                                       f"{points!r}")
    elif isinstance(points, int) and not isinstance(points, bool):
        if points < 1:
            raise InvalidArgumentError(_OPERATION, log.path, f"points={points}: every Nth entry "
                                       "needs N >= 1")
        chosen = list(range(start + points, n, points))
    elif isinstance(points, (list, tuple)):
        chosen = sorted(set(points))
        bad = [p for p in chosen if isinstance(p, bool) or not isinstance(p, int)
               or not 0 <= p < n]
        if bad:
            raise InvalidArgumentError(_OPERATION, log.path, f"entries {bad} are not indexes of "
                                       f"this log (0..{n - 1})")
    else:
        raise InvalidArgumentError(_OPERATION, log.path, f"bad points {points!r}")
    return [p for p in chosen if p > start]


def _points_label(points: Points) -> Union[str, int]:
    return points if isinstance(points, (str, int)) else "list"


def _last_mark_at_or_before(marks: List[Tuple[int, str]], entry: int) -> Optional[str]:
    label = None
    for index, name in marks:
        if index > entry:
            break
        label = name
    return label


class _Views:
    """The origin (replay image on a loop device) and the one dm device that shows its states."""

    def __init__(self, log: WriteLog, work: str, undo: ExitStack) -> None:
        size = log.device_size
        self.sectors = size // 512
        self.origin = self._image(os.path.join(work, "replay.img"), size, undo)
        self.cows = [self._image(os.path.join(work, f"cow-{n}.img"), size, undo) for n in (0, 1)]
        self.mount_point = os.path.join(work, "mnt")
        os.mkdir(self.mount_point)
        self.owner = Owner.current(Kind.SCRATCH)
        self._undo = undo
        self._device: Optional[dm.ByUuid] = None
        self._path = ""
        self._swaps: List[dm.TableSwap] = []
        self._next_cow = 0

    @staticmethod
    def _image(path: str, size: int, undo: ExitStack) -> BackingImage:
        identity = create_image(path, size, _OPERATION, path)
        undo.callback(delete_image, path, identity)
        lo, image = attach_image(path, identity, _OPERATION, path)
        # keep the descriptor for the whole run: snapshot tables come and go over the loop device
        undo.callback(release, image, delete=False)
        undo.callback(lo.close)
        return image

    def _table(self, cow: BackingImage) -> list:
        table = SnapshotTable(self.origin.major_minor, cow.major_minor)
        return [(0, self.sectors, table.target_type, table.params())]

    def show_current_state(self) -> str:
        """The view's node path, now showing the origin as it is, with an empty COW store."""
        if self._device is None:
            uuid = self.owner.uuid()
            device = dm.ByUuid(uuid, f"dmflakey-crash-{os.urandom(6).hex()}")
            dm.create(device.name, uuid=uuid)
            self._undo.callback(dm.remove, device)
            dm.load(device, self._table(self.cows[0]))
            self._path = dm.resume(device).path
            self._device = device
            self._swaps = [dm.control().prepare_swap(device, self._table(cow)) for cow in self.cows]
            self._next_cow = 1
            return self._path
        opened = dm.info(self._device).open_count
        if opened:
            raise DeviceBusyError(_OPERATION, self._path, f"the previous crash state's view is "
                                  f"still open ({opened} opener(s)): a process the check started "
                                  "may hold it or a mount of it", errno.EBUSY)
        self._swaps[self._next_cow].run()
        self._next_cow ^= 1
        return self._path


def explore(log: WriteLog, check: Check, *, points: Points = "flush",
            after: Union[int, str, None] = None, mount_options: str = "",
            fsck: Optional[Sequence[str]] = None, reorder: int = 0, seed: int = 0,
            stop_on_failure: bool = False, work_dir: Optional[str] = None) -> CrashReport:
    """Check the disk state at every crash point of log; see the module docstring.

    check(mount_point) fails a state by raising (an AssertionError or any
    exception); a mount that fails is a failed state too.  fsck, an argv the
    caller names (e.g. ``["e2fsck", "-fn"]``), runs on each state's view before
    the mount, the device path appended; a non-zero exit fails the state.
    Scratch images go to work_dir (default: a new directory under the temp dir).
    """
    if not callable(check):
        raise InvalidArgumentError(_OPERATION, log.path, f"check must be callable, got {check!r}")
    if isinstance(reorder, bool) or not isinstance(reorder, int) or reorder < 0:
        raise InvalidArgumentError(_OPERATION, log.path, f"reorder must be an int >= 0, got "
                                   f"{reorder!r}")
    if fsck is not None and (isinstance(fsck, str) or not fsck):
        raise InvalidArgumentError(_OPERATION, log.path, f"fsck is an argv list, e.g. "
                                   f"['e2fsck', '-fn'], got {fsck!r}")
    chosen = crash_points(log, points, after)
    started = time.monotonic()
    timeline = Timeline.from_entries(len(log), iter(log))
    states: List[CrashState] = []
    work = tempfile.mkdtemp(prefix="dmflakey-explore-", dir=work_dir)
    try:
        with ExitStack() as undo:
            views = _Views(log, work, undo)
            replayer = undo.enter_context(log.replayer(views.origin.path))
            rng = random.Random(seed)
            state = _StateRunner(log, views, check, mount_options, fsck, timeline.marks, states)
            barriers = [i for i in log.flush_points() if log[i].flags & LogFlags.FLUSH]
            bases = [_previous_flush(barriers, point) for point in chosen] if reorder else []
            for n, point in enumerate(chosen):
                checked = len(states)
                if reorder:
                    # the origin stays at the last flush before the point: the states in between
                    # are built on the view, and the next point may need this flush's state too
                    base = bases[n]
                    if replayer.position <= base:
                        state.timed_replay(replayer, base)
                    writes, always = _unflushed(log, base, point)
                    for kept, dropped in _subsets(writes, always, reorder, rng):
                        state.check_state(point, kept=kept, dropped=dropped)
                    if n + 1 < len(chosen) and bases[n + 1] < point:
                        state.check_state(point, kept=sorted(writes + always))
                    else:
                        state.timed_replay(replayer, point)
                        state.check_state(point)
                else:
                    state.timed_replay(replayer, point)
                    state.check_state(point)
                if stop_on_failure and not all(s.ok for s in states[checked:]):
                    break
    finally:
        if not os.path.ismount(os.path.join(work, "mnt")):   # never delete through a mount left busy
            shutil.rmtree(work, ignore_errors=True)
    settings = {"after": after, "reorder": reorder, "seed": seed, "fsck": list(fsck or []),
                "mount_options": mount_options}
    return CrashReport(log_path=log.path, points=_points_label(points), states=states,
                       elapsed=time.monotonic() - started, timeline=timeline, settings=settings)


def _previous_flush(barriers: Sequence[int], point: int) -> int:
    """The last FLUSH entry before point (-1 when none): every write before it had persisted.

    Only a flush orders the writes before it; a FUA write makes itself durable
    and nothing else.
    """
    position = bisect.bisect_left(barriers, point)
    return barriers[position - 1] if position else -1


def _unflushed(log: WriteLog, base: int, point: int) -> Tuple[List[int], List[int]]:
    """The writes (discards included) in (base, point]: those a disk may have lost, and the
    FUA ones, which persisted when they completed."""
    writes: List[int] = []
    always: List[int] = []
    for index in range(base + 1, point + 1):
        entry = log[index]
        if entry.flags & LogFlags.MARK or (entry.nr_sectors == 0 and not entry.flags & LogFlags.DISCARD):
            continue
        (always if entry.flags & LogFlags.FUA else writes).append(index)
    return writes, always


def _subsets(writes: List[int], always: List[int], limit: int, rng: random.Random
             ) -> Iterator[Tuple[List[int], Tuple[int, ...]]]:
    """Up to limit distinct (kept, dropped) splits of writes; the always ones are kept.

    A split that keeps every write (the crash point itself) or none (the state
    at the flush) is no new state.
    """
    count = len(writes)
    possible = 2 ** count - 2 if count > 1 else 0
    seen = set()
    attempts = 0
    while len(seen) < min(limit, possible) and attempts < 50 * limit:
        attempts += 1
        mask = rng.getrandbits(count)
        if mask in (0, 2 ** count - 1) or mask in seen:
            continue
        seen.add(mask)
        kept = sorted(always + [w for bit, w in enumerate(writes) if mask >> bit & 1])
        dropped = tuple(w for bit, w in enumerate(writes) if not mask >> bit & 1)
        yield kept, dropped


class _StateRunner:
    """Builds, mounts and checks one crash state at a time, and records its verdict."""

    def __init__(self, log: WriteLog, views: _Views, check: Check, mount_options: str,
                 fsck: Optional[Sequence[str]], marks: List[Tuple[int, str]],
                 states: List[CrashState]) -> None:
        self.log = log
        self.views = views
        self.check = check
        self.mount_options = mount_options
        self.fsck = list(fsck) if fsck else None
        self.marks = marks
        self.states = states
        self.replay_time = 0.0

    def timed_replay(self, replayer, until: int) -> None:
        started = time.monotonic()
        replayer.advance(until)
        self.replay_time += time.monotonic() - started

    def check_state(self, point: int, *, kept: Optional[List[int]] = None,
                    dropped: Tuple[int, ...] = ()) -> None:
        timings = {"replay": self.replay_time}
        self.replay_time = 0.0
        with KernelLogTail() as kernel:
            clock = time.monotonic()
            device = self.views.show_current_state()
            if kept is not None:   # built on the view: the kept writes onto it alone
                with self.log.replayer(device) as onto_view:
                    onto_view.apply_only(kept)
                    onto_view.flush()
            timings["snapshot"] = time.monotonic() - clock
            error, lines = self._examine(device, timings, kernel)
        if error is not None and error.startswith(_MOUNT_FAILED) and lines:
            error += "\nkernel: " + "\nkernel: ".join(lines[-3:])
        self.states.append(CrashState(
            index=len(self.states), entry=point,
            label_before=_last_mark_at_or_before(self.marks, point), ok=error is None,
            error=error, kernel_log=lines, kind="reorder" if dropped else "point",
            dropped=dropped, timings=timings))

    def _examine(self, device: str, timings: dict, kernel: KernelLogTail
                 ) -> Tuple[Optional[str], Tuple[str, ...]]:
        """fsck, mount, check, unmount one view: the error that failed it (or None) and the
        kernel's lines up to the end of the check."""
        if self.fsck:
            clock = time.monotonic()
            status, output = run_user_program(self.fsck + [device], _OPERATION)
            timings["fsck"] = time.monotonic() - clock
            if status != 0:
                return describe_fsck(self.fsck + [device], status, output), tuple(kernel.read())
        mount_point = self.views.mount_point
        clock = time.monotonic()
        try:
            fs.mount(device, mount_point, None, self.mount_options)
        except DMFlakeyError as exc:
            timings["mount"] = time.monotonic() - clock
            return f"{_MOUNT_FAILED} {exc}", tuple(kernel.read())
        timings["mount"] = time.monotonic() - clock
        error = None
        lines: Tuple[str, ...] = ()
        clock = time.monotonic()
        try:
            self.check(mount_point)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the verdict, whatever it raised (pytest.fail() included)
            error = describe_exception(exc)
        finally:
            timings["check"] = time.monotonic() - clock
            lines = tuple(kernel.read())
            clock = time.monotonic()
            try:
                fs.shut_down(mount_point)
            finally:
                fs.umount(mount_point)
                timings["umount"] = time.monotonic() - clock
        return error, lines
