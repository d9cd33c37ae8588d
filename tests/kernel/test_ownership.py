"""Never touch what is not ours (issue 12), proven on the real kernel.

Device-mapper and loop devices are global to the kernel while pids, /proc and
paths belong to namespaces.  Each test sets up the situation a shared CI host
meets (a device of another pid namespace, a judge without /proc, a handle
whose device was replaced, an image path that now names another file, a node
of another device, a killed probe, a device cgroup) and checks with sysfs,
dmsetup, the kernel log and the files themselves that only what is provably
ours was touched.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from dmflakey_ioctl import features
from dmflakey_ioctl.cleanup import cleanup_stale, list_owned, remove_owned
from dmflakey_ioctl.errors import (DeviceNotFoundError, LeftAloneWarning, NotRootError,
                                   PermissionDeniedError, TableRejectedError,
                                   UnsupportedFeatureError)
from dmflakey_ioctl.features import PROBES, Probe
from dmflakey_ioctl.flakey import Flakey, attach_flakey, init_flakey, open_flakey
from dmflakey_ioctl.kernel import dm, loop
from dmflakey_ioctl.ownership import Kind, Owner, Verdict
from dmflakey_ioctl.tables.flakey import FlakeyTable

from .helpers import (child_env, dm_names, dmsetup, flakey_of_a_killed_process, kernel_has,
                      line_from_a_fork, loop_backing_files, read_line, sparse_file, unique_name)

MiB = 1 << 20
SIZE = 16 * MiB
PROBE_NAME = re.compile(r"dmflakey-probe-[0-9a-f]{12}")
ROUNDS = 10   # refusals of one device while another thread's device is refused


# ---- helpers ------------------------------------------------------------------------------------------

def loops_holding(image: str) -> List[str]:
    """Loop devices whose backing file is image, deleted or not."""
    return sorted(lo for lo, backing in loop_backing_files().items()
                  if backing in (image, f"{image} (deleted)"))


def loops_of(identity: tuple[int, int]) -> List[str]:
    """Loop devices holding the file with this (st_dev, st_ino), as losetup (LOOP_GET_STATUS64) says.

    For a device made in another mount namespace, whose backing path sysfs shows
    as that namespace sees it.
    """
    listed = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-INO,BACK-MAJ:MIN"],
                            capture_output=True, text=True, check=True).stdout
    found = []
    for device in json.loads(listed or '{"loopdevices": []}')["loopdevices"]:
        major, minor = str(device["back-maj:min"]).strip().split(":")
        if (os.makedev(int(major), int(minor)), int(str(device["back-ino"]).strip())) == identity:
            found.append(os.path.basename(device["name"]))
    return sorted(found)


def identity_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def mapper_node(name: str) -> Optional[int]:
    """The rdev of /dev/mapper/<name> if it is a block node, else None."""
    try:
        st = os.lstat(f"{dm.MAPPER_DIR}/{name}")
    except FileNotFoundError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def verdicts() -> dict[str, Verdict]:
    return {device.name: device.owner.verdict() for device in list_owned()}


def assert_whole(name: str, uuid: str, image: str) -> None:
    """The device is there with its uuid, a live table, its node, its loop device and its image."""
    assert name in dm_names()
    info = dm.info(name)
    assert info.uuid == uuid and info.live_table and not info.suspended
    assert mapper_node(name) == info.dev
    assert os.path.isfile(image)
    assert len(loops_of(identity_of(image))) == 1, loop_backing_files()


def assert_gone(name: str, image: Optional[str]) -> None:
    """No dm device, no mapper node, no loop device on the image, no image."""
    assert name not in dm_names()
    assert not os.path.lexists(f"{dm.MAPPER_DIR}/{name}")
    if image:
        assert loops_holding(image) == [], loop_backing_files()
        assert not os.path.exists(image)


def kill_after_made(directory: Path) -> tuple[str, str]:
    """A flakey device whose creator (a fork of this process, so of this pid namespace) was SIGKILLed.

    Returns (name, image).
    """
    name = unique_name("dmfi-own-killed")
    flakey_of_a_killed_process(name, directory, SIZE)
    return name, str(directory / f"{name}.img")


def remove_by_name(name: str) -> None:
    """Remove a device of ours by name (any kind), or a foreign one with dm.remove."""
    for device in list_owned():
        if device.name == name:
            remove_owned(device)
            return
    if name in dm_names():
        dm.remove(name)


@pytest.fixture
def leftovers() -> Iterator[List[str]]:
    """Names of devices a test may leave when it fails; whatever is still there is removed after."""
    names: List[str] = []
    yield names
    for name in names:
        if name in dm_names():
            remove_by_name(name)


# ---- a device of a child pid namespace ----------------------------------------------------------------

OWNER_IN_CHILD_NAMESPACE = r'''
import os, sys
from dmflakey_ioctl import init_flakey
dev = init_flakey(sys.argv[1], sys.argv[2], None, size=int(sys.argv[3]))
print("ready", os.getpid(), dev.uuid, flush=True)
if sys.stdin.readline().strip() == "teardown":
    dev.teardown()
    print("torn down", flush=True)
os._exit(0)   # anything else: gone without a teardown, like a crash
'''


class NamespacedOwner:
    """A process in a new pid namespace (``unshare --pid --fork --mount-proc``) that made a device."""

    def __init__(self, directory: Path) -> None:
        self.name = unique_name("dmfi-own-ns")
        self.image = str(directory / f"{self.name}.img")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c",
             OWNER_IN_CHILD_NAMESPACE, self.name, str(directory), str(SIZE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[:1] == ["ready"], f"the child did not make its device: {words}"
        self.pid, self.uuid = int(words[1]), words[2]
        self.identity = identity_of(self.image)

    def tell(self, command: str) -> str:
        """Send the child its last command and wait for it to end; returns what it printed."""
        out, _ = self.proc.communicate(command + "\n", timeout=120)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()   # unshare --kill-child takes the namespace's process with it
            self.proc.wait()
        if self.name in dm_names():
            open_flakey(self.name).teardown()


@pytest.fixture
def namespaced_owner(tmp_path: Path) -> Iterator[NamespacedOwner]:
    owner = NamespacedOwner(tmp_path)
    try:
        yield owner
    finally:
        owner.close()


def test_a_child_namespace_s_device_is_never_judged_and_stays_removable_by_name(
        tmp_path, namespaced_owner, leftovers):
    owner = namespaced_owner
    # pid 1 in its namespace: a judge looking in its own /proc finds its own init, started long ago
    assert owner.pid == 1
    killed, killed_image = kill_after_made(tmp_path)
    leftovers.append(killed)
    found = verdicts()
    assert found[owner.name] is Verdict.OTHER_NAMESPACE
    assert found[killed] is Verdict.STALE

    assert cleanup_stale() == [killed]
    assert_gone(killed, killed_image)
    assert_whole(owner.name, owner.uuid, owner.image)

    # the owner ends without a teardown: its device is left in a namespace nobody here can judge
    owner.tell("exit")
    assert owner.proc.returncode == 0
    assert cleanup_stale() == []
    assert verdicts()[owner.name] is Verdict.OTHER_NAMESPACE
    assert_whole(owner.name, owner.uuid, owner.image)

    # removing it by name stays possible for any device of ours
    [loop_name] = loops_of(owner.identity)
    shown = loop_backing_files()[loop_name]
    open_flakey(owner.name).teardown()
    assert owner.name not in dm_names() and mapper_node(owner.name) is None
    assert loops_of(owner.identity) == []
    # the image goes only where the path the kernel shows is that very file here.  The owner's
    # mount namespace is a copy of ours, so it is, unless this process runs chrooted (as in the test
    # guest): the kernel then shows the path from the namespace's real root, which is no file here
    if shown == owner.image:
        assert not os.path.exists(owner.image)
    else:
        assert not os.path.exists(shown) and identity_of(owner.image) == owner.identity
        os.unlink(owner.image)


USER_TESTS = '''
import os

def test_this_checkout_s_plugin_runs(pytestconfig):
    import dmflakey_ioctl
    assert pytestconfig.pluginmanager.has_plugin("dmflakey")
    assert dmflakey_ioctl.__file__.startswith(os.environ["PYTHONPATH"].split(os.pathsep)[0])
'''


def pytest_session(project: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no",
                          str(project)], cwd=project, capture_output=True, text=True, env=child_env())
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    return run


def test_a_pytest_session_start_leaves_a_child_namespace_s_device_alone(
        tmp_path, namespaced_owner, leftovers):
    owner = namespaced_owner
    killed, killed_image = kill_after_made(tmp_path)
    leftovers.append(killed)
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_user.py").write_text(USER_TESTS)

    # switched off: not even the crashed run of this namespace is removed
    (project / "pytest.ini").write_text("[pytest]\ndmflakey_cleanup_stale = false\n")
    run = pytest_session(project)
    assert "dmflakey:" not in run.stdout
    assert killed in dm_names() and os.path.exists(killed_image)
    assert_whole(owner.name, owner.uuid, owner.image)

    # on (the default): the crashed run's device goes, the live owner's in the other namespace stays
    (project / "pytest.ini").write_text("[pytest]\n")
    run = pytest_session(project)
    assert f"dmflakey: removed 1 stale device(s) of crashed runs: {killed}\n" in run.stdout, run.stdout
    assert_gone(killed, killed_image)
    assert_whole(owner.name, owner.uuid, owner.image)

    # nothing was taken from under the owner: its own handle still tears everything down
    assert owner.tell("teardown") == "torn down\n"
    assert owner.name not in dm_names() and loops_of(owner.identity) == []
    assert not os.path.exists(owner.image)


# ---- a judge whose /proc cannot answer ----------------------------------------------------------------

JUDGE = r'''
import json, os
from dmflakey_ioctl.cleanup import cleanup_stale, list_owned
found = {d.name: d.owner.verdict().value for d in list_owned()}
print(json.dumps({"proc_self": os.path.exists("/proc/self"), "verdicts": found,
                  "removed": cleanup_stale()}))
'''

# Each runs the judge (appended as "$@") where /proc cannot tell whether a pid of the judge's
# own pid namespace runs; unshare --mount keeps the changed mounts to that one process tree.
WITHOUT_PROC = {
    # a container without /proc: an empty directory there
    "empty /proc": ["unshare", "--mount", "sh", "-c",
                    'umount -l /proc && mount -t tmpfs none /proc && exec "$@"', "sh"],
    # a procfs mounted by another pid namespace (whose processes are all gone)
    "another namespace's procfs": ["unshare", "--mount", "sh", "-c",
                                   'unshare --pid --fork mount -t proc proc /proc && exec "$@"', "sh"],
    # the judge in a child pid namespace that still sees its parent's /proc
    "the parent namespace's procfs": ["unshare", "--pid", "--fork"],
}


@pytest.mark.parametrize("where", list(WITHOUT_PROC))
def test_nothing_is_judged_stale_where_proc_cannot_answer(tmp_path, where, leftovers):
    killed, image = kill_after_made(tmp_path)
    leftovers.append(killed)
    assert verdicts()[killed] is Verdict.STALE   # as this process, with a working /proc, sees it

    judge = subprocess.run([*WITHOUT_PROC[where], sys.executable, "-c", JUDGE], capture_output=True,
                           text=True, env=child_env())
    assert judge.returncode == 0, judge.stderr
    said = json.loads(judge.stdout)
    assert said["removed"] == [] and said["verdicts"][killed] == Verdict.UNKNOWN.value, said
    if where == "empty /proc":
        assert not said["proc_self"]
    assert killed in dm_names() and os.path.exists(image) and loops_holding(image)

    assert cleanup_stale() == [killed]   # it was stale all along: only the judge could not tell
    assert_gone(killed, image)


OWNER_AND_JUDGE = r'''
import json, os, sys
from dmflakey_ioctl import init_flakey
from dmflakey_ioctl.cleanup import cleanup_stale, list_owned
name, directory, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
ready_r, ready_w = os.pipe()
done_r, done_w = os.pipe()
with open("/proc/sys/kernel/ns_last_pid", "w") as fh:   # this namespace's (the writer's) counter
    fh.write(sys.argv[4])
pid = os.fork()
if pid == 0:   # the owner: makes its device and keeps it until the judge is done
    try:
        dev = init_flakey(name, directory, None, size=size)
        os.write(ready_w, b"ok\n")
        os.read(done_r, 1)
        dev.teardown()
    finally:
        os._exit(0)
assert os.read(ready_r, 3) == b"ok\n"
found = {d.name: d.owner.verdict().value for d in list_owned()}
removed = cleanup_stale()
still = name in {d.name for d in list_owned()}
os.write(done_w, b"x")
os.waitpid(pid, 0)
print(json.dumps({"owner": pid, "verdicts": found, "removed": removed, "still_there": still}))
'''


def test_a_live_device_is_safe_where_the_namespace_sees_its_parent_s_proc(tmp_path, leftovers):
    """A container that shares the host's /proc: its own pids are looked up among the host's there."""
    name = unique_name("dmfi-own-hostproc")
    leftovers.append(name)
    # a pid the host does not use: in the /proc the namespace sees, nobody has it
    owner_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 100
    assert not os.path.exists(f"/proc/{owner_pid}")
    run = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", OWNER_AND_JUDGE, name,
                          str(tmp_path), str(SIZE), str(owner_pid - 1)], capture_output=True, text=True,
                         env=child_env())
    assert run.returncode == 0, run.stderr
    said = json.loads(run.stdout)
    assert said["owner"] == owner_pid, said
    assert said["removed"] == [] and said["still_there"], said
    assert said["verdicts"][name] in (Verdict.UNKNOWN.value, Verdict.OTHER_NAMESPACE.value), said
    assert_gone(name, str(tmp_path / f"{name}.img"))   # the owner's own teardown, afterwards


# ---- a stale handle -----------------------------------------------------------------------------------

SWITCHES = [   # (method, arguments, the probed feature it needs)
    ("allow_writes", {}, None),
    ("drop_writes", {}, None),
    ("error_writes", {}, None),
    ("error_reads", {}, "error_reads"),
    ("corrupt_bio_byte", {"nth_byte": 1, "direction": "w", "value": 0}, "corrupt_bio_byte_write"),
    ("random_read_corrupt", {"probability": 0.5}, "random_read_corrupt"),
    ("random_write_corrupt", {"probability": 0.5}, "random_write_corrupt"),
    ("delay", {"read_ms": 1}, None),
    ("load_table", {"table": None}, None),   # filled in with a table over the old handle's backing
]


def snapshot(dev: Flakey, mount_point: Path) -> dict:
    """What the kernel and the files say about a device, read without the library."""
    assert dev.loop_device and dev.image_path
    loop_name = os.path.basename(dev.loop_device)
    st = os.stat(dev.image_path)
    mounts = [line.split()[2:5] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return {"table": dmsetup("table", dev.name), "uuid": dmsetup("info", "-c", "--noheadings", "-o",
                                                                 "uuid,attr", dev.name),
            "node": mapper_node(dev.name), "loop": loop_backing_files().get(loop_name),
            "image": (st.st_dev, st.st_ino, st.st_size),
            "mounted": [m for m in mounts if m[2] == str(mount_point)]}


def test_a_stale_handle_cannot_touch_a_device_made_again_under_its_name(tmp_path, leftovers):
    name = unique_name("dmfi-own-again")
    leftovers.append(name)
    old = init_flakey(name, str(tmp_path), "ext4", size=64 * MiB)
    old.error_writes()   # prepared and cached: the next call of this switch resends the packed request
    old.allow_writes()

    open_flakey(name).teardown()   # behind the old handle's back: device, loop device and image go
    assert_gone(name, old.image_path)
    new = init_flakey(name, str(tmp_path), "ext4", size=64 * MiB)   # same name, same image path
    assert new.image_path == old.image_path and new.uuid != old.uuid
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    new.mount(str(mount_point))
    try:
        data = os.urandom(64 * 1024)
        (mount_point / "data").write_bytes(data)
        os.sync()
        before = snapshot(new, mount_point)
        assert before["mounted"] and before["loop"] == new.image_path

        for switch, kwargs, feature in SWITCHES:
            if switch == "load_table":
                kwargs = {"table": FlakeyTable(old.backing, 0, 1, error_writes=True)}
            if feature is not None and not kernel_has(feature):   # refused before the device is looked up
                with pytest.raises(UnsupportedFeatureError, match=feature):
                    getattr(old, switch)(**kwargs)
                continue
            with pytest.raises(DeviceNotFoundError) as refused:
                getattr(old, switch)(**kwargs)
            assert "replaced" in str(refused.value) and new.uuid in str(refused.value), switch
        with pytest.raises(DeviceNotFoundError, match="replaced"):
            old.table()
        with pytest.raises(DeviceNotFoundError, match="replaced"):
            old.teardown()

        assert snapshot(new, mount_point) == before
        assert (mount_point / "data").read_bytes() == data
        more = os.urandom(4096)   # writes still reach the disk: no fault was switched on
        fd = os.open(mount_point / "more", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, more)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        new.teardown()
    assert_gone(name, new.image_path)


# ---- images: deleted, replaced, covered ---------------------------------------------------------------

def make_like_an_older_version(name: str, image: Path) -> loop.LoopDevice:
    """A flakey device of ours as versions before autoclear made them: the loop device stays bound."""
    sparse_file(image, SIZE)
    lo = loop.attach(str(image))
    uuid = Owner.current(Kind.FLAKEY_IMAGE).uuid()
    dm.create(name, uuid=uuid)
    dm.load(dm.ByUuid(uuid), [(0, SIZE // 512, "flakey", FlakeyTable(lo.major_minor, 120, 0).params())])
    dm.resume(dm.ByUuid(uuid))
    return lo


@pytest.mark.parametrize("made", ["init_flakey", "reopened", "older version"])
def test_teardown_detaches_the_loop_device_of_a_deleted_image(tmp_path, made, leftovers):
    name = unique_name("dmfi-own-deleted")
    leftovers.append(name)
    if made == "older version":
        image = str(tmp_path / f"{name}.img")
        loop_name = os.path.basename(make_like_an_older_version(name, Path(image)).path)
        dev = open_flakey(name)
    else:
        dev = init_flakey(name, str(tmp_path), None, size=SIZE)
        image, loop_name = str(dev.image_path), os.path.basename(str(dev.loop_device))
    os.unlink(image)
    if made == "reopened":
        dev = open_flakey(name)   # read back from the kernel, which shows the path as "(deleted)"
    assert loop_backing_files()[loop_name] == f"{image} (deleted)"
    assert dev.image_path == image

    dev.teardown()
    assert loop_name not in loop_backing_files()
    assert not any(backing.endswith(" (deleted)") for backing in loop_backing_files().values())
    assert_gone(name, image)


def bind_mount(source: Path, target: str) -> None:
    subprocess.run(["mount", "--bind", str(source), target], check=True)


@pytest.mark.parametrize("how", ["renamed", "deleted", "bind-mounted over"])
def test_an_image_path_that_names_another_file_is_not_unlinked(tmp_path, how, leftovers):
    name = unique_name("dmfi-own-moved")
    leftovers.append(name)
    dev = init_flakey(name, str(tmp_path), None, size=SIZE)
    assert dev.image
    image, loop_name = dev.image.path, os.path.basename(dev.image.loop_path)
    theirs = b"somebody else's file, now at the image's path\n"
    moved = tmp_path / "moved-away.img"
    if how == "renamed":
        os.rename(image, moved)
    elif how == "deleted":
        os.unlink(image)
    if how == "bind-mounted over":
        (tmp_path / "theirs").write_bytes(theirs)
        bind_mount(tmp_path / "theirs", image)
    else:
        Path(image).write_bytes(theirs)
    try:
        with pytest.warns(LeftAloneWarning, match=re.escape(image)):
            dev.teardown()
        assert Path(image).read_bytes() == theirs
        assert name not in dm_names() and loop_name not in loop_backing_files()
    finally:
        if how == "bind-mounted over":
            subprocess.run(["umount", image], check=True)
    # what the library made and can no longer prove its own is the user's now: it stays where it is
    if how == "renamed":
        st = moved.stat()
        assert (st.st_dev, st.st_ino) == dev.image.identity
    elif how == "bind-mounted over":   # the covered original comes back into view
        st = os.stat(image)
        assert (st.st_dev, st.st_ino) == dev.image.identity
    # the deleted original was freed with its loop device: nothing of it is left anywhere
    assert not any(backing.endswith(" (deleted)") for backing in loop_backing_files().values())


# ---- probes and the window before the dm device exists ------------------------------------------------

def test_a_killed_probe_leaves_nothing_the_next_cleanup_misses(leftovers):
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: probe, and die while the probe device exists
        try:
            os.close(report_r)
            features.reset_cache()   # probed already in this session: the fork would not probe

            def seen(path: str, memfd: int) -> bool:
                os.write(report_w, f"{path} ".encode())
                return PROBES["delay_flush"].effect(path, memfd)

            def killed_while_probing(path: str, memfd: int) -> bool:
                os.write(report_w, f"{path}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)
                return False

            # features whose tables every kernel of the matrix loads (5.10 and later)
            features.supported("delay_flush", probe=lambda f: Probe(PROBES[f].table, seen).run())
            features.supported("corrupt_bio_byte_read",
                               probe=lambda f: Probe(PROBES[f].table, killed_while_probing).run())
        finally:
            os._exit(1)
    os.close(report_w)
    try:
        paths = read_line(report_r).split()
    finally:
        os.close(report_r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (paths, status)
    assert len(paths) == 2, paths
    first, path = paths
    name = os.path.basename(path)
    leftovers.append(name)
    # random, not derived from the pid: one process's two probes have two names
    assert first != path and all(PROBE_NAME.fullmatch(os.path.basename(p)) for p in paths)
    assert os.path.basename(first) not in dm_names()   # the first probe cleaned up after itself
    owned = {d.name: d for d in list_owned()}
    assert owned[name].owner.kind is Kind.PROBE and owned[name].owner.verdict() is Verdict.STALE
    [(major, minor)] = re.findall(r"\b(\d+):(\d+)\b", dmsetup("table", name))
    loop_name = os.path.basename(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    assert loop_backing_files()[loop_name] == "/memfd:dmflakey-probe (deleted)"

    # a later probe never meets the leftover: it gets a name of its own
    features.reset_cache()
    try:
        assert features.supported("delay_flush")
    finally:
        features.reset_cache()
    assert name in dm_names()

    assert cleanup_stale() == [name]
    assert name not in dm_names() and not os.path.lexists(path)
    assert loop_name not in loop_backing_files()
    assert not [n for n in dm_names() if n.startswith("dmflakey-probe-")]


PROBE_IN_NAMESPACE = r'''
import json, os, signal, sys
from dmflakey_ioctl import features
from dmflakey_ioctl.features import PROBES, Probe
killed = sys.argv[1] == "killed"
report_r, report_w = os.pipe()
pid = os.fork()
if pid == 0:   # pid 2 in this new namespace, as in every other one
    os.close(report_r)
    def effect(path, memfd):
        said = {"pid": os.getpid(), "device": os.path.basename(path)}
        os.write(report_w, (json.dumps(said) + "\n").encode())
        if killed:
            os.kill(os.getpid(), signal.SIGKILL)
        return PROBES["delay_flush"].effect(path, memfd)
    try:
        ok = features.supported("delay_flush", probe=lambda f: Probe(PROBES[f].table, effect).run())
        os.write(report_w, (json.dumps({"supported": ok}) + "\n").encode())
    except BaseException as exc:
        os.write(report_w, (json.dumps({"error": repr(exc)}) + "\n").encode())
    os._exit(0)
os.close(report_w)
os.waitpid(pid, 0)
with os.fdopen(report_r) as fh:
    print(fh.read(), end="")
'''


def probe_in_new_namespace(mode: str) -> List[dict]:
    run = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                          PROBE_IN_NAMESPACE, mode], capture_output=True, text=True, env=child_env())
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_probes_of_two_processes_with_the_same_pid_do_not_collide(leftovers):
    [first] = probe_in_new_namespace("killed")
    leftovers.append(first["device"])
    assert first["device"] in dm_names()   # left by the killed prober

    second, outcome = probe_in_new_namespace("clean")
    assert second["pid"] == first["pid"] == 2
    assert second["device"] != first["device"] and PROBE_NAME.fullmatch(second["device"])
    assert outcome == {"supported": True}
    assert second["device"] not in dm_names() and first["device"] in dm_names()

    # the leftover belongs to a namespace nobody here can judge: cleanup leaves it, removal by name works
    assert verdicts()[first["device"]] is Verdict.OTHER_NAMESPACE
    assert cleanup_stale() == []
    remove_by_name(first["device"])
    assert first["device"] not in dm_names()
    assert "/memfd:dmflakey-probe (deleted)" not in loop_backing_files().values()


def test_a_process_killed_before_its_dm_device_exists_leaves_no_bound_loop_device(tmp_path, leftovers):
    name = unique_name("dmfi-own-window")
    leftovers.append(name)
    image = str(tmp_path / f"{name}.img")

    def die_as_the_dm_device_would_be_made(report_w: int) -> None:
        """Report the loop device bound by then, and die."""
        def killed_instead(*args: object, **kwargs: object) -> None:
            os.write(report_w, f"{','.join(loops_holding(image))}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)

        dm.create = killed_instead   # this fork's own copy of the module
        init_flakey(name, str(tmp_path), None, size=SIZE)

    bound = line_from_a_fork(die_as_the_dm_device_would_be_made)
    assert re.fullmatch(r"loop\d+", bound), bound   # it was bound when the process died
    deadline = time.monotonic() + 5
    while loops_holding(image) and time.monotonic() < deadline:
        time.sleep(0.05)   # autoclear acts at the last close, which the process's death did
    assert loops_holding(image) == [] and name not in dm_names()
    # the image file itself stays: it is in the caller's directory and nothing records it
    assert os.path.isfile(image)
    os.unlink(image)


# ---- the kernel log: only our device's lines ----------------------------------------------------------

def dmesg() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout


def test_a_refused_table_quotes_only_its_own_device_s_kernel_log(tmp_path, leftovers):
    image = sparse_file(tmp_path / "backing.img", SIZE)
    first, other = unique_name("dmfi-own-log"), unique_name("dmfi-own-log")
    leftovers.extend([first, other])
    with loop.attach(str(image)) as lo:
        mine, theirs = dm.create(first), dm.create(other)
        bad_sector = [(0, 2048, "flakey", f"{lo.major_minor} x 0 1")]      # "Invalid device sector"
        bad_interval = [(0, 2048, "flakey", f"{lo.major_minor} 0 x 1")]    # "Invalid up interval"
        stop = threading.Event()
        elsewhere: List[BaseException] = []

        def refused_elsewhere() -> None:   # another thread's device is refused all the while
            while not stop.is_set():
                try:
                    dm.load(other, bad_sector)
                except TableRejectedError:
                    continue
                except BaseException as exc:
                    elsewhere.append(exc)
                    return
                elsewhere.append(AssertionError("the kernel took a bad table"))
                return

        try:
            dm.load(other, bad_sector)   # and once just before, for sure
        except TableRejectedError:
            pass
        logs = []
        worker = threading.Thread(target=refused_elsewhere)
        worker.start()
        try:
            for _ in range(ROUNDS):
                with pytest.raises(TableRejectedError) as refused:
                    dm.load(first, bad_interval)
                logs.append(refused.value.kernel_log)
        finally:
            stop.set()
            worker.join()
        dm.remove(first)
        dm.remove(other)
    assert not elsewhere, elsewhere
    ours, others = f"{mine.major}:{mine.minor}", f"{theirs.major}:{theirs.minor}"
    for attempt, log in enumerate(logs):
        lines = log.split("; ")
        assert any("up interval" in line for line in lines), (attempt, log)
        assert all(re.search(rf"(?<!\d){ours}(?!\d)", line) for line in lines), (attempt, log)
        assert not any("device sector" in line or others in line for line in lines), (attempt, log)
    # the kernel log (read with dmesg) held the other device's words too: there was a choice to make
    assert re.search(rf"{others}: flakey: Invalid device sector", dmesg())


def test_a_stale_handle_s_refusal_never_quotes_the_newcomer_s_kernel_log(tmp_path, leftovers):
    name = unique_name("dmfi-own-relog")
    leftovers.append(name)
    old = init_flakey(name, str(tmp_path), None, size=SIZE)
    old.error_writes()   # cached: its request carries the old device's number for the log lookup
    old.allow_writes()
    open_flakey(name).teardown()
    new = init_flakey(name, str(tmp_path), None, size=SIZE)
    try:
        assert new.dev == old.dev   # the kernel gave the newcomer the freed number
        with pytest.raises(TableRejectedError):   # the newcomer logs a refusal under that number
            dm.load(dm.ByUuid(new.uuid), [(0, 2048, "flakey", f"{new.backing} x 0 1")])
        with pytest.raises(DeviceNotFoundError, match="replaced") as refused:
            old.error_writes()
        assert "device sector" not in str(refused.value)
    finally:
        new.teardown()


# ---- permission denied while root ---------------------------------------------------------------------

def in_cgroup(group: Path, action: Callable[[], object]) -> dict:
    """Run action() in a fork placed in a devices cgroup; what it raised, as JSON-able facts."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            (group / "cgroup.procs").write_text(str(os.getpid()))
            try:
                action()
                said: dict = {"error": None}
            except Exception as exc:
                said = {"error": type(exc).__name__, "errno": getattr(exc, "errno", None),
                        "message": str(exc), "is_not_root": isinstance(exc, NotRootError),
                        "is_permission_denied": isinstance(exc, PermissionDeniedError)}
            os.write(report_w, (json.dumps(said) + "\n").encode())
        finally:
            os._exit(0)
    os.close(report_w)
    try:
        return json.loads(read_line(report_r) or '{"error": "the child died"}')
    finally:
        os.close(report_r)
        os.waitpid(pid, 0)


@pytest.fixture
def devices_cgroup(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """deny(rule): a new group of a cgroup v1 devices hierarchy with rule in its devices.deny."""
    root = tmp_path / "cgroup"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "cgroup", "-o", "devices", "none", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.fail(f"cannot mount the cgroup v1 devices controller ({mounted.stderr.strip()}): this "
                    "test needs it to make the kernel deny a device to root")
    groups: List[Path] = []

    def deny(rule: str) -> Path:
        group = root / f"deny-{len(groups)}"
        group.mkdir()
        groups.append(group)
        (group / "devices.deny").write_text(rule)
        return group

    try:
        yield deny
    finally:
        for group in groups:
            group.rmdir()
        subprocess.run(["umount", str(root)], check=True)


# (devices.deny rule, what the cgroup's process tries): each is refused by the kernel with EPERM
DENIED = {
    # the table load opens the loop device for writing: dm_get_device fails (-EPERM)
    "a table over a loop device": ("b 7:* w", "attach_flakey"),
    # opening /dev/loopN for writing
    "a loop device": ("b 7:* w", "init_flakey"),
    # opening /dev/loop-control, as in a container without loop devices
    "the loop driver": ("c 10:237 rw", "init_flakey"),
}


@pytest.mark.parametrize("denied", list(DENIED))
def test_a_device_cgroup_s_refusal_is_permission_denied_not_needs_root(tmp_path, devices_cgroup,
                                                                       denied, leftovers):
    rule, how = DENIED[denied]
    name = unique_name("dmfi-own-cgroup")
    leftovers.append(name)
    image = tmp_path / f"{name}.img"
    if how == "attach_flakey":
        with loop.attach(str(sparse_file(tmp_path / "backing.img", SIZE))) as lo:
            said = in_cgroup(devices_cgroup(rule), lambda: attach_flakey(name, lo.path))
    else:
        said = in_cgroup(devices_cgroup(rule), lambda: init_flakey(name, str(tmp_path), None, size=SIZE))
    assert said["error"] and said["is_permission_denied"] and not said["is_not_root"], said
    assert said["errno"] == errno.EPERM, said   # what the kernel answers to a device cgroup
    assert "needs root" not in said["message"], said
    assert "device cgroup" in said["message"], said
    # a read-only backing device is no cause (see the next test): the message must not blame one
    assert "read-only" not in said["message"], said
    # refused before anything was left: no device, no loop device, no image
    assert name not in dm_names() and not image.exists() and not loops_holding(str(image))


def test_a_switch_of_a_device_made_before_the_cgroup_s_rule_is_not_refused(tmp_path, devices_cgroup,
                                                                         leftovers):
    """The kernel opens a table's device once per mapped device: a new table reuses that open."""
    name = unique_name("dmfi-own-cgroup")
    leftovers.append(name)
    dev = init_flakey(name, str(tmp_path), None, size=SIZE)
    try:
        said = in_cgroup(devices_cgroup("b 7:* w"), dev.error_writes)
        assert said == {"error": None}
        assert "error_writes" in dmsetup("table", name)
    finally:
        dev.teardown()


def test_a_read_only_loop_device_in_a_writable_table_is_taken_and_fails_writes(tmp_path, leftovers):
    """Not a permission error: the kernel (6.12) loads the table and each write fails with EIO.

    So EPERM/EACCES from a table load while root comes from a policy (a device
    cgroup, a security module), which is what the library's message says.
    """
    image = sparse_file(tmp_path / "ro.img", SIZE)
    name = unique_name("dmfi-own-ro")
    leftovers.append(name)
    with loop.attach(str(image), read_only=True) as lo:
        dm.create(name)
        try:
            dm.load(name, [(0, SIZE // 512, "linear", f"{lo.major_minor} 0")])
            path = dm.resume(name).path
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                with mmap.mmap(-1, 4096) as buf:
                    with pytest.raises(OSError) as failed:
                        os.pwritev(fd, [buf], 0)
            finally:
                os.close(fd)
            assert failed.value.errno == errno.EIO
        finally:
            dm.remove(name)


# ---- nodes --------------------------------------------------------------------------------------------

def test_removing_a_device_leaves_another_device_s_node_at_its_path(leftovers):
    first, other = unique_name("dmfi-own-node"), unique_name("dmfi-own-node")
    leftovers.extend([first, other])
    for name in (first, other):
        dm.create(name)
        dm.load(name, [(0, 2048, "zero", "")])
        dm.resume(name)
    path, foreign = f"{dm.MAPPER_DIR}/{first}", dm.info(other).dev
    os.unlink(path)
    os.mknod(path, stat.S_IFBLK | 0o600, foreign)   # e.g. a same-named newcomer's node
    try:
        dm.remove(first)
        assert first not in dm_names()
        assert mapper_node(first) == foreign   # not this device's node: left alone
    finally:
        os.unlink(path)
    dm.remove(other)
    assert mapper_node(other) is None   # its own node goes with it


def test_an_old_handle_of_a_removed_device_leaves_a_new_image_with_its_inode_alone(tmp_path):
    """ext4 hands a freed inode number to the next file: same path, same (st_dev, st_ino).

    A handle whose device somebody else removed cannot tell that image from its
    own by path or inode, so it leaves what was under the device alone and warns.
    """
    from dmflakey_ioctl import fs
    from dmflakey_ioctl.flakey import init_flakey_image
    base = sparse_file(tmp_path / "ext4.img", 64 << 20)
    fs.mkfs(str(base), "ext4")
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    with loop.attach(str(base)) as holder:
        fs.mount(holder.path, str(mnt), "ext4")
        try:
            path = str(mnt / "shared.img")
            first = init_flakey_image(unique_name("dmfi-ino-a"), path, None, size=8 << 20)
            open_flakey(first.name).teardown()          # somebody else removes it, image and all
            second = init_flakey_image(unique_name("dmfi-ino-b"), path, None, size=8 << 20)
            try:
                assert second.image.identity == first.image.identity   # the number came back
                with pytest.warns(LeftAloneWarning, match="removed by somebody else"):
                    first.teardown()
                assert os.path.exists(path) and os.stat(path).st_ino == second.image.identity[1]
                assert second.name in dm_names() and list(loop_backing_files().values()).count(path) == 1
            finally:
                second.teardown()
            assert not os.path.exists(path)
        finally:
            fs.umount(str(mnt))
