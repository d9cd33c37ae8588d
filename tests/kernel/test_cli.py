"""The dmflakey command as a user runs it: separate processes, real exit codes and messages.

Each call is a new Python process (about a second in the guest), so the calls
are few and the tests check what the kernel holds in-process instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.errors import DeviceNotFoundError
from dmflakey_ioctl.flakey import open_flakey
from dmflakey_ioctl.tables.flakey import CorruptBIOByte, FlakeyTable

from .cli_helpers import dmflakey, dmflakey_exec, fails, ok
from .helpers import FLAKEY_FEATURE_RELEASE, REPO, dm_names, kernel_has, sparse_file, unique_name

MiB = 1 << 20


def refused(name: str, feature: str, *args: str) -> None:
    """The command fails (status 1) naming the feature, the release that added it and the running
    release, and the device keeps its table, resumed."""
    before = dm.table(name)
    line = fails(1, *args)
    since = ".".join(map(str, FLAKEY_FEATURE_RELEASE[feature]))
    assert feature in line and f"added in Linux {since}" in line and os.uname().release in line, line
    assert dm.table(name) == before and not dm.info(name).suspended


def live(name: str) -> FlakeyTable:
    return FlakeyTable.parse(dm.table(name)[0].params)


@pytest.fixture
def names():
    """Fresh device names; whatever a failing test left under them is removed."""
    made: list[str] = []

    def new() -> str:
        made.append(unique_name("dmfl-cli"))
        return made[-1]
    yield new
    for name in made:
        try:
            open_flakey(name).teardown()
        except DeviceNotFoundError:
            pass


def test_image_device_every_switch_status_list_remove(names, tmp_path):
    name, image = names(), tmp_path / "disk.img"
    out = ok("create", name, "--image", str(image), "--size", "32MiB", "--fs", "ext4")
    assert f"/dev/mapper/{name}" in out and str(image) in out
    assert image.stat().st_size == 32 * MiB

    status = json.loads(ok("status", name, "--json"))
    assert status["name"] == name and status["device"] == f"/dev/mapper/{name}"
    assert status["image"] == str(image) and status["loop_device"].startswith("/dev/loop")
    assert (status["filesystem"], status["size"]) == ("ext4", 32 * MiB)
    assert status["mode"] == "allow-writes"
    assert (status["suspended"], status["open_count"], status["persistent"]) == (False, 0, True)
    assert status["table"] == dm.table(name)[0].line()
    assert ok("table", name) == dm.table(name)[0].line() + "\n"

    assert "drop-writes (up 0 s, down 30 s)" in ok("drop-writes", name, "--interval", "30")
    assert live(name).drop_writes and live(name).down_interval == 30
    ok("error-writes", name, "--sync-fs")
    assert live(name).error_writes and live(name).down_interval == 120
    if kernel_has("error_reads"):
        ok("error-reads", name)
        assert live(name).error_reads and not live(name).error_writes
    else:
        refused(name, "error_reads", "error-reads", name)
    corrupt = ("corrupt-bio-byte", name, "--byte", "32", "--direction", "w", "--value", "0x41")
    if kernel_has("corrupt_bio_byte_write"):
        ok(*corrupt)
        assert live(name).corrupt_bio_byte == CorruptBIOByte(32, "w", 65, 0)  # type: ignore[arg-type]
    else:
        refused(name, "corrupt_bio_byte_write", *corrupt)
    if kernel_has("random_read_corrupt"):
        ok("random-read-corrupt", name, "--probability", "0.25")
        assert live(name).random_read_corrupt == 250_000_000
        ok("random-write-corrupt", name, "--probability", "5%", "--interval", "7")
        status = json.loads(ok("status", name, "--json"))
        assert (status["mode"], status["down_interval"]) == ("random-write-corrupt", 7)
        assert status["features"] == {"random_write_corrupt": 0.05}
    else:
        refused(name, "random_read_corrupt", "random-read-corrupt", name, "--probability", "0.25")
        refused(name, "random_write_corrupt", "random-write-corrupt", name, "--probability", "5%",
                "--interval", "7")
        status = json.loads(ok("status", name, "--json"))
    assert "allow-writes (up 60 s, down 0 s)" in ok("allow-writes", name, "--interval", "60")

    listed = {d["name"]: d for d in json.loads(ok("list", "--json"))}
    assert listed[name]["image"] == str(image)
    assert (listed[name]["mode"], listed[name]["persistent"], listed[name]["stale"]) == \
        ("allow-writes", True, False)

    line = fails(1, "create", names(), "--image", str(image), "--size", "32M")
    assert "already exists" in line and str(image) in line

    loop_device = status["loop_device"]
    assert f"image {image}" in ok("remove", name)
    assert name not in dm_names() and not image.exists()
    assert not Path(f"/dev/mapper/{name}").exists()
    assert not Path(f"/sys/block/{Path(loop_device).name}/loop/backing_file").exists()


def test_block_device_is_left_alone(names, tmp_path):
    name = names()
    with loop.attach(str(sparse_file(tmp_path / "backing", 16 * MiB))) as backing:
        ok("create", name, "--device", backing.path)
        assert "drop-writes (up 0 s, down 10 s)" in ok("drop-writes", name, "--sync-fs",
                                                       "--interval", "10")
        text = ok("status", name)
        assert "drop-writes" in text and backing.major_minor in text and "cli (persistent)" in text
        assert "left as it was" in ok("remove", name)
        assert name not in dm_names()
        assert loop.info(backing.path).backing_file == backing.backing_file


CRASHING_CREATOR = """
import sys
from dmflakey_ioctl import init_flakey
init_flakey(sys.argv[1], sys.argv[2], None, size=1 << 20)
print("ready", flush=True)
sys.stdin.read()
"""


def test_cleanup_removes_what_a_killed_creator_left(names, tmp_path):
    name = names()
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CREATOR, name, str(tmp_path)],
                             cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert (tmp_path / f"{name}.img").exists()

    listed = {d["name"]: d for d in json.loads(ok("list", "--json"))}
    assert (listed[name]["stale"], listed[name]["owner_pid"]) == (True, child.pid)
    assert f"removed {name}" in ok("cleanup").splitlines()
    assert name not in dm_names() and not (tmp_path / f"{name}.img").exists()


def test_demo_power_failure():
    out = ok("demo")
    assert "POWER CUT" in out
    assert "synced.txt    survived" in out and "unsynced.txt  lost" in out
    assert "cleaned up" in out


def test_demo_sqlite():
    out = ok("demo", "--scenario", "sqlite", "--transactions", "20")
    assert "synchronous=FULL: 20 of 20 committed transactions survived; integrity_check: ok" in out
    assert "synchronous=OFF:" in out and "cleaned up" in out


@pytest.mark.parametrize("run", [dmflakey, dmflakey_exec], ids=["fork", "python -m"])
def test_errors_are_one_line(run):
    assert "no such device" in fails(1, "status", unique_name("dmfl-cli-missing"), run=run)
    line = fails(2, "corrupt-bio-byte", "x", "--byte", "0", "--direction", "r", "--value", "1", run=run)
    assert "--byte" in line
    assert "--size" in fails(2, "create", "x", "--image", "/tmp/never-made.img", run=run)


def test_python_m_runs_the_command():
    """The entry point itself, in a new interpreter: --version, and a device listed."""
    proc = dmflakey_exec("--version")
    assert (proc.returncode, proc.stderr) == (0, "") and proc.stdout.startswith("dmflakey "), proc
    proc = dmflakey_exec("list", "--json")
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    assert isinstance(json.loads(proc.stdout), list)
