"""Removing what the library made: one device with everything under it, and what crashed runs left.

Every device the library makes carries an owner uuid (see ownership.py) and
is addressed by it, not by its name: a device removed behind our back and
made again under the same name is somebody else's.  Teardown unmounts what is
mounted from the device, removes it, lets its loop devices go and deletes the
images that are provably ours (see images.py).  A later process finds all of
it again from what the kernel reports: the uuid says who made the device and
whether its images are the library's, the table names its loop devices.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from . import fs
from .errors import DeviceBusyError, DeviceNotFoundError, DMFlakeyError, LeftAloneWarning
from .images import BackingImage, backing_of, release
from .kernel import dm, loop, mountinfo
from .ownership import Kind, Owner, Verdict

__all__ = ["OwnedDevice", "list_owned", "remove_device", "release_images", "teardown",
           "remove_owned", "cleanup_stale",
           "images_in_table"]

_MAJOR_MINOR = re.compile(r"^([0-9]+):([0-9]+)$")


@dataclass(frozen=True)
class OwnedDevice:
    """A dm device the library made, as the kernel lists it, with its decoded owner."""

    name: str
    uuid: str
    major: int
    minor: int
    owner: Owner

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)


def list_owned(kinds: Optional[Sequence[Kind]] = None) -> List[OwnedDevice]:
    """The dm devices the library made (all kinds, or those given), by their uuid."""
    out = []
    for listed in dm.list_devices():
        uuid = listed.uuid
        if uuid is None:  # kernels before 4.45 list no uuids
            try:
                uuid = dm.info(listed.name).uuid
            except DeviceNotFoundError:
                continue
        owner = Owner.from_uuid(uuid)
        if owner is not None and (kinds is None or owner.kind in kinds):
            out.append(OwnedDevice(listed.name, uuid, listed.major, listed.minor, owner))
    return out


def images_in_table(targets: Sequence[dm.Target]) -> List[BackingImage]:
    """The loop-backed images a table maps (every ``7:M`` word of its targets), once each."""
    seen, out = set(), []
    for target in targets:
        for word in target.params.split():
            match = _MAJOR_MINOR.match(word)
            if not match or int(match.group(1)) != loop.LOOP_MAJOR:
                continue
            rdev = os.makedev(int(match.group(1)), int(match.group(2)))
            if rdev in seen:
                continue
            seen.add(rdev)
            image = backing_of(rdev)
            if image is not None:
                out.append(image)
    return out


def remove_device(name: str, uuid: str, operation: str = "teardown") -> bool:
    """Unmount and remove the device uuid; False when it was already gone.

    A name that now belongs to a device with another uuid means ours was
    replaced by somebody else: nothing is touched and DeviceNotFoundError says so.
    """
    try:
        info = dm.info(dm.ByUuid(uuid, name))
    except DeviceNotFoundError:
        try:
            other = dm.info(name).uuid
        except DeviceNotFoundError:
            return False
        raise DeviceNotFoundError(operation, name, f"the device was replaced: {name} now has "
                                  f"uuid {other or '(none)'}, not {uuid}; nothing was touched")
    for point in reversed(mountinfo.mount_points_of(info.dev)):
        fs.umount(point)
    try:
        dm.remove(dm.ByUuid(uuid, name))
    except DeviceNotFoundError:
        return False   # removed meanwhile by somebody else
    return True


def release_images(images: Sequence[BackingImage], *, delete: bool) -> None:
    """After the device that held them is gone: let the loop devices go, delete owned images."""
    for image in images:
        release(image, delete=delete)


def left_to_whoever_removed_it(name: str, images: Sequence[BackingImage]) -> None:
    """Warn that a device somebody else removed keeps what was under it.

    Its images are theirs to remove now: a later file may even have the same
    inode number at the same path, so nothing here can prove them ours.
    """
    if images:
        warnings.warn(LeftAloneWarning(
            f"{name}: the device was removed by somebody else; its images "
            f"({', '.join(i.path for i in images)}) are left to them"), stacklevel=3)


def teardown(name: str, uuid: str, images: Sequence[BackingImage], *, delete_images: bool,
             operation: str = "teardown") -> None:
    """Remove the device, then release its loop devices and delete its images if ours.

    When the device was already gone, what was under it is left alone (see
    left_to_whoever_removed_it).
    """
    if remove_device(name, uuid, operation):
        release_images(images, delete=delete_images)
    else:
        left_to_whoever_removed_it(name, images)


def remove_owned(device: OwnedDevice, operation: str = "remove") -> None:
    """Tear down a device of ours found in the kernel's list, with the images it owns.

    A device over a block device the caller gave (kind ``dev``) owns nothing under
    it: that loop device or disk stays exactly as it is.  A probe's memory-backed
    loop device goes by itself (autoclear) with the probe.
    """
    owns = device.owner.kind.owns_images
    try:
        targets = dm.table(dm.ByUuid(device.uuid, device.name)) if owns else []
    except DeviceNotFoundError:
        return
    teardown(device.name, device.uuid, images_in_table(targets), delete_images=owns,
             operation=operation)


def _holders(device: OwnedDevice) -> int:
    """How many devices are stacked on this one (they must go first)."""
    try:
        return len(os.listdir(f"/sys/dev/block/{device.major}:{device.minor}/holders"))
    except OSError:
        return 0


def cleanup_stale(*, include_persistent: bool = False,
                  on_error: Optional[Callable[[DMFlakeyError], None]] = None) -> List[str]:
    """Remove what crashed runs left: devices of ours whose creating process is gone.

    Only devices made in this process's own pid namespace during this boot are
    judged (see ownership.py); devices of other namespaces, other tools or
    older versions are never touched, nor is anything where /proc cannot
    answer.  With include_persistent, CLI-made devices of this namespace go
    too.  Devices stacked on others are removed first.  Returns the names
    removed; a device that cannot be removed raises, unless on_error is given,
    which is then called with the error.
    """
    wanted = {Verdict.STALE, Verdict.PERSISTENT} if include_persistent else {Verdict.STALE}
    pending = [d for d in list_owned() if d.owner.verdict() in wanted]
    removed: List[str] = []

    def report(error: DMFlakeyError) -> None:
        if on_error is None:
            raise error
        on_error(error)

    while pending:
        progress, held = False, []
        for device in sorted(pending, key=_holders):
            if _holders(device):
                held.append(device)
                continue
            progress = True
            try:
                remove_owned(device, "cleanup")
            except DeviceNotFoundError:
                continue  # gone meanwhile
            except DMFlakeyError as exc:
                report(exc)
                continue
            removed.append(device.name)
        if not progress:  # what holds them is not ours to remove
            for device in held:
                report(DeviceBusyError("cleanup", device.name, "another device is stacked on it "
                                       "and is not stale", errno.EBUSY))
            break
        pending = held
    return removed
