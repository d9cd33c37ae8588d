"""Device nodes without udev, and no helper programs: the container case, for real.

Each test runs one child Python process (about a second in the guest), which
reports in JSON what it saw; the parent asserts on it and cleans up whatever a
crashed child may have left.  The static check that the package runs no program
but mkfs is tests/unit/test_no_programs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmflakey_ioctl import fs

from dmflakey_ioctl.kernel import dm, loop

from .helpers import child_env, dm_names, sparse_file, unique_name

IMAGE_SIZE = 16 << 20
MARK = b"written through /dev/mapper"
MARK_OFFSET = 12288

# What a minimal container's /dev holds (docker's default set, without pts/shm/mqueue).
MINIMAL_DEV = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
               "tty": (5, 0)}

# What a child reports of a device node (its kind and numbers) and of a block device in sysfs.
NODE_FACTS = r'''
import os, stat


def node(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = "chr" if stat.S_ISCHR(st.st_mode) else "blk" if stat.S_ISBLK(st.st_mode) else "other"
    return {"kind": kind, "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)]}


def sysfs_dev(block):
    with open(f"/sys/block/{block}/dev") as fh:
        return [int(x) for x in fh.read().split(":")]
'''

# Shared by both children: the whole loop + dm life cycle through the library, reported as JSON.
CHILD_COMMON = NODE_FACTS + r'''
import ctypes, json, sys, traceback

image, name, mark, mark_offset = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
report = {}


def life_cycle():
    from dmflakey_ioctl import fs
    from dmflakey_ioctl.kernel import dm, loop
    lo = loop.attach(image)
    created = False
    try:
        report["loop"] = {"path": lo.path, "number": lo.number, "sysfs": sysfs_dev(f"loop{lo.number}"),
                          "node": node(lo.path)}
        report["loop_control"] = node("/dev/loop-control")
        dm.create(name)
        created = True
        dm.load(name, [dm.Target(0, lo.size // 512, "linear", f"{lo.major_minor} 0")])
        info = dm.resume(name)
        mapper = f"/dev/mapper/{name}"
        report["dm"] = {"dev": [info.major, info.minor], "sysfs": sysfs_dev(f"dm-{info.minor}"),
                        "node": node(mapper)}
        report["mapper_control"] = node("/dev/mapper/control")
        fd = os.open(mapper, os.O_RDWR)
        try:
            os.pwrite(fd, mark, mark_offset)
            os.fsync(fd)
            report["read_back"] = os.pread(fd, len(mark), mark_offset).decode(errors="replace")
        finally:
            os.close(fd)
        extra()
        report["mapper_before_remove"] = sorted(os.listdir("/dev/mapper"))
        dm.remove(name)
        created = False
        report["mapper_node_after_remove"] = node(mapper)
        report["mapper_after_remove"] = sorted(os.listdir("/dev/mapper"))
    finally:
        if created:
            try:
                dm.remove(name)
            except BaseException as exc:
                report["cleanup_error"] = repr(exc)
        lo.detach()
    report["loop_bound_after_detach"] = os.path.exists(f"/sys/block/loop{lo.number}/loop/backing_file")


def extra():
    pass


def run(setup):
    try:
        setup()
        life_cycle()
    except BaseException:
        report["error"] = traceback.format_exc()
    print(json.dumps(report))
'''

# A private mount namespace whose /dev is a fresh tmpfs holding only the given character nodes.
PRIVATE_DEV = r'''
import ctypes, os, stat

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_REC, MS_PRIVATE = 2, 16384, 1 << 18


def private_dev(entries):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / recursively private")
    check(libc.mount(b"tmpfs", b"/dev", b"tmpfs", MS_NOSUID, b"mode=0755"), "tmpfs on /dev")
    old = os.umask(0)
    try:
        for entry, (major, minor) in entries.items():
            os.mknod(f"/dev/{entry}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
    finally:
        os.umask(old)
    with open("/proc/self/mounts", "rb") as fh:
        return [line.split()[2].decode() for line in fh if line.split()[1] == b"/dev"]
'''

CHILD_NAMESPACE = CHILD_COMMON + PRIVATE_DEV + r'''
MINIMAL = json.loads(sys.argv[5])


def minimal_dev():
    report["dev_mount"] = private_dev(MINIMAL)
    report["dev_before"] = sorted(os.listdir("/dev"))


def listing():
    report["dev_after"] = sorted(os.listdir("/dev"))


extra = listing
run(minimal_dev)
'''

# init_flakey with ext4 where /dev is an EMPTY tmpfs: not even /dev/null (mkfs must not need it).
CHILD_EMPTY_DEV = PRIVATE_DEV + NODE_FACTS + r'''
import json, sys, traceback

folder, name, mark = sys.argv[1], sys.argv[2], sys.argv[3]
report = {}


def main():
    report["dev_mount"] = private_dev({})
    report["dev_before"] = sorted(os.listdir("/dev"))
    from dmflakey_ioctl import fs, init_flakey
    dev = init_flakey(name, folder, "ext4", size=32 << 20)
    number = int(dev.loop_device[len("/dev/loop"):])
    report["loop"] = {"path": dev.loop_device, "node": node(dev.loop_device),
                      "sysfs": sysfs_dev(f"loop{number}")}
    minor = os.minor(os.stat(dev.device_path).st_rdev)
    report["dm"] = {"node": node(dev.device_path), "sysfs": sysfs_dev(f"dm-{minor}"),
                    "name": open(f"/sys/block/dm-{minor}/dm/name").read().strip()}
    report["loop_control"] = node("/dev/loop-control")
    report["mapper_control"] = node("/dev/mapper/control")
    report["dev_with_device"] = sorted(os.listdir("/dev"))
    target = os.path.join(folder, "mnt")
    os.mkdir(target)
    dev.mount(target)
    with open(os.path.join(target, "file"), "w") as fh:
        fh.write(mark)
    fs.syncfs(target)
    fs.umount(target)          # the page cache goes with the mount: the read below comes from the device
    dev.mount(target)
    with open(os.path.join(target, "file")) as fh:
        report["read_back"] = fh.read()
    report["mounted_before_teardown"] = os.path.ismount(target)
    dev.teardown()             # unmounts, removes the device, its node, the loop device and the image
    report["mounted_after_teardown"] = os.path.ismount(target)
    report["image_after_teardown"] = os.path.exists(dev.image_path)
    report["dm_after_teardown"] = os.path.exists(f"/sys/block/dm-{minor}/dm/name") and \
        open(f"/sys/block/dm-{minor}/dm/name").read().strip() == name
    report["loop_bound_after_teardown"] = os.path.exists(f"/sys/block/loop{number}/loop/backing_file")
    report["mapper_after_teardown"] = sorted(os.listdir("/dev/mapper"))


try:
    main()
except BaseException:
    report["error"] = traceback.format_exc()
print(json.dumps(report))
'''

CHILD_NO_PATH = CHILD_COMMON + r'''
import shutil

spawned = []


def audit(event, args):
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "pty.spawn"):
        program = args[0] if args else None
        if program is None and event == "subprocess.Popen":
            program = args[1] if isinstance(args[1], (str, bytes)) else list(args[1])[0]
        spawned.append([event, os.fsdecode(program) if isinstance(program, (str, bytes)) else repr(program)])


def no_path():
    report["which"] = {p: shutil.which(p) for p in ("dmsetup", "losetup", "mount", "umount", "udevadm", "modprobe")}
    report["path"] = os.environ.get("PATH")
    report["spawned"] = spawned  # filled in by the audit hook until the report is printed
    sys.addaudithook(audit)


def with_filesystem():
    # mkfs is the one program the library runs (found in /sbin even with an empty PATH); mount is libc
    from dmflakey_ioctl import fs
    mapper, target = f"/dev/mapper/{name}", sys.argv[5]
    fs.mkfs(mapper, "ext4")
    fs.mount(mapper, target)
    try:
        report["mounted"] = any(line.split()[:2] == [mapper.encode(), os.fsencode(target)]
                                for line in open("/proc/self/mounts", "rb"))
        with open(os.path.join(target, "file"), "w") as fh:
            fh.write("hello")
        fs.syncfs(target)
    finally:
        fs.umount(target)
    with open("/proc/self/mounts", "rb") as fh:
        report["mounted_after"] = any(line.split()[1] == os.fsencode(target) for line in fh)


extra = with_filesystem
run(no_path)
'''


def run_child(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing (status {proc.returncode}): {proc.stderr.strip()[-2000:]}"
    report = json.loads(lines[-1])
    assert "error" not in report, f"child failed:\n{report['error']}\nstderr: {proc.stderr.strip()[-1000:]}"
    assert proc.returncode == 0, proc.stderr
    return report


@pytest.fixture
def image(tmp_path):
    """A scratch image and mount point; what a crashed child left (mount, dm device, loop) is torn down."""
    folder = Path(os.path.realpath(tmp_path))
    path = sparse_file(folder / "nodes.img", IMAGE_SIZE)
    target = folder / "mnt"
    target.mkdir()
    name = unique_name("dmfi-nodes")
    yield path, name, target
    if any(line.split()[1] == bytes(target) for line in Path("/proc/self/mounts").read_bytes().splitlines()):
        fs.umount(str(target))
    if name in dm_names():
        dm.remove(name)
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if p.read_text().rstrip("\n") == str(path):
                loop.detach(f"/dev/{p.parent.parent.name}")
        except OSError:
            continue


def assert_life_cycle(report: dict, path: Path, name: str, mark_in_file: bool = True) -> None:
    lo, dmr = report["loop"], report["dm"]
    assert lo["path"] == f"/dev/loop{lo['number']}"
    assert lo["node"] == {"kind": "blk", "rdev": lo["sysfs"]} and lo["sysfs"][0] == loop.LOOP_MAJOR
    assert report["loop_control"] == {"kind": "chr", "rdev": [10, 237]}
    assert report["mapper_control"] == {"kind": "chr", "rdev": [10, 236]}
    assert dmr["node"] == {"kind": "blk", "rdev": dmr["dev"]} and dmr["dev"] == dmr["sysfs"]
    assert report["read_back"] == MARK.decode()
    assert name in report["mapper_before_remove"]
    assert report["mapper_node_after_remove"] is None and name not in report["mapper_after_remove"]
    assert "cleanup_error" not in report
    assert report["loop_bound_after_detach"] is False
    if mark_in_file:  # the bytes went mapper -> dm -> loop -> file
        with open(path, "rb") as fh:
            fh.seek(MARK_OFFSET)
            assert fh.read(len(MARK)) == MARK
    # and the child left nothing behind in the kernel
    assert name not in dm_names()
    assert not Path(f"/sys/block/loop{lo['number']}/loop/backing_file").exists() or \
        Path(f"/sys/block/loop{lo['number']}/loop/backing_file").read_text().strip() != str(path)


def test_nodes_are_made_in_a_minimal_container_dev(image):
    path, name, _ = image
    report = run_child(CHILD_NAMESPACE, str(path), name, MARK.decode(), str(MARK_OFFSET),
                       json.dumps(MINIMAL_DEV), env=child_env())
    assert report["dev_mount"][-1] == "tmpfs"  # the top mount on /dev (devtmpfs lies beneath)
    assert report["dev_before"] == sorted(MINIMAL_DEV)  # no loop-control, no loopN, no mapper
    assert_life_cycle(report, path, name)
    number = report["loop"]["number"]
    assert set(report["dev_after"]) == set(MINIMAL_DEV) | {"loop-control", f"loop{number}", "mapper"}
    assert report["mapper_after_remove"] == ["control"]
    # the private /dev never leaked into ours: the parent's namespace has no mapper node for it
    assert not os.path.lexists(f"/dev/mapper/{name}")


def test_no_dmsetup_losetup_or_mount_program_is_needed(image, tmp_path):
    path, name, target = image
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    report = run_child(CHILD_NO_PATH, str(path), name, MARK.decode(), str(MARK_OFFSET), str(target),
                       env=child_env(PATH=str(empty)))
    spawned = report["spawned"]
    assert report["path"] == str(empty)
    assert report["which"] == dict.fromkeys(report["which"])  # none of them is reachable
    assert_life_cycle(report, path, name, mark_in_file=False)  # mkfs overwrote the mark
    assert report["mounted"] is True and report["mounted_after"] is False
    programs = [os.path.basename(program) for _event, program in spawned]
    assert programs == ["mkfs.ext4"], f"the library ran {spawned}"


@pytest.fixture
def folder(tmp_path):
    """A folder for the image and the mount point; what a crashed child left in the kernel is removed."""
    where = Path(os.path.realpath(tmp_path))
    name = unique_name("dmfi-empty")
    yield where, name
    # the child's mounts went with its mount namespace; its device and loop device did not
    if name in dm_names():
        dm.remove(name)
    for p in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if p.read_text().rstrip("\n").startswith(f"{where}/"):
                loop.detach(f"/dev/{p.parent.parent.name}")
        except OSError:
            continue


def test_ext4_device_in_an_empty_tmpfs_dev(folder):
    """No /dev/null, no loop-control, no mapper: the library makes what it needs, mkfs runs."""
    where, name = folder
    report = run_child(CHILD_EMPTY_DEV, str(where), name, MARK.decode(), env=child_env())
    assert report["dev_mount"][-1] == "tmpfs" and report["dev_before"] == []
    lo, dmr = report["loop"], report["dm"]
    assert lo["node"] == {"kind": "blk", "rdev": lo["sysfs"]} and lo["sysfs"][0] == loop.LOOP_MAJOR
    assert dmr["node"] == {"kind": "blk", "rdev": dmr["sysfs"]} and dmr["name"] == name
    assert report["loop_control"] == {"kind": "chr", "rdev": [10, 237]}
    assert report["mapper_control"] == {"kind": "chr", "rdev": [10, 236]}
    # exactly the nodes the library needs, and no /dev/null made for mkfs
    assert report["dev_with_device"] == sorted(["loop-control", Path(lo["path"]).name, "mapper"])
    assert report["read_back"] == MARK.decode() and report["mounted_before_teardown"] is True
    assert report["mounted_after_teardown"] is False
    assert report["image_after_teardown"] is False and not (where / f"{name}.img").exists()
    assert report["dm_after_teardown"] is False and report["loop_bound_after_teardown"] is False
    assert report["mapper_after_teardown"] == ["control"]
    assert name not in dm_names() and not os.path.lexists(f"/dev/mapper/{name}")
