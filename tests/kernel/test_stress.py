"""Many flakey devices at once, and several processes at once: nothing fails and nothing leaks.

64 devices over 64 loop-attached images live side by side, each is switched
and checked to drop its own writes, then all are torn down; 4 processes run 25
create/switch/teardown cycles each at the same time (racing for loop devices
and device-mapper minors).  Afterwards no dm device, loop device, /dev/mapper
node or image of the test is left, checked here explicitly besides the
session's leak check.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path
from typing import Dict, List

from dmflakey_ioctl.kernel import dm
from dmflakey_ioctl.flakey import Flakey, init_flakey

from .helpers import dm_names, unique_name

DEVICES = 64
WORKERS = 4
CYCLES = 25
IMAGE_SIZE = 1 << 20      # sparse 1 MiB images: 2048 sectors
BLOCK = 4096


def bound_loops(directory: Path) -> List[str]:
    """Loop devices bound to a file under directory, read from sysfs."""
    out = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        if path.startswith(f"{directory}/"):
            out.append(f"{backing.parent.parent.name}:{path}")
    return sorted(out)


def leftovers(prefix: str, directory: Path) -> Dict[str, List[str]]:
    """What devices named prefix* and images under directory left behind; empty lists when clean."""
    state = {
        "dm devices": sorted(n for n in dm_names() if n.startswith(prefix)),
        "listed by DM_LIST_DEVICES": sorted(d.name for d in dm.list_devices() if d.name.startswith(prefix)),
        "loop devices": bound_loops(directory),
        "/dev/mapper nodes": sorted(p.name for p in Path(dm.MAPPER_DIR).glob(f"{prefix}*")),
        "images": sorted(p.name for p in directory.glob("*.img")),
    }
    return {k: v for k, v in state.items() if v}


def _block(tag: str, i: int) -> bytes:
    return f"{tag} {i} ".encode().ljust(BLOCK, b".")


def _image_block(dev: Flakey) -> bytes:
    assert dev.image_path
    with open(dev.image_path, "rb") as fh:
        return fh.read(BLOCK)


def test_64_devices_at_once_all_switched_then_all_torn_down(tmp_path):
    prefix = unique_name("dmfi-many")
    devs: List[Flakey] = []
    try:
        for i in range(DEVICES):
            devs.append(init_flakey(f"{prefix}-{i}", str(tmp_path), fs_type=None, size=IMAGE_SIZE))
        assert len(dm_names() & {d.name for d in devs}) == DEVICES
        assert len({d.loop_device for d in devs}) == DEVICES
        assert len({os.stat(d.device_path).st_rdev for d in devs}) == DEVICES
        # each device writes through to its own image ...
        for i, dev in enumerate(devs):
            fd = os.open(dev.device_path, os.O_RDWR)
            try:
                os.pwrite(fd, _block("kept", i), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        for dev in devs:
            dev.drop_writes()
        for i, dev in enumerate(devs):
            table = dev.table().fault
            assert table.drop_writes and table.down_interval > 0 and table.up_interval == 0, (dev.name, table)
            assert not dm.info(dev.name).suspended
            # ... and, switched, acknowledges writes but keeps them off the image
            fd = os.open(dev.device_path, os.O_RDWR)
            try:
                os.pwrite(fd, _block("dropped", i), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        for i, dev in enumerate(devs):
            assert _image_block(dev) == _block("kept", i), dev.name
            dev.allow_writes()
            table = dev.table().fault
            assert not table.drop_writes and table.up_interval > 0 and table.down_interval == 0, (dev.name, table)
    finally:
        problems = []
        for dev in devs:
            try:
                dev.teardown()
            except Exception as exc:  # noqa: BLE001 - tear down the rest, then fail
                problems.append(f"{dev.name}: {exc}")
    assert not problems, problems
    assert leftovers(prefix, tmp_path) == {}


def _cycles(prefix: str, directory: str, worker: int) -> List[str]:
    """One worker process: CYCLES create/switch/teardown cycles; the failures, formatted."""
    failures = []
    for cycle in range(CYCLES):
        try:
            dev = init_flakey(f"{prefix}-{worker}-{cycle}", directory, fs_type=None, size=IMAGE_SIZE)
            try:
                dev.drop_writes()
                dev.error_writes(interval=5, up_interval=1)
                dev.allow_writes()
                assert not dev.table().fault.drop_writes
            finally:
                dev.teardown()
        except Exception:  # noqa: BLE001 - reported to the parent
            failures.append(f"worker {worker} cycle {cycle}:\n{traceback.format_exc()}")
    return failures


def test_parallel_processes_create_switch_and_tear_down(tmp_path):
    prefix = unique_name("dmfi-par")
    ctx = multiprocessing.get_context("fork")  # a new interpreter costs a second in the guest
    with ctx.Pool(WORKERS) as pool:
        pending = pool.starmap_async(_cycles, [(prefix, str(tmp_path), w) for w in range(WORKERS)])
        results = pending.get(timeout=300)
    failures = [f for worker in results for f in worker]
    assert not failures, "\n".join(failures[:5])
    assert leftovers(prefix, tmp_path) == {}
