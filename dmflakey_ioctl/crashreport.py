"""The verdicts of a crash-state exploration: what was checked, what failed, where the time went.

The explorer (explorer.py) fills a :class:`CrashReport` with one :class:`CrashState` per disk
state it checked, and a :class:`Timeline` of the log for the picture. Nothing here touches the
kernel, so a report can be saved as JSON, read back on another machine, put into a test failure
message (:meth:`CrashReport.summary`, :meth:`CrashReport.describe_failures`) or drawn as one
self-contained HTML file (:meth:`CrashReport.write_html`, rendered by crashreport_html.py).

Text that comes from outside (labels, exception messages, kernel lines, fsck output) is made
valid UTF-8 on the way in (:func:`clean_text`), so writing JSON or HTML can never fail on it.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import traceback
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import InvalidArgumentError

__all__ = [
    "PHASES",
    "KINDS",
    "POINT_MODES",
    "CrashState",
    "CrashReport",
    "Timeline",
    "clean_text",
    "describe_exception",
    "describe_fsck",
    "describe_points",
    "format_seconds",
]

#: The steps one state goes through, in order; a state's ``timings`` holds those that ran.
PHASES = ("replay", "snapshot", "fsck", "mount", "check", "umount")
#: "point": the log replayed up to an entry; "reorder": the same, minus some unflushed writes.
KINDS = ("point", "reorder")
#: The explorer's ``points`` modes besides an int N (every Nth entry).
POINT_MODES = ("flush", "fua", "mark", "entry", "list")

REPORT_FORMAT = "dmflakey-crash-report"
REPORT_VERSION = 1

# The dm-log-writes entry flag bits (see shared notes log-writes.md); an IntFlag member works too.
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8

Points = Union[str, int]
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(value: Union[str, bytes]) -> str:
    """Text that encodes as UTF-8: undecodable bytes and lone surrogates become U+FFFD."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    # a surrogate-escaped byte (os.fsdecode) or a lone surrogate: one U+FFFD each
    return _SURROGATE.sub("\ufffd", str(value))


def describe_exception(exc: BaseException) -> str:
    """A failed check as ``Type: message`` (plus an OSError's errno name) and where it raised.

    A bare ``assert`` outside pytest's rewriting has no message; the source line of the
    innermost frame then says what was asserted, so the verdict is never just "AssertionError".
    """
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    name = errno.errorcode.get(exc.errno, "") if isinstance(exc, OSError) and exc.errno else ""
    if name and name not in message:  # "[Errno 117] Structure needs cleaning" says less
        text += f" ({name})"
    frames = _shown_frames(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f"at {os.path.basename(last.filename)}:{last.lineno} in {last.name}"
        if last.line:
            where += f": {last.line.strip()}"
        text += "\n" + where
    return clean_text(text)


def _shown_frames(tb: Optional[TracebackType]) -> traceback.StackSummary:
    """The traceback's frames without those that ask to be hidden (``__tracebackhide__``, as
    ``pytest.fail()`` does), so that a check's failure points at the check."""
    shown = []
    while tb is not None:
        if not tb.tb_frame.f_locals.get("__tracebackhide__"):
            shown.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return traceback.StackSummary.extract(shown)


def describe_fsck(argv: Sequence[str], returncode: int, output: Union[str, bytes],
                  tail: int = 20) -> str:
    """An fsck that failed a state: its command, exit status and the last lines it printed."""
    lines = clean_text(output).rstrip("\n").splitlines()
    shown = lines[-tail:]
    head = f"fsck failed: {' '.join(argv)} exited with status {returncode}"
    if len(lines) > len(shown):
        head += f" (last {len(shown)} of {len(lines)} lines)"
    return "\n".join([head] + shown)


def _plain(value: Any) -> Any:
    """A setting as JSON can hold it: str, number, bool, None or a list of them; else its str."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return clean_text(value) if isinstance(value, str) else value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return clean_text(os.fsdecode(value) if isinstance(value, (bytes, os.PathLike)) else str(value))


def _refuse(what: str, cause: str) -> InvalidArgumentError:
    return InvalidArgumentError("crash report", what, cause)


@dataclass(frozen=True)
class CrashState:
    """One checked disk state: where in the log it is, the verdict, and what the kernel said.

    ``entry``: every write up to and including this log entry persisted (minus ``dropped`` for a
    "reorder" state). ``timings`` maps a phase of :data:`PHASES` to seconds; a phase that did
    not run is absent. Sequences given as lists are stored as tuples.
    """

    index: int
    entry: int
    label_before: Optional[str]
    ok: bool
    error: Optional[str] = None
    kernel_log: Tuple[str, ...] = ()
    kind: str = "point"
    dropped: Tuple[int, ...] = ()
    timings: Dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        name = f"state {self.index}"
        if self.kind not in KINDS:
            raise _refuse(name, f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "point" and self.dropped:
            raise _refuse(name, "a point state drops no writes (only a reorder state does)")
        if self.ok and self.error is not None:
            raise _refuse(name, "a state that passed has no error")
        if not self.ok and not self.error:
            raise _refuse(name, "a failed state needs an error that says why")
        unknown = sorted(set(self.timings) - set(PHASES))
        if unknown:
            raise _refuse(name, f"unknown timing phase {', '.join(unknown)} "
                                f"(phases: {', '.join(PHASES)})")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "ok", bool(self.ok))
        if self.label_before is not None:
            set_(self, "label_before", clean_text(self.label_before))
        if self.error is not None:
            set_(self, "error", clean_text(self.error))
        set_(self, "kernel_log", tuple(clean_text(line) for line in self.kernel_log))
        set_(self, "dropped", tuple(int(i) for i in self.dropped))
        set_(self, "timings", {p: float(self.timings[p]) for p in PHASES if p in self.timings})

    def where(self) -> str:
        """The state's place in the log as a sentence fragment: entry, dropped writes, mark."""
        text = f"entry {self.entry}"
        if self.kind == "reorder":
            shown = ", ".join(str(i) for i in self.dropped[:6])
            if len(self.dropped) > 6:
                shown += f", ... ({len(self.dropped)} in all)"
            noun = "write" if len(self.dropped) == 1 else "writes"
            text += f" with {len(self.dropped)} unflushed {noun} dropped ({shown})"
        if self.label_before is None:
            return text + ", before any mark"
        return f"{text}, after mark {self.label_before!r}"

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "entry": self.entry, "label_before": self.label_before,
                "ok": self.ok, "error": self.error, "kernel_log": list(self.kernel_log),
                "kind": self.kind, "dropped": list(self.dropped), "timings": dict(self.timings)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> CrashState:
        return cls(**data)


@dataclass
class Timeline:
    """The log as the HTML report draws it, small whatever the log's length.

    ``write_bins[k]`` is the number of bytes written by entries ``k*bin_width`` to
    ``(k+1)*bin_width - 1`` (at most ``max_bins`` bins). ``flushes``, ``fuas`` and ``discards``
    are entry indexes, thinned to the first one in each run of ``tick_width`` entries (1: all
    of them), so that a log of a million entries still gives a few thousand ticks at most.
    ``marks`` keeps every mark as (entry index, label).
    """

    entries: int
    flushes: List[int] = field(default_factory=list)
    fuas: List[int] = field(default_factory=list)
    marks: List[Tuple[int, str]] = field(default_factory=list)
    write_bins: List[int] = field(default_factory=list)
    bin_width: int = 1
    discards: List[int] = field(default_factory=list)
    tick_width: int = 1

    def __post_init__(self) -> None:
        if self.entries < 0 or self.bin_width < 1 or self.tick_width < 1:
            raise _refuse("timeline", "entries must be >= 0, bin_width and tick_width >= 1")
        if len(self.write_bins) != -(-self.entries // self.bin_width):
            raise _refuse("timeline", f"{len(self.write_bins)} write bins do not cover "
                                      f"{self.entries} entries at {self.bin_width} per bin")
        self.marks = [(int(index), clean_text(label)) for index, label in self.marks]

    @classmethod
    def from_entries(cls, n_entries: int, entries: Iterable[Any], *, max_bins: int = 600,
                     max_ticks: int = 4096) -> Timeline:
        """Build it in one pass over ``entries``: :class:`LogEntry` objects or anything with
        ``flags`` (the dm-log-writes bits), ``size`` (bytes) and ``label`` (a mark's, else None).

        ``n_entries`` (``len(log)``) must be known first to size the bins; a log that yields a
        different number of entries is refused.
        """
        bin_width = max(1, -(-n_entries // max_bins))
        tick_width = max(1, -(-n_entries // max_ticks))
        n_bins = -(-n_entries // bin_width)
        bins = [0] * (n_bins + 1)  # a spare bin for the one entry too many that proves a lie
        ticks: Dict[int, List[int]] = {FLUSH: [], FUA: [], DISCARD: []}
        last_cell = {FLUSH: -1, FUA: -1, DISCARD: -1}
        marks: List[Tuple[int, str]] = []
        index = -1
        for index, entry in enumerate(itertools.islice(entries, n_entries + 1)):
            flags = int(entry.flags)  # an IntFlag's own & costs 15 times more (5.5 us vs 0.36)
            if not flags & (FLUSH | FUA | DISCARD | MARK):  # most entries: a plain write
                bins[index // bin_width] += entry.size
                continue
            if flags & MARK:
                marks.append((index, entry.label or ""))
            elif not flags & DISCARD:
                bins[index // bin_width] += entry.size
            cell = index // tick_width
            for bit in (FLUSH, FUA, DISCARD):
                if flags & bit and last_cell[bit] != cell:
                    last_cell[bit] = cell
                    ticks[bit].append(index)
        if index + 1 != n_entries:
            count = f"more than {n_entries}" if index == n_entries else str(index + 1)
            raise _refuse("timeline", f"the log has {count} entries, not the {n_entries} announced")
        del bins[n_bins:]
        return cls(entries=n_entries, flushes=ticks[FLUSH], fuas=ticks[FUA], marks=marks,
                   write_bins=bins, bin_width=bin_width, discards=ticks[DISCARD],
                   tick_width=tick_width)

    def to_dict(self) -> Dict[str, Any]:
        return {"entries": self.entries, "flushes": list(self.flushes), "fuas": list(self.fuas),
                "marks": [list(mark) for mark in self.marks], "write_bins": list(self.write_bins),
                "bin_width": self.bin_width, "discards": list(self.discards),
                "tick_width": self.tick_width}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Timeline:
        return cls(**data)


def format_seconds(seconds: float) -> str:
    """Seconds as a person reads them: "41.2 s", "3 min 07 s", "1 h 02 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe_points(points: Points) -> str:
    """The points mode as words: "flush points", "every 10th entry", ..."""
    if isinstance(points, int):
        return "every entry" if points == 1 else f"every {_ordinal(points)} entry"
    return {"flush": "flush points", "fua": "FUA points", "mark": "marks", "entry": "every entry",
            "list": "listed entries"}[points]


@dataclass
class CrashReport:
    """Every state an exploration checked, in the order checked, and how long it all took.

    ``points`` is the mode the explorer was given ("flush", "fua", "mark", "entry", an int N,
    or "list" for an explicit list of entries); ``elapsed`` the seconds of the whole run;
    ``timeline`` the log as the HTML report draws it (None: drawn from the states alone);
    ``settings`` the explorer's other arguments worth keeping (after, reorder, seed, fsck,
    mount_options: a reordered state is only reproducible with its seed), shown in the page.
    """

    log_path: str
    points: Points
    states: List[CrashState] = field(default_factory=list)
    elapsed: float = 0.0
    timeline: Optional[Timeline] = None
    settings: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_path = os.fsdecode(self.log_path)
        valid = (self.points in POINT_MODES if isinstance(self.points, str)
                 else isinstance(self.points, int) and not isinstance(self.points, bool)
                 and self.points >= 1)
        if not valid:
            raise _refuse(self.log_path, f"points {self.points!r} is not one of "
                                         f"{', '.join(POINT_MODES)} or an int >= 1")
        self.settings = {str(key): _plain(value) for key, value in self.settings.items()}

    @property
    def failures(self) -> List[CrashState]:
        return [state for state in self.states if not state.ok]

    @property
    def ok(self) -> bool:
        """No state failed (also true when no state was checked: the summary says so)."""
        return all(state.ok for state in self.states)

    def phase_totals(self) -> Dict[str, float]:
        """Seconds spent in each phase over all states, in :data:`PHASES` order."""
        totals = {phase: 0.0 for phase in PHASES}
        seen = set()
        for state in self.states:
            for phase, seconds in state.timings.items():
                totals[phase] += seconds
                seen.add(phase)
        return {phase: total for phase, total in totals.items() if phase in seen}

    def summary(self) -> str:
        """One line: how many states of which log, how many failed and the first, time, rate."""
        total = len(self.states)
        reordered = sum(1 for state in self.states if state.kind == "reorder")
        name = os.path.basename(self.log_path.rstrip("/")) or self.log_path or "the log"
        noun = "crash state" if total == 1 else "crash states"
        mode = describe_points(self.points)
        if reordered:
            line = f"explored {total} {noun} of {name} ({total - reordered} at {mode}, " \
                   f"{reordered} reordered)"
        else:
            line = f"explored {total} {noun} of {name} at {mode}"
        failures = self.failures
        if not total:
            line += ": none to check"
        elif not failures:
            line += ": all passed"
        else:
            first = failures[0]
            kind = " (reordered)" if first.kind == "reorder" else ""
            mark = "before any mark" if first.label_before is None else \
                f"after mark {first.label_before!r}"
            line += f": {len(failures)} FAILED, the first at entry {first.entry}{kind} {mark}"
        line += f"; {format_seconds(self.elapsed)}"
        if total and self.elapsed >= total:
            line += f", {self.elapsed / total:.1f} s per state"
        elif total and self.elapsed > 0:
            line += f", {total / self.elapsed:.1f} states/s"
        return line

    def describe_failures(self, limit: int = 5, kernel_lines: int = 3,
                          error_lines: int = 8) -> str:
        """A few lines per failed state, for a test failure message ("" when none failed)."""
        failures = self.failures
        lines: List[str] = []
        for state in failures[:limit]:
            lines.append(f"state {state.index} at {state.where()}:")
            error = (state.error or "").splitlines() or [""]
            if len(error) > error_lines:
                more = len(error) - error_lines + 1
                error = error[:error_lines - 1] + [f"... ({more} more lines)"]
            lines.extend("    " + line for line in error)
            lines.extend("    kernel: " + line for line in state.kernel_log[-kernel_lines:])
        if len(failures) > limit:
            lines.append(f"... and {len(failures) - limit} more failed states")
        if any(state.kind == "point" for state in failures):
            lines.append(f"rebuild a state: dmflakey replay {self.log_path} --until ENTRY "
                         f"--to IMAGE")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "log_path": self.log_path,
                "points": self.points, "elapsed": self.elapsed, "ok": self.ok,
                "summary": self.summary(),
                "timeline": self.timeline.to_dict() if self.timeline else None,
                "settings": dict(self.settings),
                "states": [state.to_dict() for state in self.states]}

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write_json(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json(indent=1))
            fh.write("\n")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> CrashReport:
        """The report :meth:`to_dict` gave (``ok`` and ``summary`` are recomputed, not read)."""
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise _refuse("from_dict", f"not a {REPORT_FORMAT} document")
        if data.get("version") != REPORT_VERSION:
            raise _refuse("from_dict", f"version {data.get('version')!r} is not "
                                       f"{REPORT_VERSION}, the one this library reads")
        try:
            timeline = data["timeline"]
            return cls(log_path=data["log_path"], points=data["points"],
                       states=[CrashState.from_dict(state) for state in data["states"]],
                       elapsed=float(data["elapsed"]),
                       timeline=Timeline.from_dict(timeline) if timeline is not None else None,
                       settings=data.get("settings", {}))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidArgumentError):
                raise
            raise _refuse("from_dict", f"malformed report: {type(exc).__name__}: {exc}") from None

    @classmethod
    def read_json(cls, path: Union[str, os.PathLike]) -> CrashReport:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def write_html(self, path: Union[str, os.PathLike]) -> None:
        """One self-contained HTML file: the timeline, every state, the failures in full."""
        from .crashreport_html import render_html  # the renderer needs this module's names
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render_html(self))
