"""Image files of ours on loop devices, known by inode so that nothing else is ever deleted.

An image is created with O_EXCL (never overwritten) and remembered by its
``(st_dev, st_ino)``.  It is attached with autoclear, and the library lets go
of the loop device once a dm table holds it: the loop device then stays bound
exactly as long as something uses it, so a process killed before its dm device
exists leaves no bound loop device behind.  An image is deleted only when the
file at its path is still the very inode the loop device held: in another
mount namespace, or after the path was reused, that path names somebody
else's file, which is left alone and named in a warning.
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from typing import Optional

from .errors import DeviceExistsError, DMFlakeyError, InvalidArgumentError, LeftAloneWarning
from .fs import MIN_SIZE, FSType
from .kernel import loop

__all__ = ["BackingImage", "check_image_size", "create_image", "attach_image", "backing_of", "release", "delete_image"]

DELETED = " (deleted)"   # how sysfs shows the path of a bound file that was unlinked


@dataclass(frozen=True)
class BackingImage:
    """An image file on a loop device: where both are and what identifies them."""

    path: str
    identity: tuple[int, int]    # the image's (st_dev, st_ino)
    loop_path: str
    loop_dev: int                # the loop device's number

    @property
    def major_minor(self) -> str:
        """The loop device as a dm table names it."""
        return f"{os.major(self.loop_dev)}:{os.minor(self.loop_dev)}"


def check_image_size(size: object, fs_kind: Optional[FSType], operation: str, name: str) -> int:
    """size as a positive multiple of 512 big enough for the filesystem, or InvalidArgumentError."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
        raise InvalidArgumentError(operation, name, f"size must be a positive multiple of 512 "
                                   f"bytes, got {size!r}")
    if fs_kind is not None and size < MIN_SIZE[fs_kind]:
        raise InvalidArgumentError(operation, name, f"{fs_kind.value} needs at least "
                                   f"{MIN_SIZE[fs_kind]} bytes, got {size}")
    return size


def create_image(path: str, size: int, operation: str, device: str) -> tuple[int, int]:
    """A new sparse file of size bytes at path (never an existing one); returns its identity."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise DeviceExistsError(operation, device, f"{path} already exists; not overwriting it",
                                errno.EEXIST) from None
    except OSError as exc:
        raise DMFlakeyError(operation, device, f"cannot create {path}", exc.errno) from None
    try:
        os.ftruncate(fd, size)
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise DMFlakeyError(operation, device, f"cannot size {path} to {size} bytes",
                            exc.errno) from None
    os.close(fd)
    return st.st_dev, st.st_ino


def attach_image(path: str, identity: tuple[int, int], operation: str, device: str, *,
                 block_size: Optional[int] = None) -> tuple[loop.LoopDevice, BackingImage]:
    """Attach the image with autoclear; the LoopDevice keeps a descriptor until close().

    Refused when the file at path is not the one created (it was swapped meanwhile).
    """
    dev = loop.attach(path, autoclear=True, block_size=block_size)
    if dev.backing_id != identity:
        dev.close()
        raise DMFlakeyError(operation, device, f"{path} is no longer the file this library "
                            "created (replaced meanwhile); left alone", errno.ESTALE)
    return dev, BackingImage(path, identity, dev.path, dev.dev)


def backing_of(rdev: int) -> Optional[BackingImage]:
    """The image on the loop device rdev (a dm table's ``7:M``), or None when it holds none."""
    try:
        path = loop.by_dev(rdev)
        found = loop.info(path)
    except DMFlakeyError:
        return None
    if found.backing_id is None:
        return None
    image = found.backing_file
    if image.endswith(DELETED):
        image = image[:-len(DELETED)]
    return BackingImage(image, found.backing_id, path, rdev)


def release(image: BackingImage, *, delete: bool) -> None:
    """After its holder is gone: make sure the loop device lets go, then delete an owned image.

    An autoclear loop device unbinds by itself at its last close; one attached
    without autoclear (older versions) is detached here, if it still holds our
    file.
    """
    loop.detach(image.loop_path, identity=image.identity)
    if delete:
        delete_image(image.path, image.identity)


def delete_image(path: str, identity: tuple[int, int]) -> bool:
    """Unlink path only if it is still the inode identity; warn and keep it otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        warnings.warn(LeftAloneWarning(f"not deleting {path}: cannot stat it ({exc})"), stacklevel=2)
        return False
    if (st.st_dev, st.st_ino) != identity:
        warnings.warn(LeftAloneWarning(
            f"not deleting {path}: it is no longer the image this library made (inode "
            f"{identity[1]} on device {os.major(identity[0])}:{os.minor(identity[0])}); somebody "
            "else's file now has that path"), stacklevel=2)
        return False
    os.unlink(path)
    return True
