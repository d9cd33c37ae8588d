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

SCENARIOS = ("files", "sqlite", "rename")
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


RENAME_SAVES = 4
RENAME_OPTIONS = "noauto_da_alloc"   # ext4's rename heuristic off, as on many tuned systems


def _atomic_saves(mnt: str, safe: bool) -> None:
    """Save config several times by writing config.tmp and renaming it over config.

    The unsafe save skips the fsync of the temp file before the rename: the
    rename can reach the disk before the data.  After each save another file
    is fsynced, which commits the journal (and with it the rename).
    """
    config, temp, other = (os.path.join(mnt, n) for n in ("config", "config.tmp", "other"))
    for version in range(1, RENAME_SAVES + 1):
        with open(temp, "wb") as fh:
            fh.write(_config_text(version))
            if safe:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(temp, config)
        with open(other, "ab") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())


def _config_text(version: int) -> bytes:
    return f"config version {version}\n".encode() * 200


def _check_config(mount_point: str) -> None:
    """At any crash point, config holds one complete version: never empty, never torn."""
    with open(os.path.join(mount_point, "config"), "rb") as fh:
        data = fh.read()
    versions = [_config_text(v) for v in range(RENAME_SAVES + 1)]
    assert data in versions, f"config holds {len(data)} bytes that are no saved version" \
        + (" (the file is empty)" if not data else "")


def _rename(workdir: str, say: Say, out: TextIO) -> bool:
    """Record both saves, explore every crash state of each; True when only the unsafe one fails."""
    from .recording import record_writes
    found = {}
    for safe in (False, True):
        label = "safe (fsync before rename)" if safe else "unsafe (no fsync before rename)"
        directory = os.path.join(workdir, "safe" if safe else "unsafe")
        os.mkdir(directory)
        with record_writes(f"dmflakey-demo-{os.getpid()}-{int(safe)}", directory, fs.FSType.EXT4,
                           IMAGE_SIZE) as rec:
            mnt = os.path.join(directory, "mnt")
            os.mkdir(mnt)
            rec.mount(mnt, RENAME_OPTIONS)
            _write(os.path.join(mnt, "config"), _config_text(0), sync=True)
            rec.mark("setup")  # crash states are explored from here: config exists, synced
            _atomic_saves(mnt, safe)
            say(f"{label}: {RENAME_SAVES} saves recorded ({rec.entries} log entries)")
            log = rec.stop()
            try:
                report = log.explore(_check_config, after="setup", mount_options=RENAME_OPTIONS)
            finally:
                log.close()
        found[safe] = report
        say(f"{label}: {report.summary()}")
    print("\nwhat the crash states show:", file=out)
    for safe, report in found.items():
        name = "safe  " if safe else "unsafe"
        failures = report.failures
        line = f"  {name} {len(report.states)} crash states, {len(failures)} lost config's content"
        if failures:
            first = failures[0]
            line += f"; first bad state at entry {first.entry}: {first.error.splitlines()[0]}"
        print(line, file=out)
    expected = bool(found[False].failures) and not found[True].failures
    if expected:
        print("as expected: renaming an unsynced file over the old one can leave it empty after "
              "a crash; an fsync before the rename never does.", file=out)
    else:
        print("UNEXPECTED: the unsafe save must show a bad crash state and the safe one none.",
              file=out)
    return expected


def run(scenario: str = "files", *, transactions: int = 100, out: Optional[TextIO] = None) -> int:
    """Run the demo; 0 when what survived is what fsync promises, 1 otherwise."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    out = out or sys.stdout
    say = _progress(out)
    if scenario == "rename":
        workdir = tempfile.mkdtemp(prefix="dmflakey-demo-")
        try:
            print("dmflakey demo (rename): every crash state of an atomic save on ext4, recorded "
                  "with dm-log-writes", file=out)
            expected = _rename(workdir, say, out)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        say("cleaned up: recordings, logs, replay devices and temp dir removed")
        return 0 if expected else 1
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
