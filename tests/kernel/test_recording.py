"""record_writes on the real kernel: a workload on ext4, xfs and btrfs, a full log, 4Kn, ownership.

The oracles are never the library's own rules: the data image the kernel wrote
(a full replay must equal it byte for byte), the files a mount of a replayed
state shows (the test wrote them with known content, synced or not, before or
after each mark), fiemap's sectors of a deleted file (where ext4's discard must
land), the kernel's BLKSSZGET, the kernel's device list, loop bindings and the
image files on disk.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set

import pytest

from dmflakey_ioctl import cleanup_stale, mount, umount
from dmflakey_ioctl.errors import InvalidArgumentError, LogFullError
from dmflakey_ioctl.fs import FSType
from dmflakey_ioctl.kernel import blockdev, dm, loop
from dmflakey_ioctl.kernel.fiemap import file_extents
from dmflakey_ioctl.ownership import Kind, Owner, Verdict
from dmflakey_ioctl.cleanup import list_owned
from dmflakey_ioctl.recording import Recording, open_recording, record_writes
from dmflakey_ioctl.writelog import END_MARK, LogFlags, WriteLog

from .helpers import Direct, dm_names, fsync_dir, sparse_file, unique_name, write_file

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SIZES = {FSType.EXT4: 64 * MiB, FSType.XFS: 320 * MiB, FSType.BTRFS: 128 * MiB}
# ext4 mounted with discard: every freed extent is discarded (the log must show it)
MOUNT_OPTIONS = {FSType.EXT4: "discard", FSType.XFS: "", FSType.BTRFS: ""}
IGNORED = {"lost+found"}    # made by mkfs.ext4


def wait_until(condition, message: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def same_files(a: Path, b: Path, chunk: int = 4 * MiB) -> Optional[int]:
    """None when the two files hold the same bytes; else the first differing offset (or a size)."""
    if a.stat().st_size != b.stat().st_size:
        return -1
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return pos + next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)
            if not x:
                return None
            pos += len(x)


class State(NamedTuple):
    """What a mount of the disk at a mark must show: files with their content."""

    synced: Dict[str, bytes]     # must be there, exactly
    maybe: Dict[str, bytes]      # written without sync before the mark: absent, or a prefix
    later: Set[str]              # written after the mark: must be absent


def files_in(mnt: str) -> Dict[str, bytes]:
    out = {}
    for name in sorted(set(os.listdir(mnt)) - IGNORED):
        with open(os.path.join(mnt, name), "rb") as fh:
            out[name] = fh.read()
    return out


def check_state(found: Dict[str, bytes], state: State, where: str) -> None:
    for name, content in state.synced.items():
        assert name in found, f"{where}: synced file {name} is missing (found {sorted(found)})"
        assert found[name] == content, f"{where}: synced file {name} has other content"
    for name in state.later:
        if name not in state.synced:
            assert name not in found, f"{where}: {name} was written after the mark but is there"
    for name, content in found.items():
        if name in state.synced:
            continue
        assert name in state.maybe, f"{where}: unexpected file {name} (found {sorted(found)})"
        assert state.maybe[name].startswith(content), f"{where}: unsynced {name} holds other bytes"


def mounted_files(image: Path, mnt: str, fs_type: FSType, block_size: Optional[int] = None
                  ) -> Dict[str, bytes]:
    """The files a mount of image shows (on a loop device of its own; unmounted and detached after)."""
    with loop.attach(str(image), block_size=block_size) as dev:
        mount(dev.path, mnt, fs_type)
        try:
            return files_in(mnt)
        finally:
            umount(mnt)


@pytest.fixture
def recordings() -> Iterator[List[Recording]]:
    """Recordings a test makes; whatever a failing test left of them is torn down."""
    made: List[Recording] = []
    yield made
    for rec in made:
        rec.teardown()


@pytest.fixture
def mnt(tmp_path) -> str:
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    if os.path.ismount(path):
        umount(str(path))


# -- 1. a workload on each filesystem -------------------------------------------------------------

@pytest.mark.parametrize("fs_type", list(SIZES), ids=[t.value for t in SIZES])
def test_workload_marks_full_replay_and_replay_to_each_mark(fs_type, tmp_path, mnt, recordings):
    name = unique_name("dmfi-rec")
    rec = record_writes(name, str(tmp_path), fs_type, size=SIZES[fs_type])
    recordings.append(rec)
    assert rec.device_path == f"/dev/mapper/{name}" and name in dm_names()
    rec.mount(mnt, MOUNT_OPTIONS[fs_type])
    path = lambda n: os.path.join(mnt, n)  # noqa: E731
    A, B, C = data(1, 200 * 1024), data(2, 1 * MiB), data(3, 150 * 1024)
    U1, U2, LATE = data(4, 100 * 1024), data(5, 50 * 1024), data(6, 70 * 1024)
    states: Dict[str, State] = {}

    write_file(path("a"), A, sync=True)
    rec.mark("a-synced")
    states["a-synced"] = State({"a": A}, {}, {"u1", "b", "a-renamed", "c", "u2", "late"})

    write_file(path("u1"), U1, sync=False)
    write_file(path("b"), B, sync=True)
    rec.mark("b-synced")
    states["b-synced"] = State({"a": A, "b": B}, {"u1": U1}, {"a-renamed", "c", "u2", "late"})

    b_sectors = file_extents(path("b"))        # where b's blocks are, before they are freed
    os.rename(path("a"), path("a-renamed"))
    os.unlink(path("b"))
    fsync_dir(mnt)
    rec.mark("renamed-deleted")
    states["renamed-deleted"] = State({"a-renamed": A}, {"u1": U1}, {"c", "u2", "late"})

    write_file(path("c"), C, sync=True)
    write_file(path("u2"), U2, sync=False)
    rec.mark("c-synced")
    states["c-synced"] = State({"a-renamed": A, "c": C}, {"u1": U1}, {"u2", "late"})
    write_file(path("late"), LATE, sync=False)
    final = {"a-renamed": A, "u1": U1, "c": C, "u2": U2, "late": LATE}

    log = rec.stop()                           # unmounts
    try:
        assert not os.path.ismount(mnt) and name not in dm_names()
        labels = [log[i].label for i in log.mark_points()]
        assert labels == [f"dmflakey-size:{SIZES[fs_type]}", "mkfs", *states, END_MARK]
        assert log.device_size == SIZES[fs_type] and log.sector_size == 512
        assert log.nr_entries == len(log) and log.entries_beyond_count == 0
        mkfs_mark = log.index_of("mkfs")
        # fsync and the marks: each synced step's flush is logged before its mark
        flushes = log.flush_points()
        for label in states:
            assert any(log.index_of("mkfs") < i < log.index_of(label) for i in flushes), label
        if fs_type is FSType.EXT4:
            # the discard mount option: b's freed blocks are discarded, after mkfs
            discards = [e for e in log if e.flags & LogFlags.DISCARD and e.index > mkfs_mark]
            assert discards, "no DISCARD entry after mkfs although ext4 was mounted with discard"
            b_ranges = [(s * 512, (s + n) * 512) for s, n in b_sectors]
            covered = sum(max(0, min(e.offset + e.size, end) - max(e.offset, start))
                          for e in discards for start, end in b_ranges)
            assert covered >= len(B), f"b's {len(B)} bytes at {b_ranges}: {covered} discarded"

        full = sparse_file(tmp_path / "full.img", SIZES[fs_type])
        result = log.replay(full)
        assert result.entries == len(log)
        assert same_files(full, Path(rec.image_path)) is None, "full replay differs from the data image"
        assert mounted_files(full, mnt, fs_type) == final
        full.unlink()

        for label, state in states.items():
            image = sparse_file(tmp_path / f"{label}.img", SIZES[fs_type])
            log.replay(image, until=label)
            check_state(mounted_files(image, mnt, fs_type), state, f"{fs_type.value} at {label}")
            image.unlink()
    finally:
        log.close()
    assert not Path(rec.log_path).exists()    # the handed-over log went with close()
    assert Path(rec.image_path).exists()      # the data image stays with the Recording
    rec.teardown()
    assert not Path(rec.image_path).exists()


# -- 2. a log too small for the workload ----------------------------------------------------------

def test_a_full_log_is_an_error_at_mark_and_at_stop(tmp_path, mnt, recordings):
    name = unique_name("dmfi-recfull")
    log_size = 6 * MiB                        # mkfs.ext4 of 32 MiB logs about 4.5 MiB
    rec = record_writes(name, str(tmp_path), FSType.EXT4, size=32 * MiB, log_size=log_size)
    recordings.append(rec)
    images = (Path(rec.image_path), Path(rec.log_path))
    loops = (rec.data.loop_path, rec.log.loop_path)
    rec.mount(mnt)
    rec.mark("fits")
    written = 0
    for n in range(4):
        content = data(10 + n, 2 * MiB)
        write_file(os.path.join(mnt, f"f{n}"), content, sync=True)
        written += len(content)
    # the kernel's word: the log device is full (its log thread gets there a moment later)
    wait_until(lambda: rec.status().logging_disabled, "the status never said logging_disabled")

    with pytest.raises(LogFullError) as at_mark:
        rec.mark("too-late")
    err = at_mark.value
    assert err.errno == errno.ENOSPC and err.log_size == log_size
    assert err.needed > log_size and err.needed >= written
    assert str(log_size) in str(err) and str(err.needed) in str(err) and name in str(err)

    with pytest.raises(LogFullError) as at_stop:
        rec.stop()
    err2 = at_stop.value
    assert err2.errno == errno.ENOSPC and err2.log_size == log_size and str(log_size) in str(err2)
    assert err2.needed >= err.needed, f"needed at stop {err2.needed} < needed at mark {err.needed}"
    assert err2.operation == "stop" and not os.path.ismount(mnt) and name not in dm_names()

    rec.teardown()
    assert not any(p.exists() for p in images)
    assert all(loop.bound_identity(p) is None or loop.bound_identity(p) not in
               (rec.data.identity, rec.log.identity) for p in loops)


def test_a_log_that_fills_up_at_stop_is_an_error(tmp_path, recordings):
    """Writes not yet flushed are logged when the device is removed: stop() must see them overflow."""
    name = unique_name("dmfi-recstop")
    log_size = 1 * MiB
    rec = record_writes(name, str(tmp_path), None, size=8 * MiB, log_size=log_size)
    recordings.append(rec)
    with Direct(rec.device_path) as dev:
        for n in range(8):                    # 2 MiB, never flushed: logged only at removal
            dev.write(n * 256 * 1024, data(40 + n, 256 * 1024))
    time.sleep(0.2)
    assert not rec.status().logging_disabled  # nothing of it reached the log yet
    with pytest.raises(LogFullError) as info:
        rec.stop()
    err = info.value
    assert err.errno == errno.ENOSPC and err.log_size == log_size and err.needed > 2 * MiB
    with WriteLog.open(rec.log_path) as log:  # the kernel's log on disk: it really is truncated
        assert END_MARK not in log.marks
    rec.teardown()
    assert not Path(rec.image_path).exists() and not Path(rec.log_path).exists()


def test_a_log_too_small_for_mkfs_fails_record_writes_and_leaves_nothing(tmp_path):
    name = unique_name("dmfi-recmkfs")
    with pytest.raises(LogFullError) as info:
        record_writes(name, str(tmp_path), FSType.EXT4, size=32 * MiB, log_size=64 * 1024)
    assert info.value.errno == errno.ENOSPC and info.value.needed > 64 * 1024
    assert name not in dm_names()
    assert not list(tmp_path.iterdir())       # neither image is left


# -- 3. 4Kn -------------------------------------------------------------------------------------------

def test_4kn_recording(tmp_path, mnt, recordings):
    name = unique_name("dmfi-rec4k")
    size = 32 * MiB
    rec = record_writes(name, str(tmp_path), FSType.EXT4, size=size, block_size=4096)
    recordings.append(rec)
    for path in (rec.data.loop_path, rec.log.loop_path, rec.device_path):
        assert blockdev.logical_block_size(path) == 4096, path
    assert rec.sector_size == 4096
    rec.mount(mnt)
    content = data(20, 300 * 1024)
    write_file(os.path.join(mnt, "kept"), content, sync=True)
    longest = "L" * (4096 - 33)                 # the most the kernel keeps with 4096-byte sectors
    rec.mark(longest)
    count = rec.entries
    with pytest.raises(InvalidArgumentError):
        rec.mark("L" * (4096 - 32))
    assert rec.entries == count                 # refused before the message
    write_file(os.path.join(mnt, "later"), data(21, 8192), sync=False)
    log = rec.stop()
    try:
        assert log.sector_size == 4096
        assert [log[i].label for i in log.mark_points()] == \
            [f"dmflakey-size:{size}", "mkfs", longest, END_MARK]
        assert all(e.offset % 4096 == 0 for e in log)
        full = sparse_file(tmp_path / "full.img", size)
        log.replay(full)
        assert same_files(full, Path(rec.image_path)) is None
        full.unlink()
        state = sparse_file(tmp_path / "state.img", size)
        log.replay(state, until=longest)
        found = mounted_files(state, mnt, FSType.EXT4, block_size=4096)
        assert found == {"kept": content}
        state.unlink()
    finally:
        log.close()


# -- 4. ownership and cleanup ---------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, time
    from dmflakey_ioctl.recording import record_writes
    rec = record_writes(sys.argv[1], sys.argv[2], None, size=4 << 20, log_size=3 << 20,
                        block_size=4096)
    print(json.dumps({"image": rec.image_path, "log": rec.log_path, "size": rec.size,
                      "log_size": rec.log_size, "sector_size": rec.sector_size, "uuid": rec.uuid,
                      "loops": [rec.data.loop_path, rec.log.loop_path],
                      "identities": [rec.data.identity, rec.log.identity]}), flush=True)
    time.sleep(600)
""")


def test_a_killed_creators_recording_is_cleaned_up(tmp_path):
    name = unique_name("dmfi-reckill")
    child = subprocess.Popen([sys.executable, "-c", CHILD, name, str(tmp_path)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        made = json.loads(child.stdout.readline())
        rec = open_recording(name)            # read back from the kernel while the child lives
        assert (rec.image_path, rec.log_path) == (made["image"], made["log"])
        assert (rec.size, rec.log_size, rec.sector_size) == (4 * MiB, 3 * MiB, 4096)
        assert rec.uuid == made["uuid"] and rec.filesystem is None
        assert [rec.data.loop_path, rec.log.loop_path] == made["loops"]
        assert rec.owner.verdict() is Verdict.ALIVE
        assert name not in cleanup_stale()     # alive: not stale
        assert name in dm_names()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    owned = {d.name: d for d in list_owned()}
    assert owned[name].owner.verdict() is Verdict.STALE
    assert name in cleanup_stale()
    assert name not in dm_names()
    for path, identity in zip(made["loops"], made["identities"]):
        assert loop.bound_identity(path) != tuple(identity), f"{path} still holds our image"
    assert not Path(made["image"]).exists() and not Path(made["log"]).exists()


def test_open_recording_counts_in_the_data_devices_block_size(tmp_path):
    """A log-writes device over a 4Kn data device and a 512-byte log device, made by hand.

    The kernel counts the log in the DATA device's logical block size: the
    longest label it keeps is 4096 - 33 bytes, whatever the log device's is.
    """
    name = unique_name("dmfi-recmix")
    data_image = sparse_file(tmp_path / "data.img", 4 * MiB)
    log_image = sparse_file(tmp_path / "log.img", 2 * MiB)
    longest = "M" * (4096 - 33)
    with loop.attach(str(data_image), block_size=4096) as data_dev, loop.attach(str(log_image)) as log_dev:
        try:
            dm.create(name, uuid=Owner.current(Kind.RECORDING).uuid())
            dm.load(name, [(0, 4 * MiB // 512, "log-writes",
                            f"{data_dev.major_minor} {log_dev.major_minor}")])
            dm.resume(name)
            rec = open_recording(name)
            assert (rec.size, rec.log_size, rec.sector_size) == (4 * MiB, 2 * MiB, 4096)
            assert (rec.image_path, rec.log_path) == (str(data_image), str(log_image))
            rec.mark(longest)
        finally:
            if name in dm_names():
                dm.remove(name)
    with WriteLog.open(log_image) as log:
        assert log.sector_size == 4096
        assert [log[i].label for i in log.mark_points()] == [longest, END_MARK]


def test_teardown_after_stop_keeps_the_handed_over_log(tmp_path, recordings):
    name = unique_name("dmfi-reckeep")
    rec = record_writes(name, str(tmp_path), None, size=4 * MiB)
    recordings.append(rec)
    fd = os.open(rec.device_path, os.O_WRONLY)
    try:
        os.pwrite(fd, data(30, 64 * 1024), MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    rec.mark("written")
    log = rec.stop()
    image, log_path = Path(rec.image_path), Path(rec.log_path)
    rec.teardown()
    assert not image.exists() and log_path.exists()     # the log is the WriteLog's now
    count = len(log)
    assert log.index_of("written") < count - 1
    log.close(keep=True)
    assert log_path.exists()
    with WriteLog.open(log_path) as again:                # opened without ownership: never deleted
        assert len(again) == count
        state = sparse_file(tmp_path / "state.img", 4 * MiB)
        again.replay(state, until="written")
        assert state.read_bytes()[MiB:MiB + 64 * 1024] == data(30, 64 * 1024)
    assert log_path.exists()
    log_path.unlink()
