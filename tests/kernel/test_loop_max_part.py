"""The loop driver with max_part set, where a loop device's minor is its index times a stride.

With ``max_part=15`` loop1 is 7:16, and 7:1 would be loop0's first partition:
a table built from the index maps another device, a node made from it opens
another device.  The module's fixture reloads the loop driver with max_part=15
(possible only while no loop device is in use, which it checks first) and
puts it back as it was afterwards, also when the test fails, so the rest of
the suite (one guest session) meets the driver as before.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dmflakey_ioctl import features
from dmflakey_ioctl.flakey import init_flakey, open_flakey
from dmflakey_ioctl.kernel import dm, loop

from .helpers import dm_names, dmsetup, loop_backing_files, sparse_file, unique_name

LOOP_MODULE = Path("/sys/module/loop")
MAX_PART = 15
STRIDE = 16            # minors per loop device: the next power of two above max_part
MiB = 1 << 20
OFFSET = 1 * MiB


def max_part() -> str:
    return (LOOP_MODULE / "parameters" / "max_part").read_text().strip()


def reload_loop(*parameters: str) -> None:
    """rmmod loop, then modprobe it with parameters (from the guest's kernel tree, where there is one)."""
    for attempt in range(50):   # an autoclear device lets go of the module a moment after its last close
        removed = subprocess.run(["rmmod", "loop"], capture_output=True, text=True)
        if removed.returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"rmmod loop failed: {removed.stderr.strip()}")
    tree = os.environ.get("DMFLAKEY_VM_KERNEL_TREE")
    where = ["-d", tree, "-S", os.uname().release] if tree else []
    subprocess.run(["modprobe", *where, "loop", *parameters], check=True)


@pytest.fixture(scope="module")
def loop_with_max_part() -> Iterator[None]:
    if not (LOOP_MODULE / "initstate").exists():
        pytest.fail("the loop driver is built into this kernel: max_part can only be given on the kernel "
                    "command line (loop.max_part=15), so this test cannot set it")
    in_use, users = loop_backing_files(), int((LOOP_MODULE / "refcnt").read_text())
    assert not in_use and users == 0, (f"the loop driver is in use ({in_use or f'{users} users'}): it can "
                                       "only be reloaded with max_part while no loop device is")
    before = max_part()
    reload_loop(f"max_part={MAX_PART}")
    try:
        assert max_part() == str(MAX_PART)
        yield
    finally:
        reload_loop(*([] if before == "0" else [f"max_part={before}"]))
        assert max_part() == before


def sysfs_dev(block: str) -> str:
    return Path(f"/sys/block/{block}/dev").read_text().strip()


def test_devices_map_the_loop_device_they_attached(loop_with_max_part, tmp_path):
    placeholder = sparse_file(tmp_path / "placeholder.img", MiB)
    name = unique_name("dmfi-maxpart")
    # the placeholder takes the first free loop device, whose minor may be its index (0 * 16)
    with loop.attach(str(placeholder)) as first:
        dev = init_flakey(name, str(tmp_path), None, size=16 * MiB)
        try:
            assert dev.loop_device and dev.image
            loop_name = os.path.basename(dev.loop_device)
            index, number = int(loop_name[4:]), sysfs_dev(loop_name)
            assert index > 0 and number == f"7:{index * STRIDE}", (loop_name, number)
            assert loop_backing_files()[loop_name] == dev.image_path
            assert dmsetup("table", name).split()[3] == number   # 0 <len> flakey <dev> ...
            held_by = os.listdir(f"/sys/block/{loop_name}/holders")
            assert held_by == [os.path.basename(os.path.realpath(
                f"/sys/dev/block/{os.major(dev.dev)}:{os.minor(dev.dev)}"))]

            data = os.urandom(64 * 1024)
            fd = os.open(dev.device_path, os.O_RDWR | os.O_DIRECT)
            try:
                with mmap.mmap(-1, len(data)) as buf:
                    buf.write(data)
                    assert os.pwritev(fd, [buf], OFFSET) == len(data)
                os.fsync(fd)
            finally:
                os.close(fd)
            with open(dev.image_path, "rb") as fh:   # the very bytes, at the same offset
                fh.seek(OFFSET)
                assert fh.read(len(data)) == data
            assert placeholder.read_bytes() == bytes(MiB)

            again = open_flakey(name)
            assert again.image is not None
            assert (again.loop_device, again.image_path, again.image.identity, again.backing) == \
                (dev.loop_device, dev.image_path, dev.image.identity, number)

            features.reset_cache()   # a probe's memory-backed loop device has a strided minor too
            try:
                assert features.supported("delay_flush")
            finally:
                features.reset_cache()
        finally:
            dev.teardown()
        assert name not in dm_names() and not os.path.lexists(f"{dm.MAPPER_DIR}/{name}")
        assert loop_name not in loop_backing_files() and not os.path.exists(str(dev.image_path))
        assert loop_backing_files() == {os.path.basename(first.path): str(placeholder)}
    assert loop_backing_files() == {}
