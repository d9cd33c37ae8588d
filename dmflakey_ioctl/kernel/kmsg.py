"""The kernel log (``/dev/kmsg``), read without the dmesg program.

Device-mapper explains a refused table only in the kernel log, and a crash
state's mount tells what journal recovery found there.  Other devices, other
threads and other containers log at the same time, so callers ask either for
the lines that name one device (its ``major:minor``, as device-mapper prints
them) or for every line logged while they watched (:class:`KernelLogTail`).
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from typing import Deque, List, Optional

__all__ = ["KernelLogTail", "lines_about"]

KMSG = "/dev/kmsg"


def _open() -> Optional[int]:
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # no /dev/kmsg (a minimal /dev) or no CAP_SYSLOG: nothing to tell
        return None
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _read_records(fd: int) -> List[tuple[float, str]]:
    """(seconds since boot, text) of each record logged since the last read."""
    out = []
    while True:
        try:
            record = os.read(fd, 8192)
        except BlockingIOError:
            break
        except BrokenPipeError:  # records overwritten while we read: go on with the next
            continue
        except OSError:
            break
        if not record:
            break
        head, _, text = record.decode("utf-8", "replace").partition(";")
        fields = head.split(",")
        stamp = int(fields[2]) / 1e6 if len(fields) >= 3 and fields[2].isdigit() else 0.0
        out.append((stamp, text.split("\n", 1)[0]))
    return out


class KernelLogTail:
    """Every kernel log line logged between ``start()`` (or construction) and ``read()``.

    A context manager; without a readable /dev/kmsg it reads nothing.
    """

    def __init__(self) -> None:
        self._fd = _open()

    def read(self) -> List[str]:
        """The lines logged since the previous read (or since the tail was opened)."""
        if self._fd is None:
            return []
        return [text for _, text in _read_records(self._fd)]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "KernelLogTail":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: Optional[tuple[int, int]] = None   # (pid, fd) kept open by lines_about
# Records read so far, for every caller: a thread must not consume the lines of another thread's
# failure while looking for its own.  The newest ones are kept; a second of them is what is asked for.
_recent: Deque[tuple[float, str]] = deque(maxlen=1024)
_lock = threading.Lock()


def lines_about(major: int, minor: int, since: float, limit: int = 4) -> List[str]:
    """device-mapper lines naming ``major:minor`` logged after ``since`` (time.monotonic()).

    The descriptor stays open, so each call reads only what was logged after the
    previous one; what was read is kept (the newest records) for other callers,
    whose failures may have been logged meanwhile.  The log's clock and
    time.monotonic() differ slightly: a second of slack.  Lines about other
    devices are skipped, so an error never carries another device's (or another
    thread's) words.
    """
    global _shared
    pattern = re.compile(rf"(?<![0-9]){major}:{minor}(?![0-9])")
    with _lock:
        if _shared is None or _shared[0] != os.getpid():
            fd = _open()
            if fd is None:
                return []
            os.lseek(fd, 0, os.SEEK_SET)  # a first reader looks back: the failure was just logged
            _shared = (os.getpid(), fd)
            _recent.clear()
        _recent.extend(_read_records(_shared[1]))
        records = list(_recent)
    lines = [text for stamp, text in records
             if stamp >= since - 1.0 and "device-mapper" in text and pattern.search(text)]
    return lines[-limit:]
