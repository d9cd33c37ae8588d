"""Who made a device: the uuid the library gives every dm device, and what it tells.

Device-mapper devices are global to the kernel, while pids are not: containers
sharing one kernel each have their own pid namespace.  So the uuid records the
creator's pid, its start time (a reused pid has another), the inode of its pid
namespace and the boot id::

    DMFLAKEY-<pid>.<start time>.<pid namespace>.<boot>-<kind>-<nonce>

A device is judged stale only when it was made in the judge's own pid
namespace during this boot and its creator is gone.  Devices of other
namespaces, of unknown ones (uuids of older versions) or judged where /proc
cannot answer are never stale: they belong to somebody alive, for all we know.
pid 0 means "owned by no process" (made by the CLI): persistent until removed.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["UUID_PREFIX", "Kind", "Verdict", "Owner"]

UUID_PREFIX = "DMFLAKEY-"


class Kind(str, enum.Enum):
    """What a device is, and so what removing it involves."""

    FLAKEY_IMAGE = "img"     # flakey over an image the library made: the image goes with it
    FLAKEY_DEVICE = "dev"    # flakey over a block device the caller gave: left alone
    RECORDING = "rec"        # log-writes over a data and a log image the library made
    SCRATCH = "scratch"      # the crash explorer's replay and snapshot devices, over temp images
    PROBE = "probe"          # a feature probe's throwaway device, over no image

    @property
    def owns_images(self) -> bool:
        """Whether the images on the loop devices in its table are the library's to delete."""
        return self in (Kind.FLAKEY_IMAGE, Kind.RECORDING, Kind.SCRATCH)


class Verdict(str, enum.Enum):
    """What the judge (this process) can say about a device's owner."""

    ALIVE = "alive"
    STALE = "stale"                      # the creator is gone: safe to remove
    PERSISTENT = "persistent"            # made by the CLI: stays until removed by name
    OTHER_NAMESPACE = "other namespace"  # made in another pid namespace or boot: never judged
    UNKNOWN = "unknown"                  # an older uuid, or /proc cannot answer: never judged


def _start_time(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return int(data.rsplit(b")", 1)[1].split()[19])


def _pid_namespace() -> Optional[int]:
    """The inode of this process's pid namespace, or None when /proc cannot tell.

    /proc must also be of our own pid namespace (a container may see the
    host's), or a pid looked up there would be somebody else's.
    """
    try:
        if int(os.readlink("/proc/self")) != os.getpid():
            return None
        return os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError):
        return None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip().replace("-", "")[:16]
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    """Who made a device and what it is, decoded from (or encoded into) its uuid."""

    pid: int
    start_time: int
    pid_namespace: Optional[int]   # None: an older uuid that did not record it
    boot: Optional[str]
    kind: Kind

    @classmethod
    def current(cls, kind: Kind, persistent: bool = False) -> "Owner":
        """This process as the owner (pid 0 for a persistent device)."""
        pid = 0 if persistent else os.getpid()
        start = 0 if persistent else (_start_time(pid) or 0)
        return cls(pid, start, _pid_namespace() or 0, _boot_id() or "0", kind)

    def uuid(self) -> str:
        """A new uuid for a device of this owner (a random nonce makes each unique)."""
        return (f"{UUID_PREFIX}{self.pid}.{self.start_time}.{self.pid_namespace or 0}."
                f"{self.boot or 0}-{self.kind.value}-{os.urandom(6).hex()}")

    @classmethod
    def from_uuid(cls, uuid: Optional[str]) -> Optional["Owner"]:
        """The owner a uuid records, or None for a device the library did not make."""
        if not uuid or not uuid.startswith(UUID_PREFIX):
            return None
        try:
            who, kind, _nonce = uuid[len(UUID_PREFIX):].split("-")
            parts = who.split(".")
            if len(parts) == 2:   # DMFLAKEY-<pid>.<start>-<kind>-<nonce>, before namespaces
                return cls(int(parts[0]), int(parts[1]), None, None, Kind(kind))
            pid, start, namespace, boot = parts
            return cls(int(pid), int(start), int(namespace), boot, Kind(kind))
        except ValueError:
            return None

    @property
    def persistent(self) -> bool:
        return self.pid == 0

    def verdict(self) -> Verdict:
        """Alive, stale, persistent, or not ours to judge (see the module docstring)."""
        if self.pid_namespace is None:
            return Verdict.UNKNOWN
        mine, boot = _pid_namespace(), _boot_id()
        if mine is None or boot is None:
            return Verdict.UNKNOWN
        if self.pid_namespace != mine or self.boot != boot:
            return Verdict.OTHER_NAMESPACE
        if self.persistent:
            return Verdict.PERSISTENT
        return Verdict.ALIVE if _start_time(self.pid) == self.start_time else Verdict.STALE

    def describe(self) -> str:
        """The owner as `list` and `status` show it."""
        verdict = self.verdict()
        if verdict is Verdict.OTHER_NAMESPACE:
            return f"pid {self.pid} in another pid namespace" if self.pid else \
                "cli, another pid namespace"
        if verdict is Verdict.UNKNOWN:
            return f"pid {self.pid} (cannot tell whether it runs)" if self.pid else "cli"
        if verdict is Verdict.PERSISTENT:
            return "cli (persistent)"
        return f"pid {self.pid}" + (" (stale: the process is gone)" if verdict is Verdict.STALE
                                    else "")
