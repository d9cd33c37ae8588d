"""Shared helpers of the kernel suite: unique names, the dmsetup oracle, scratch images."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

_counter = itertools.count()
REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The environment for a child Python: this checkout's package comes first.

    An editable install may point at another checkout, and a child started in a
    temporary directory would import that one.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def loop_backing_files() -> dict[str, str]:
    """Bound loop devices and their backing files as sysfs shows them ({"loop3": "/x.img (deleted)"})."""
    bound = {}
    for path in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            bound[path.parent.parent.name] = path.read_text().rstrip("\n")
        except OSError:
            continue
    return bound


def unique_name(prefix: str = "dmfi-t") -> str:
    """A device name no other test (or parallel process) uses."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def dmsetup(*args: str, check: bool = True) -> str:
    """The test-only oracle: what dmsetup says (the library never runs it)."""
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def dm_names() -> set[str]:
    """Names of the dm devices sysfs shows (a device being deleted may vanish mid-read)."""
    names = set()
    for path in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            names.add(path.read_text().strip())
        except OSError:
            continue
    return names


def kernel_release() -> tuple[int, int, int]:
    """The running kernel's version as numbers, e.g. (6, 12, 95)."""
    numbers = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", os.uname().release)
    assert numbers, os.uname().release
    return int(numbers.group(1)), int(numbers.group(2)), int(numbers.group(3) or 0)


def read_corruption_works_here() -> bool:
    """Whether read-direction corrupt_bio_byte corrupts, seen on a device of the test's own.

    A linear device over a loop image holds a pattern; a flakey device over the
    same loop image with corrupt_bio_byte 1 r is read with O_DIRECT.
    """
    import mmap
    import tempfile

    from dmflakey_ioctl.kernel import dm, loop
    with tempfile.NamedTemporaryFile(dir="/tmp") as image:
        image.write(b"\xa5" * 65536)
        image.flush()
        with loop.attach(image.name) as lo:
            name = unique_name("dmfi-oracle")
            dm.create(name)
            try:
                dm.load(name, [(0, 128, "flakey", f"{lo.major_minor} 0 0 1 5 corrupt_bio_byte 1 r 90 0")])
                path = dm.resume(name).path
                buf = mmap.mmap(-1, 4096)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                try:
                    os.preadv(fd, [buf], 0)
                finally:
                    os.close(fd)
                return buf[0] == 90
            finally:
                dm.remove(name)


def expected_support(feature: str) -> bool:
    """Whether this kernel should have feature, from the release that added it.

    Read-direction corrupt_bio_byte came with a mid-2025 fix backported to some
    stable lines only: 6.1 and 5.10 never got it, 6.16 and later have it; in
    between a device of the test's own decides.
    """
    release = kernel_release()[:2]
    if feature == "error_reads":
        return release >= (6, 4)
    if feature in ("random_read_corrupt", "random_write_corrupt"):
        return release >= (6, 5)
    if feature == "delay_flush":
        return release >= (4, 19)
    if feature == "corrupt_bio_byte_read":
        if release >= (6, 16):
            return True
        if release < (6, 6):
            return False
        return read_corruption_works_here()
    raise AssertionError(f"no expectation for {feature}")
