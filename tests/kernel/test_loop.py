"""Loop devices against the real kernel, with sysfs and losetup as second opinions.

Sizes and sector sizes are read back with hand-packed block-device ioctls, not
through the library; losetup is a test-only oracle (the library never runs it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.errors import DeviceBusyError, DeviceNotFoundError, InvalidArgumentError

from .helpers import dm_names, sparse_file, unique_name

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKROGET = 0x125E
MiB = 1 << 20


# --------------------------------------------------------------------------- oracles

def blk_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        return struct.unpack("=Q", buf)[0]
    finally:
        os.close(fd)


def blk_int(path: str, request: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, request, buf)
        return struct.unpack("=i", buf)[0]
    finally:
        os.close(fd)


def sysfs_backing(number: int) -> str | None:
    try:
        return Path(f"/sys/block/loop{number}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None


def bound_to(directory: Path) -> dict[str, str]:
    """/dev/loopN -> backing file, for every loop device bound to a file under directory."""
    out = {}
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = p.read_text().rstrip("\n")
        except OSError:
            continue
        if backing.startswith(f"{directory}/"):
            out[f"/dev/{p.parent.parent.name}"] = backing
    return out


def losetup(device: str) -> dict | None:
    """What `losetup --list` (all bound devices) says about one device, or None when it does not list it."""
    proc = subprocess.run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,RO,AUTOCLEAR,LOG-SEC"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"losetup failed: {proc.stderr.strip()}"
    if not proc.stdout.strip():
        return None
    rows = [row for row in json.loads(proc.stdout)["loopdevices"] if row["name"] == device]
    return rows[0] if rows else None


def flag(value: object) -> bool:
    return value in (True, 1, "1")


def assert_unbound(dev: loop.LoopDevice) -> None:
    assert sysfs_backing(dev.number) is None, f"{dev.path} is still bound to {sysfs_backing(dev.number)}"
    with pytest.raises(DeviceNotFoundError) as err:
        loop.info(dev.path)
    assert err.value.errno == errno.ENXIO


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def scratch(tmp_path):
    """A folder for images; every loop device still bound to one of them is detached afterwards."""
    folder = Path(os.path.realpath(tmp_path))
    yield folder
    for device in bound_to(folder):
        loop.detach(device)
    assert not bound_to(folder)


@pytest.fixture
def name():
    name = unique_name("dmfi-loop")
    yield name
    if name in dm_names():
        dm.remove(name)


# --------------------------------------------------------------------------- tests

def test_attach_and_detach_a_sparse_file(scratch):
    size = 8 * MiB + 3 * 512
    image = sparse_file(scratch / "sparse.img", size)
    assert os.stat(image).st_blocks == 0
    dev = loop.attach(str(image))
    try:
        assert dev.path == f"/dev/loop{dev.number}"
        st = os.stat(dev.path)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == dev.rdev
        assert Path(f"/sys/block/loop{dev.number}/dev").read_text().strip() == dev.major_minor
        assert dev.size == blk_size(dev.path) == size
        assert dev.backing_file == str(image) == sysfs_backing(dev.number)
        assert not dev.read_only and not dev.autoclear
        assert blk_int(dev.path, BLKSSZGET) == 512
        listed = losetup(dev.path)
        assert listed is not None and listed["back-file"] == str(image)
        assert not flag(listed["ro"]) and not flag(listed["autoclear"])
        # bytes written through the device land in the file, at the same offset
        fd = os.open(dev.path, os.O_RDWR)
        try:
            os.pwrite(fd, b"through loop", size - 512)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(image, "rb") as fh:
            fh.seek(size - 512)
            assert fh.read(12) == b"through loop"
    finally:
        dev.detach()
    assert_unbound(dev)
    assert losetup(dev.path) is None
    assert os.path.getsize(image) == size


def test_info_reads_back_number_backing_file_and_flags(scratch):
    image = sparse_file(scratch / "info.img", 4 * MiB)
    link = scratch / "link-to-info.img"
    link.symlink_to(image)
    with loop.attach(str(link)) as plain:           # a symlink is resolved to the real file
        got = loop.info(plain.path)
        assert (got.number, got.backing_file, got.size) == (plain.number, str(image), 4 * MiB)
        assert (got.read_only, got.autoclear) == (False, False)
        with loop.attach(str(image), read_only=True, autoclear=True) as flagged:
            assert flagged.number != plain.number
            got = loop.info(flagged.path)
            assert (got.number, got.backing_file) == (flagged.number, str(image))
            assert (got.read_only, got.autoclear) == (True, True)
            listed = losetup(flagged.path)
            assert listed is not None and flag(listed["ro"]) and flag(listed["autoclear"])
            assert Path(f"/sys/block/loop{flagged.number}/loop/autoclear").read_text().strip() == "1"


def test_read_only_refuses_writes(scratch):
    image = sparse_file(scratch / "ro.img", 4 * MiB)
    with loop.attach(str(image), read_only=True) as dev:
        assert dev.read_only and loop.info(dev.path).read_only
        assert blk_int(dev.path, BLKROGET) == 1
        with pytest.raises(OSError) as err:
            fd = os.open(dev.path, os.O_RDWR)
            try:
                os.pwrite(fd, b"must not land", 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert err.value.errno in (errno.EPERM, errno.EROFS), err.value
    with open(image, "rb") as fh:
        assert fh.read(13) == bytes(13)


def test_autoclear_unbinds_at_detach_and_at_context_exit(scratch):
    image = sparse_file(scratch / "autoclear.img", 4 * MiB)
    dev = loop.attach(str(image), autoclear=True)
    try:
        assert dev.autoclear and loop.info(dev.path).autoclear
        assert sysfs_backing(dev.number) == str(image)  # our descriptor keeps it bound
    finally:
        dev.detach()
    assert_unbound(dev)
    with loop.attach(str(image), autoclear=True) as dev2:
        assert sysfs_backing(dev2.number) == str(image)
    assert_unbound(dev2)


def test_block_size_4096(scratch):
    image = sparse_file(scratch / "4k.img", 4 * MiB)
    with loop.attach(str(image), block_size=4096) as dev:
        assert blk_int(dev.path, BLKSSZGET) == 4096
        assert dev.size == blk_size(dev.path) == 4 * MiB
        listed = losetup(dev.path)
        assert listed is not None and int(listed["log-sec"]) == 4096


@pytest.mark.parametrize("block_size", [0, 256, 511, 1000, 4095, 6144, 131072, -4096, True, 4096.0, "4096"],
                         ids=repr)
def test_bad_block_size_is_refused_before_any_ioctl(scratch, block_size):
    missing = scratch / "does-not-exist.img"
    with pytest.raises(InvalidArgumentError) as err:
        loop.attach(str(missing), block_size=block_size)  # refused before even opening the file
    assert not err.value.errno and "block size" in str(err.value)
    image = sparse_file(scratch / "bs.img", 4 * MiB)
    with pytest.raises(InvalidArgumentError):
        loop.attach(str(image), block_size=block_size)
    assert not bound_to(scratch)


def test_detach_of_an_unbound_device_is_no_error(scratch):
    image = sparse_file(scratch / "twice.img", 4 * MiB)
    dev = loop.attach(str(image))
    dev.detach()
    assert_unbound(dev)
    dev.detach()
    loop.detach(dev.path)
    assert_unbound(dev)


def test_detach_while_a_dm_table_holds_it_is_busy_and_changes_nothing(scratch, name):
    image = sparse_file(scratch / "held.img", 4 * MiB)
    with loop.attach(str(image)) as dev:
        dm.create(name)
        dm.load(name, [dm.Target(0, dev.size // 512, "linear", f"{dev.major_minor} 0")])
        info = dm.resume(name)
        holder = f"dm-{info.minor}"
        assert os.listdir(f"/sys/block/loop{dev.number}/holders") == [holder]
        start = time.monotonic()
        with pytest.raises(DeviceBusyError) as err:
            loop.detach(dev.path)
        elapsed = time.monotonic() - start
        assert elapsed < 1.0, f"the refusal took {elapsed:.2f} s: it should not wait for a holder"
        assert err.value.errno == errno.EBUSY and holder in str(err.value)
        with pytest.raises(DeviceBusyError):
            dev.detach()
        assert sysfs_backing(dev.number) == str(image)
        got = loop.info(dev.path)
        assert got.backing_file == str(image) and not got.autoclear
        # nothing was half-done: had LOOP_CLR_FD been sent, the loop would unbind with the dm device
        dm.remove(name)
        time.sleep(0.2)
        assert sysfs_backing(dev.number) == str(image)
        assert not loop.info(dev.path).autoclear
    assert_unbound(dev)


def test_detach_does_not_wait_for_a_number_someone_else_took(scratch, monkeypatch):
    """The freed number bound to another file at once: our detach is done, not 'still bound'."""
    mine = sparse_file(scratch / "mine.img", 1 * MiB)
    theirs = sparse_file(scratch / "theirs.img", 1 * MiB)
    dev = loop.attach(str(mine))
    real_close = os.close
    other: list[loop.LoopDevice] = []

    def close_then_take(fd: int) -> None:
        real_close(fd)
        if not other and sysfs_backing(dev.number) is None:  # right after our unbind
            monkeypatch.setattr(os, "close", real_close)
            other.append(loop.attach(str(theirs)))

    monkeypatch.setattr(os, "close", close_then_take)
    try:
        start = time.monotonic()
        dev.detach()
        elapsed = time.monotonic() - start
    finally:
        monkeypatch.setattr(os, "close", real_close)
    try:
        assert other and other[0].number == dev.number, "the interleaving did not happen"
        assert elapsed < 1.0, f"detach waited {elapsed:.2f} s for a device another user now holds"
        assert sysfs_backing(dev.number) == str(theirs)
    finally:
        for o in other:
            o.detach()
    assert_unbound(dev)


def test_context_manager_detaches_also_on_error(scratch):
    image = sparse_file(scratch / "ctx.img", 4 * MiB)
    with loop.attach(str(image)) as dev:
        assert sysfs_backing(dev.number) == str(image)
    assert_unbound(dev)
    with pytest.raises(RuntimeError, match="boom"):
        with loop.attach(str(image)) as dev2:
            assert sysfs_backing(dev2.number) == str(image)
            raise RuntimeError("boom")
    assert_unbound(dev2)


# --------------------------------------------------------------------------- the attach race

WORKERS = 4
ROUNDS = 10


def _race_worker(worker: int, image: str, barrier, results) -> None:
    """attach + check + detach ROUNDS times; report (worker, number, start, end) per holding."""
    held = []
    error = None
    marker = f"worker {worker} ".encode()
    try:
        barrier.wait(60)
        for round_ in range(ROUNDS):
            dev = loop.attach(image)
            try:
                start = time.monotonic()
                # the device must really be ours: the kernel says our file, and our bytes land in it
                backing = sysfs_backing(dev.number)
                if backing != image:
                    raise AssertionError(f"{dev.path} handed to worker {worker} is bound to {backing}")
                fd = os.open(dev.path, os.O_RDWR)
                try:
                    os.pwrite(fd, marker + b"round %d" % round_, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                with open(image, "rb") as fh:
                    seen = fh.read(len(marker) + 8)
                if not seen.startswith(marker + b"round %d" % round_):
                    raise AssertionError(f"worker {worker} wrote through {dev.path} but its file has {seen!r}")
                end = time.monotonic()
                held.append((dev.number, start, end))
            finally:
                dev.detach()
            if sysfs_backing(dev.number) == image:
                raise AssertionError(f"{dev.path} still bound to worker {worker}'s file after detach")
    except BaseException as exc:  # reported to the parent, which fails the test
        error = f"{type(exc).__name__}: {exc}"
    results.put((worker, held, error))


def test_parallel_attach_and_detach_never_share_a_device(scratch):
    ctx = multiprocessing.get_context("fork")
    images = [str(sparse_file(scratch / f"race-{i}.img", 1 * MiB)) for i in range(WORKERS)]
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(i, images[i], barrier, results)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in procs:
            reports.append(results.get(timeout=180))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = [f"worker {w}: {e}" for w, _, e in reports if e]
    assert not errors, "; ".join(errors)
    assert all(p.exitcode == 0 for p in procs)
    holdings = sorted((number, start, end, w) for w, held, _ in reports for number, start, end in held)
    assert len(holdings) == WORKERS * ROUNDS
    for (n1, s1, e1, w1), (n2, s2, e2, w2) in zip(holdings, holdings[1:]):
        if n1 == n2:
            assert s2 > e1, f"loop{n1} held by worker {w1} and worker {w2} at the same time"
    assert not bound_to(scratch)
