"""The crash-state explorer against the real kernel: dm snapshots over a forward replay, mounted.

Each claim has an oracle outside the explorer: images rebuilt from scratch by
``materialize`` (one replay from entry 0 onto a fresh file, loop device, plain
mount), a byte image rebuilt here from ``read_data`` alone, the bytes the
kernel shows through the snapshot, a model of which file contents the workload
made durable when, and what sysfs, /dev/mapper and the mount table hold after
the explorer is gone.  Images stay small (ext4 32 MiB, btrfs 128 MiB, xfs
320 MiB sparse) and so does the number of states per test: the guest is slow.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from dmflakey_ioctl import fs
from dmflakey_ioctl.crashreport import CrashReport
from dmflakey_ioctl.explorer import crash_points, explore
from dmflakey_ioctl.kernel import loop
from dmflakey_ioctl.recording import record_writes
from dmflakey_ioctl.writelog import LogFlags, WriteLog

from .cli_helpers import dmflakey, fails
from .conftest import system_state
from .helpers import fsync_dir, unique_name, write_file

pytest_plugins = ["pytester"]

MiB = 1 << 20
EXT4_SIZE, BTRFS_SIZE, XFS_SIZE = 32 * MiB, 128 * MiB, 320 * MiB
FLUSH_OR_FUA = LogFlags.FLUSH | LogFlags.FUA
Workload = Callable[[str, object], None]


# -- recording a workload ---------------------------------------------------------------------

@contextmanager
def recorded(directory: Path, fs_type: str, size: int, options: str, workload: Workload
             ) -> Iterator[WriteLog]:
    """A workload recorded from mkfs on; the WriteLog (deleted at the end)."""
    directory.mkdir()
    with record_writes(unique_name("dmfx-rec"), str(directory), fs_type, size) as rec:
        mnt = directory / "mnt"
        mnt.mkdir()
        rec.mount(str(mnt), options)
        workload(str(mnt), rec)
        log = rec.stop()
    try:
        yield log
    finally:
        log.close()


# -- the rename scenario ----------------------------------------------------------------------

RENAME_OPTIONS = "noauto_da_alloc"   # ext4's rename heuristic off: the data may follow the rename
SAVES = 4


def config_text(version: int) -> bytes:
    return f"config version {version}\n".encode() * 200


def atomic_saves(safe: bool) -> Workload:
    """config saved SAVES times by writing config.tmp and renaming it over config.

    After each save another file is fsynced, which commits the journal and the
    rename with it.  Unsafe: no fsync of config.tmp before the rename.
    """
    def workload(mnt: str, rec) -> None:
        config, temp, other = (os.path.join(mnt, n) for n in ("config", "config.tmp", "other"))
        write_file(config, config_text(0), sync=True)
        rec.mark("setup")
        for version in range(1, SAVES + 1):
            write_file(temp, config_text(version), sync=safe, sync_dir=False)
            os.rename(temp, config)
            with open(other, "ab") as fh:
                fh.write(b"x" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
    return workload


def check_config(mount_point: str) -> None:
    with open(os.path.join(mount_point, "config"), "rb") as fh:
        data = fh.read()
    assert data in [config_text(v) for v in range(SAVES + 1)], \
        f"config holds {len(data)} bytes that are no saved version" \
        + (" (the file is empty)" if not data else " (zeros)" if not data.strip(b"\0") else "")


@pytest.fixture(scope="module")
def rename_logs(tmp_path_factory) -> Iterator[Dict[bool, WriteLog]]:
    base = tmp_path_factory.mktemp("rename")
    with ExitStack() as stack:
        yield {safe: stack.enter_context(recorded(base / ("safe" if safe else "unsafe"), "ext4",
                                                  EXT4_SIZE, RENAME_OPTIONS, atomic_saves(safe)))
               for safe in (False, True)}


@contextmanager
def mounted_image(image: Path, mount_point: Path, options: str = "") -> Iterator[str]:
    """An image file on a loop device of its own, mounted (journal recovery writes into it)."""
    mount_point.mkdir(exist_ok=True)
    with loop.attach(str(image)) as lo:
        fs.mount(lo.path, str(mount_point), None, options)
        try:
            yield str(mount_point)
        finally:
            fs.umount(str(mount_point))


def test_rename_unsafe_loses_the_content_safe_never(rename_logs, tmp_path):
    unsafe = explore(rename_logs[False], check_config, after="setup", mount_options=RENAME_OPTIONS)
    safe = explore(rename_logs[True], check_config, after="setup", mount_options=RENAME_OPTIONS)
    assert safe.states and safe.ok, safe.describe_failures()
    assert len(safe.states) >= SAVES
    assert unsafe.failures, unsafe.summary()
    # every bad state mounted and has config, but lost its content: mostly an empty file (the
    # rename committed before the data's allocation); when a journal commit caught the
    # allocation but not the data (unwritten extents), the file's blocks read as zeros
    odd = [state for state in unsafe.failures if not state.error.startswith(
        "AssertionError: config holds ")]
    assert not odd, "\n".join(f"entry {state.entry}: {state.error}" for state in odd)
    assert any("(the file is empty)" in state.error for state in unsafe.failures)
    assert all(state.label_before == "setup" for state in unsafe.states)
    # the bad state is real: rebuilt from entry 0 and mounted without the explorer, config is empty
    first = unsafe.failures[0]
    image = tmp_path / "first-bad.img"
    rename_logs[False].materialize(first.entry, image)
    with mounted_image(image, tmp_path / "mnt", RENAME_OPTIONS) as mnt:
        assert os.path.getsize(os.path.join(mnt, "config")) == 0
    # and the last state (after the last fsync) holds the last version
    last = unsafe.states[-1]
    assert last.ok and last.entry == crash_points(rename_logs[False], "flush", "setup")[-1]


# -- a workload of files written, fsynced, renamed and deleted, with a model of its contents --

BLOCK = 4096


def version(name: str, number: int) -> bytes:
    """Content of one block: the name and version on every line, so no two versions share bytes."""
    line = f"{name} version {number} ".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


class FilesModel:
    """What the workload wrote: each name's versions and the marks between which each is durable.

    ``durable[name]`` lists (from mark, until mark, version number, present)
    in workload order: after the first mark and before the second (None: to
    the end) the name holds that version or a later one (a later save may
    already be on disk), or is gone when present is False.  The until mark is
    logged before the workload starts to remove the name: the removal can be
    durable before the mark that follows it.
    """

    NAMES = ("a", "b", "c", "d", "a.tmp", "d.tmp")

    def __init__(self) -> None:
        self.versions: Dict[str, List[bytes]] = {name: [] for name in self.NAMES}
        self.durable: Dict[str, List[Tuple[str, Optional[str], int, bool]]] = \
            {name: [] for name in self.NAMES}

    def write(self, mnt: str, name: str, number: int, sync: bool) -> None:
        data = version(name.replace(".tmp", ""), number)
        self.versions[name].append(data)
        if name.endswith(".tmp"):
            self.versions[name[:-4]].append(data)
        write_file(os.path.join(mnt, name), data, sync=sync, sync_dir=False)

    def durable_from(self, rec, label: str, name: str, number: int, present: bool = True,
                     until: Optional[str] = None) -> None:
        rec.mark(label)
        self.durable[name].append((label, until, number, present))

    def workload(self, mnt: str, rec) -> None:
        rec.mark("start")
        self.write(mnt, "a", 1, sync=True)
        fsync_dir(mnt)
        self.durable_from(rec, "a-v1", "a", 1)
        self.write(mnt, "b", 1, sync=False)                  # never fsynced, only synced at the end
        self.write(mnt, "a.tmp", 2, sync=True)               # a safe save of a's version 2
        os.rename(os.path.join(mnt, "a.tmp"), os.path.join(mnt, "a"))
        fsync_dir(mnt)
        self.durable_from(rec, "a-v2", "a", 2)
        self.write(mnt, "c", 1, sync=True)
        fsync_dir(mnt)
        self.durable_from(rec, "c-v1", "c", 1, until="c-unlink")
        rec.mark("c-unlink")
        os.unlink(os.path.join(mnt, "c"))
        fsync_dir(mnt)
        self.durable_from(rec, "c-gone", "c", 0, present=False)
        self.write(mnt, "d.tmp", 1, sync=False)              # an unsafe save: no fsync before rename
        os.rename(os.path.join(mnt, "d.tmp"), os.path.join(mnt, "d"))
        self.write(mnt, "a.tmp", 3, sync=True)
        os.rename(os.path.join(mnt, "a.tmp"), os.path.join(mnt, "a"))
        fsync_dir(mnt)
        self.durable_from(rec, "a-v3", "a", 3)
        self.durable["a.tmp"].append(("a-v3", None, 0, False))
        fs.syncfs(mnt)
        rec.mark("end")
        for name, number in (("b", 1), ("d", 1)):
            self.durable[name].append(("end", None, number, True))
        self.durable["d.tmp"].append(("end", None, 0, False))

    def check(self, tree: Dict[str, bytes]) -> None:
        """The rule of any state: every file absent, a whole version, or (not synced yet) empty
        or a block of zeros: its size and blocks reached the disk, not its data (ext4 shows
        that for a file renamed before its data was written, as d is)."""
        unknown = sorted(set(tree) - set(self.NAMES))
        assert not unknown, f"files the workload never made: {unknown}"
        for name, data in tree.items():
            assert data in self.versions[name] or not data.strip(b"\0"), \
                f"{name} holds {len(data)} bytes that are no version of it: {data[:40]!r}"

    def check_at(self, log: WriteLog, entry: int, tree: Dict[str, bytes]) -> None:
        """The rules that depend on the crash point: what was made durable before it holds."""
        for name, promises in self.durable.items():
            passed = [(n, present) for label, until, n, present in promises
                      if log.index_of(label) < entry
                      and (until is None or entry < log.index_of(until))]
            if not passed:
                continue
            number, present = passed[-1]
            if not present:
                assert name not in tree, f"{name} is back at entry {entry} after it was removed"
                continue
            assert name in tree, f"{name} is gone at entry {entry}, after its version {number} " \
                "was made durable"
            later = self.versions[name][number - 1:]
            assert tree[name] in later, f"{name} at entry {entry} is not version {number} " \
                "or later"


def read_tree(mount_point: str) -> Dict[str, bytes]:
    """Every regular file under mount_point (lost+found aside): relative path -> content."""
    tree = {}
    for top, dirs, files in os.walk(mount_point):
        dirs[:] = sorted(d for d in dirs if not (top == mount_point and d == "lost+found"))
        for name in files:
            path = os.path.join(top, name)
            with open(path, "rb") as fh:
                tree[os.path.relpath(path, mount_point)] = fh.read()
    return tree


def tree_digest(tree: Dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tree):
        digest.update(name.encode() + b"\0" + hashlib.sha256(tree[name]).digest())
    return digest.hexdigest()


class TreeCheck:
    """A check that applies the model's state rule and keeps every tree it saw, in order."""

    def __init__(self, model: FilesModel) -> None:
        self.model = model
        self.trees: List[Dict[str, bytes]] = []

    def __call__(self, mount_point: str) -> None:
        tree = read_tree(mount_point)
        self.trees.append(tree)
        self.model.check(tree)


def checked_states(report: CrashReport) -> list:
    """The states whose check ran (a failed mount or fsck skips it), in the order checked."""
    return [state for state in report.states if "check" in state.timings]


class Recorded:
    def __init__(self, log: WriteLog, model: FilesModel, fs_type: str) -> None:
        self.log, self.model, self.fs_type = log, model, fs_type


def record_files(tmp_path_factory, fs_type: str, size: int) -> Iterator[Recorded]:
    model = FilesModel()
    with recorded(tmp_path_factory.mktemp(fs_type) / "rec", fs_type, size, "",
                  model.workload) as log:
        yield Recorded(log, model, fs_type)


@pytest.fixture(scope="module")
def ext4_files(tmp_path_factory) -> Iterator[Recorded]:
    yield from record_files(tmp_path_factory, "ext4", EXT4_SIZE)


@pytest.fixture(scope="module")
def xfs_files(tmp_path_factory) -> Iterator[Recorded]:
    yield from record_files(tmp_path_factory, "xfs", XFS_SIZE)


@pytest.fixture(scope="module")
def btrfs_files(tmp_path_factory) -> Iterator[Recorded]:
    yield from record_files(tmp_path_factory, "btrfs", BTRFS_SIZE)


def explore_files(recorded_files: Recorded, **options) -> Tuple[CrashReport, TreeCheck]:
    check = TreeCheck(recorded_files.model)
    report = explore(recorded_files.log, check, after="start", **options)
    return report, check


@pytest.mark.parametrize("fs_type", ["xfs", "btrfs"])
def test_every_flush_state_mounts_and_holds_whole_versions(request, fs_type):
    rec: Recorded = request.getfixturevalue(f"{fs_type}_files")
    log = rec.log
    report, check = explore_files(rec)
    expected = crash_points(log, "flush", "start")
    assert [state.entry for state in report.states] == expected and len(expected) >= 6
    assert report.ok, report.describe_failures()
    assert len(check.trees) == len(report.states)
    for state, tree in zip(report.states, check.trees):
        rec.model.check_at(log, state.entry, tree)
    # a state's kernel log is its mount and check: it ends before the view is torn down (the
    # kernel rate-limits some mount messages, so not every state has one)
    assert not [line for state in report.states for line in state.kernel_log
                if "shut" in line.lower() or "unmount" in line.lower()]
    # (the words differ: btrfs on 5.10 says "has skinny extents", not "mounting"; every line of
    # the mount names the view's device)
    assert any("dm-" in line or "dmflakey-crash-" in line for line in report.states[0].kernel_log), \
        report.states[0].kernel_log
    # the model is not vacuous: the states saw a's three versions, c come and go, b and d at the end
    seen_a = {tree.get("a") for tree in check.trees}
    assert {version("a", n) for n in (1, 2, 3)} <= seen_a
    assert any("c" in tree for tree in check.trees) and "c" not in check.trees[-1]
    assert check.trees[-1] == {"a": version("a", 3), "b": version("b", 1), "d": version("d", 1)}


@pytest.fixture(scope="module")
def ext4_explored(ext4_files) -> Tuple[CrashReport, TreeCheck]:
    return explore_files(ext4_files)


def evenly(items: Sequence, count: int) -> list:
    """count items spread evenly over items, the first and the last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


def test_checked_states_equal_from_scratch_replays(ext4_files, ext4_explored, tmp_path):
    log = ext4_files.log
    report, check = ext4_explored
    assert report.ok, report.describe_failures()
    states = checked_states(report)
    assert len(states) == len(report.states) == len(check.trees) >= 6
    for state, tree in zip(states, check.trees):
        ext4_files.model.check_at(log, state.entry, tree)
    sample = evenly(list(zip(states, check.trees)), 6)
    for state, tree in sample:
        image = tmp_path / f"at-{state.entry}.img"
        log.materialize(state.entry, image)
        with mounted_image(image, tmp_path / "mnt") as mnt:
            scratch = read_tree(mnt)
        image.unlink()
        assert tree_digest(scratch) == tree_digest(tree), \
            f"entry {state.entry}: the explorer saw {sorted(tree)}, a from-scratch replay " \
            f"{sorted(scratch)}"
    assert len({tree_digest(tree) for _, tree in sample}) >= 3, "the sample is not diverse"


# -- reorder ------------------------------------------------------------------------------------

def apply_entries(image: bytearray, log: WriteLog, indexes) -> None:
    """The entries' writes (and discards, as zeros) put into image, by plain slicing."""
    ss = log.sector_size
    for i in indexes:
        entry = log[i]
        if entry.flags & LogFlags.MARK or not entry.nr_sectors:
            continue
        start, end = entry.sector * ss, (entry.sector + entry.nr_sectors) * ss
        image[start:end] = bytes(end - start) if entry.flags & LogFlags.DISCARD \
            else log.read_data(i)


def previous_flush(log: WriteLog, point: int) -> int:
    """The last entry before point with a preflush: the block layer's only ordering point (a FUA
    write makes itself durable, not the writes before it)."""
    return max((i for i in range(point) if log[i].flags & LogFlags.FLUSH), default=-1)


def droppable(log: WriteLog, base: int, point: int) -> List[int]:
    """Entries in (base, point] that a disk may have lost: writes and discards, FUA ones aside."""
    return [i for i in range(base + 1, point + 1)
            if log[i].nr_sectors and not log[i].flags & (LogFlags.MARK | LogFlags.FUA)]


def test_reorder_states_lack_exactly_their_dropped_writes(ext4_files, tmp_path):
    log = ext4_files.log
    candidates = [p for p in crash_points(log, "flush", "start")
                  if len(droppable(log, previous_flush(log, p), p)) >= 3]
    points = evenly(candidates, 4)
    assert len(points) >= 3, "the workload left too few flush points with unflushed writes"
    # and a point between two flushes, before a flush point: the two share the flush before them
    last = points[-1]
    writes = droppable(log, previous_flush(log, last), last)
    middle = writes[len(writes) // 2]
    assert middle < last and len(droppable(log, previous_flush(log, middle), middle)) >= 2
    points = sorted(points + [middle])
    # the "fsck" sees each view before the mount (which writes: journal recovery, orphans)
    sums = tmp_path / "md5sums"
    reorder = 3
    report = explore(log, lambda mount_point: None, points=points, reorder=reorder, seed=7,
                     fsck=["sh", "-c", f'md5sum "$0" >> {sums}'])
    assert report.ok, report.describe_failures()
    lines = sums.read_text().splitlines()
    assert len(lines) == len(report.states)
    seen = {state.index: line.split()[0] for state, line in zip(report.states, lines)}
    differs = 0
    for point in points:
        base = previous_flush(log, point)
        writes = droppable(log, base, point)
        at_point = [s for s in report.states if s.entry == point]
        reordered, plain = at_point[:-1], at_point[-1]
        assert plain.kind == "point" and all(s.kind == "reorder" for s in reordered)
        assert len(reordered) == min(reorder, 2 ** len(writes) - 2)
        dropped_sets = [s.dropped for s in reordered]
        assert len(set(dropped_sets)) == len(dropped_sets), f"repeated subsets at {point}"
        image = bytearray(log.device_size)
        apply_entries(image, log, range(base + 1))
        for state in reordered:
            assert state.dropped and set(state.dropped) <= set(writes), state.dropped
            kept = [i for i in range(base + 1, point + 1) if i not in state.dropped]
            rebuilt = bytearray(image)
            apply_entries(rebuilt, log, kept)
            assert seen[state.index] == hashlib.md5(rebuilt).hexdigest(), \
                f"entry {point} without {state.dropped}: the snapshot differs from a rebuild"
            differs += seen[state.index] != seen[plain.index]
        apply_entries(image, log, range(base + 1, point + 1))
        assert seen[plain.index] == hashlib.md5(image).hexdigest(), f"entry {point}"
    assert differs, "no reordered state differed from its crash point"


# -- failures are verdicts ------------------------------------------------------------------

def first_write_covering(log: WriteLog, byte: int, start: int = 1) -> int:
    ss = log.sector_size
    return next(i for i in range(start, len(log)) if not log[i].flags & LogFlags.DISCARD
                and log[i].nr_sectors and log[i].sector * ss <= byte < (log[i].sector
                                                                        + log[i].nr_sectors) * ss)


def test_a_failing_mount_is_a_failed_state_not_an_exception(ext4_files):
    log = ext4_files.log
    mkfs = log.index_of("mkfs")
    superblock = first_write_covering(log, 1024 + 0x38)   # ext4's magic, in mkfs's last writes
    assert 1 < superblock < mkfs
    calls: List[str] = []
    report = explore(log, calls.append, points=[superblock - 1, mkfs], after=0)
    assert [s.entry for s in report.states] == [superblock - 1, mkfs] and len(calls) == 1
    early, made = report.states
    assert not early.ok and early.error.startswith("mount failed:") and "superblock" in early.error
    assert made.ok and "check" in made.timings
    # the kernel refuses the mount: its words are in the verdict
    bad = explore(log, calls.append, points=[mkfs], after=0, mount_options="dmfx_no_such_option")
    (state,) = bad.states
    assert not state.ok and state.error.startswith("mount failed:") and len(calls) == 1
    assert "EINVAL" in state.error or "Invalid argument" in state.error, state.error
    assert any("dmfx_no_such_option" in line for line in state.kernel_log), state.kernel_log
    assert "kernel: " in state.error and "dmfx_no_such_option" in state.error


def test_xfs_mid_mkfs_states_fail_with_the_kernels_words(xfs_files):
    """mkfs.xfs writes its super block early, flagged "in progress": the kernel refuses it."""
    log = xfs_files.log
    mkfs = log.index_of("mkfs")
    sb_writes = [i for i in range(1, mkfs) if log[i].nr_sectors and log[i].sector == 0
                 and not log[i].flags & LogFlags.DISCARD]
    calls: List[str] = []
    report = explore(log, calls.append, points=sb_writes + [mkfs], after=0)
    assert [s.entry for s in report.states] == sb_writes + [mkfs]
    refused = [s for s in report.states if not s.ok and "EUCLEAN" in s.error]
    assert refused, report.describe_failures()
    for state in refused:
        assert state.error.startswith("mount failed:") and "check" not in state.timings
        assert any("Offline file system operation in progress" in line
                   for line in state.kernel_log), state.kernel_log
        assert "kernel: XFS (" in state.error
    assert report.states[-1].ok and len(calls) == sum(s.ok for s in report.states)


# -- nothing leaks ------------------------------------------------------------------------------

def leftovers() -> Dict[str, set]:
    state = system_state()
    state["explore dirs"] = {str(p) for p in Path(tempfile.gettempdir()).glob("dmflakey-explore-*")}
    return state


@pytest.mark.parametrize("how", ["passes", "fails", "raises", "pytest.fail", "interrupted"])
def test_nothing_leaks(ext4_files, how):
    log = ext4_files.log
    points = crash_points(log, "flush", "a-v1")[:3]
    before = leftovers()
    during: List[Dict[str, set]] = []

    def check(mount_point: str) -> None:
        during.append(leftovers())
        if how == "fails":
            assert not mount_point, "deliberately failed"
        if how == "raises":
            raise OSError(errno.EIO, "deliberate I/O error")
        if how == "pytest.fail":   # pytest's outcome exceptions are BaseExceptions
            pytest.fail("deliberately failed by pytest.fail")
        if how == "interrupted" and len(during) == 2:
            raise KeyboardInterrupt

    if how == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            explore(log, check, points=points)
        assert len(during) == 2
    else:
        report = explore(log, check, points=points)
        assert len(report.states) == len(during) == 3
        if how == "passes":
            assert report.ok
        else:
            words = {"fails": "deliberately failed",
                     "pytest.fail": "deliberately failed by pytest.fail",
                     "raises": "OSError: [Errno 5] deliberate I/O error (EIO)"}[how]
            assert not report.ok and all(words in s.error for s in report.states), \
                report.describe_failures()
            assert all("test_explorer.py" in s.error for s in report.states)
    assert leftovers() == before
    # there was something to leak: while a state was checked, its view and its mount existed
    new = {key: during[0][key] - before[key] for key in before}
    assert [n for n in new["dm devices"] if n.startswith("dmflakey-crash-")], new
    assert len(new["loop devices"]) == 3 and len(new["explore dirs"]) == 1, new   # origin, 2 COW
    (work,) = new["explore dirs"]
    assert any(m.startswith(work) for m in new["mounts"]), new


# -- fsck ---------------------------------------------------------------------------------------

def test_fsck_runs_on_each_view_and_a_nonzero_exit_fails_the_state(ext4_files):
    log = ext4_files.log
    end = len(log) - 1                     # after the unmount: a clean filesystem
    middle = crash_points(log, "flush", "a-v2")[:2]
    calls: List[str] = []
    clean = explore(log, calls.append, points=[end], fsck=["e2fsck", "-fn"])
    assert clean.ok and len(calls) == 1, clean.describe_failures()
    assert clean.states[0].timings["fsck"] > 0 and clean.settings["fsck"] == ["e2fsck", "-fn"]
    # e2fsck's report reaches the verdict when the command fails (here: made to, after e2fsck)
    shown = explore(log, calls.append, points=middle + [end],
                    fsck=["sh", "-c", 'e2fsck -fn "$0" && exit 7'])
    assert len(calls) == 1 and len(shown.states) == 3
    for state in shown.states:
        assert not state.ok and state.error.startswith("fsck failed: sh -c"), state.error
        assert "/dev/mapper/dmflakey-crash-" in state.error
        assert "Pass 1: Checking inodes" in state.error, state.error
        assert "fsck" in state.timings and "mount" not in state.timings
    assert "exited with status 7" in shown.states[-1].error
    assert "Pass 5: Checking group summary information" in shown.states[-1].error
    refused = explore(log, calls.append, points=[end], fsck=["false"])
    (state,) = refused.states
    assert not state.ok and len(calls) == 1
    assert state.error.startswith("fsck failed: false /dev/mapper/dmflakey-crash-")
    assert "exited with status 1" in state.error


# -- the pytest fixture, from a test file of a user ----------------------------------------------

USER_TEST = '''
import os

SAFE = {safe}
SAVES = 3


def text(version):
    return f"config version {{version}}\\n".encode() * 200


def check(mount_point):
    with open(os.path.join(mount_point, "config"), "rb") as fh:
        data = fh.read()
    assert data in [text(v) for v in range(SAVES + 1)], \\
        f"config holds {{len(data)}} bytes" + (" (the file is empty)" if not data else "")


def test_atomic_save(crash_recorder_factory):
    rec = crash_recorder_factory(size=32 << 20, mount_options="noauto_da_alloc")
    config = os.path.join(rec.mount_point, "config")
    with open(config, "wb") as fh:
        fh.write(text(0))
        fh.flush()
        os.fsync(fh.fileno())
    rec.mark("setup")
    for version in range(1, SAVES + 1):
        with open(config + ".tmp", "wb") as fh:
            fh.write(text(version))
            if SAFE:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(config + ".tmp", config)
        with open(os.path.join(rec.mount_point, "other"), "ab") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    report = rec.explore(check, after="setup")
    assert report.ok and report.states
'''


def test_crash_recorder_fixture_in_a_users_test_file(pytester):
    pytester.makepyfile(test_safe_save=USER_TEST.format(safe=True),
                        test_unsafe_save=USER_TEST.format(safe=False))
    before = leftovers()
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert leftovers() == before
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_unsafe_save.py::test_atomic_save*"])
    output = result.stdout.str()
    assert "explored " in output and " FAILED, the first at entry " in output, output
    assert "(the file is empty)" in output and "rebuild a state: dmflakey replay" in output
    # one report named (twice where pytest runs with CI set: its short summary is not truncated then)
    named = sorted(set(re.findall(r"HTML report: (\S+)", output)))
    assert len(named) == 1, output
    basetemp = Path(named[0]).parents[2]          # <basetemp>/<test>/<recording>/crash-report.html
    reports = sorted(basetemp.rglob("crash-report.html"))
    assert len(reports) == 2 and Path(named[0]) in reports, reports   # the passing test's too
    html = Path(named[0]).read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "the file is empty" in html


# -- the command line -----------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def test_cli_explore_and_replay(ext4_files, tmp_path):
    log = ext4_files.log
    present, gone = log.index_of("c-v1"), log.index_of("c-gone")
    html = tmp_path / "out.html"
    run = dmflakey("explore", log.path, "--check", "sh -c 'test -e \"$0/c\"'", "--points",
                   f"{present},{gone}", "--html", str(html), "--json")
    assert run.returncode == 1, run
    data = json.loads(run.stdout)
    assert [(s["entry"], s["ok"]) for s in data["states"]] == [(present, True), (gone, False)]
    assert "exited with status 1" in data["states"][1]["error"]
    assert html.read_text().lstrip().lower().startswith("<!doctype html")
    run = dmflakey("explore", log.path, "--check", "sh -c 'test -e \"$0/c\"'", "--points",
                   f"{present},")   # a list of one entry (a bare number N means every Nth entry)
    assert run.returncode == 0 and "all passed" in run.stdout, run
    # a check command that does not exist fails the call, not every state
    line = fails(1, "explore", log.path, "--check", "no-such-checker -x", "--points", f"{present},")
    assert "no-such-checker" in line and "no such program" in line and "ENOENT" in line, line
    image, oracle = tmp_path / "cli.img", tmp_path / "materialized.img"
    run = dmflakey("replay", log.path, "--until", "c-v1", "--to", str(image))
    assert run.returncode == 0, run
    log.materialize(present, oracle)
    assert image.stat().st_size == oracle.stat().st_size == log.device_size
    assert file_digest(image) == file_digest(oracle)


# -- the view's teardown ------------------------------------------------------------------------

def block_digests(path: Path, block: int = 4096) -> List[bytes]:
    with open(path, "rb") as fh:
        return [hashlib.md5(chunk).digest() for chunk in iter(lambda: fh.read(block), b"")]


@pytest.mark.parametrize("fs_type,size", [("ext4", EXT4_SIZE), ("xfs", XFS_SIZE)])
def test_shut_down_leaves_the_unmount_next_to_nothing_to_write(tmp_path, fs_type, size):
    """What the explorer does to a view after its check: after fs.shut_down, writes fail and the
    unmount writes back nothing of what was pending (ext4 still wrote 3 blocks of 4 KiB, its
    super block among them; xfs none)."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(image, "wb") as fh:
        fh.truncate(size)
    fs.mkfs(str(image), fs_type)
    mnt.mkdir()
    with loop.attach(str(image)) as lo:
        fs.mount(lo.path, str(mnt))
        try:
            write_file(str(mnt / "synced"), b"synced" * 1000, sync=True, sync_dir=False)
            write_file(str(mnt / "unsynced"), b"unsynced" * 1000, sync=False)
            assert fs.shut_down(str(mnt)) is True
            with pytest.raises(OSError) as refused:
                write_file(str(mnt / "after"), b"x", sync=True, sync_dir=False)
            assert refused.value.errno == errno.EIO
            before = block_digests(image)
        finally:
            fs.umount(str(mnt))
        after = block_digests(image)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert len(changed) <= 4, f"the unmount wrote {len(changed)} blocks of 4 KiB"
        fs.mount(lo.path, str(mnt))
        try:
            assert (mnt / "synced").read_bytes() == b"synced" * 1000
            assert not (mnt / "unsynced").exists()   # pending at the shutdown: never written
        finally:
            fs.umount(str(mnt))
