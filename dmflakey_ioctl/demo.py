"""``dmflakey demo``: a power failure shown in seconds, on a throwaway flakey device.

A small ext4 image in a temp dir is mapped, mounted with commit=1000 (so no
background journal commit makes unsynced data durable behind the demo's
back), written to, and then the power is cut: writes are dropped from that
moment and the filesystem is unmounted, so everything not yet on disk is
gone, as after a real outage.  The device is mounted again and the demo
reports what survived.  Everything it made is removed at the end, also when
it fails; the device belongs to this process, so ``dmflakey cleanup`` takes
it away should the demo be killed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

from . import fs
from .flakey import Flakey, init_flakey

__all__ = ["run", "SCENARIOS"]

SCENARIOS = ("files", "sqlite")
IMAGE_SIZE = 64 << 20
MOUNT_OPTIONS = "commit=1000"
SYNCED_DATA = b"written, then fsync()ed: on disk before the power cut\n" * 64
UNSYNCED_DATA = b"written without fsync(): only in the page cache at the power cut\n" * 64

Say = Callable[[str], None]


def _progress(out: TextIO) -> Say:
    """Lines prefixed with the seconds since the demo started."""
    start = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - start:5.2f}s] {text}", file=out, flush=True)
    return say


def _write(path: str, data: bytes, sync: bool) -> None:
    """Write a new file; with sync, fsync it and its directory (what durability takes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _file_state(path: str, expected: bytes) -> Tuple[bool, str]:
    """(intact, what is there now) for a file written before the power cut."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False, "lost (the file is gone)"
    if data == expected:
        return True, f"survived ({len(data)} bytes, content intact)"
    if not data:
        return False, "lost (the file exists but is empty)"
    return False, f"damaged ({len(data)} of {len(expected)} bytes, content differs)"


def _power_cut(dev: Flakey, mnt: str, say: Say, databases: Sequence[sqlite3.Connection] = ()
               ) -> None:
    """Drop writes, then close the open databases (their last writes are lost too) and unmount."""
    dev.drop_writes()
    say("POWER CUT: the device drops every write from now on")
    for conn in databases:
        conn.close()
    fs.umount(mnt)
    say("unmounted: the filesystem's last writes went nowhere")


def _power_on(dev: Flakey, mnt: str, say: Say) -> None:
    dev.allow_writes()
    dev.mount(mnt)
    say("power back: writes allowed, filesystem mounted again (journal replayed)")


def _files(dev: Flakey, mnt: str, say: Say, out: TextIO) -> bool:
    synced, unsynced = os.path.join(mnt, "synced.txt"), os.path.join(mnt, "unsynced.txt")
    _write(synced, SYNCED_DATA, sync=True)
    say(f"wrote synced.txt ({len(SYNCED_DATA)} bytes) and fsync()ed it and its directory")
    _write(unsynced, UNSYNCED_DATA, sync=False)
    say(f"wrote unsynced.txt ({len(UNSYNCED_DATA)} bytes), no fsync()")
    _power_cut(dev, mnt, say)
    _power_on(dev, mnt, say)
    synced_ok, synced_text = _file_state(synced, SYNCED_DATA)
    unsynced_ok, unsynced_text = _file_state(unsynced, UNSYNCED_DATA)
    print("\nwhat survived the power cut:", file=out)
    print(f"  synced.txt    {synced_text}", file=out)
    print(f"  unsynced.txt  {unsynced_text}", file=out)
    expected = synced_ok and not unsynced_ok
    if expected:
        print("as expected: only what was fsync()ed was on disk when the power went.", file=out)
    else:
        print("UNEXPECTED: the synced file must survive and the unsynced one must not.", file=out)
    return expected


def _commit(path: str, synchronous: str, count: int) -> sqlite3.Connection:
    """Commit count one-row transactions; the connection stays open, as in a running app."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for i in range(1, count + 1):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO tx (id, note) VALUES (?, ?)", (i, f"transaction {i}"))
            conn.execute("COMMIT")
    except BaseException:
        conn.close()  # an open database would keep the filesystem from unmounting
        raise
    return conn


def _db_state(path: str) -> Tuple[int, str]:
    """(committed rows found, integrity_check verdict) after the power cut."""
    if not os.path.exists(path):
        return 0, "database file gone"
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        return 0, f"cannot open: {exc}"
    try:
        integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        try:
            rows = conn.execute("SELECT count(*) FROM tx").fetchone()[0]
        except sqlite3.OperationalError as exc:  # e.g. the table itself is gone
            rows, integrity = 0, f"{integrity} ({exc})"
        return rows, integrity
    except sqlite3.Error as exc:
        return 0, f"failed: {exc}"
    finally:
        conn.close()


def _sqlite(dev: Flakey, mnt: str, say: Say, out: TextIO, transactions: int) -> bool:
    modes = ("FULL", "OFF")
    paths = {mode: os.path.join(mnt, f"{mode.lower()}.db") for mode in modes}
    for path in paths.values():
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE tx (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fs.syncfs(mnt)
    say("made full.db and off.db (WAL mode, empty table) and synced them to disk")
    conns: List[sqlite3.Connection] = []
    try:
        for mode in modes:  # FULL first: its fsyncs must not carry OFF's writes to disk
            conns.append(_commit(paths[mode], mode, transactions))
            say(f"{os.path.basename(paths[mode])}: committed {transactions} transactions with "
                f"synchronous={mode}")
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    _power_cut(dev, mnt, say, conns)
    _power_on(dev, mnt, say)
    print("\nwhat survived the power cut:", file=out)
    expected = True
    for mode in modes:
        rows, integrity = _db_state(paths[mode])
        print(f"  synchronous={mode + ':':<5} {rows} of {transactions} committed transactions "
              f"survived; integrity_check: {integrity}", file=out)
        if mode == "FULL" and (rows != transactions or integrity != "ok"):
            expected = False
    if expected:
        print("as expected: in WAL mode, synchronous=FULL makes every commit durable; with OFF a "
              "commit is only as durable as the page cache.", file=out)
    else:
        print("UNEXPECTED: with synchronous=FULL every committed transaction must survive and the "
              "database must pass integrity_check.", file=out)
    return expected


def run(scenario: str = "files", *, transactions: int = 100, out: Optional[TextIO] = None) -> int:
    """Run the demo; 0 when what survived is what fsync promises, 1 otherwise."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    out = out or sys.stdout
    say = _progress(out)
    workdir = tempfile.mkdtemp(prefix="dmflakey-demo-")
    dev: Optional[Flakey] = None
    try:
        title = scenario if scenario == "files" else \
            f"sqlite, {transactions} transactions per database"
        print(f"dmflakey demo ({title}): a power failure on ext4 over dm-flakey", file=out)
        dev = init_flakey(f"dmflakey-demo-{os.getpid()}", workdir, fs.FSType.EXT4, size=IMAGE_SIZE)
        say(f"made {dev.device_path} over {dev.loop_device} ({IMAGE_SIZE >> 20} MiB ext4 image "
            f"in {workdir})")
        mnt = os.path.join(workdir, "mnt")
        os.mkdir(mnt)
        dev.mount(mnt, MOUNT_OPTIONS)
        say(f"mounted on {mnt} with {MOUNT_OPTIONS} (no background journal commits)")
        if scenario == "files":
            expected = _files(dev, mnt, say, out)
        else:
            expected = _sqlite(dev, mnt, say, out, transactions)
    finally:
        if dev is not None:
            dev.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    say("cleaned up: filesystem unmounted, device, loop device, image and temp dir removed")
    return 0 if expected else 1
