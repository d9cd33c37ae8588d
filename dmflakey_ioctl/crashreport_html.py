"""A crash report as one self-contained HTML page: a picture of the log with every verdict on it.

Layout: a header (verdict, summary, where the time went), then an inline SVG whose x axis is the
log's entry index: write volume per bin, flush/FUA/discard ticks, marks as labelled flags, and
each checked state as a marker at its entry (circle: a replay point; diamond, stacked below:
a reordered state; green passed, red failed and larger). Below it, every failed state in plain
HTML with its error and its kernel log in ``<details>``.

Everything is drawn by Python, so the page says all of that with JavaScript off (markers carry
an SVG ``<title>`` tooltip). The small script only adds interaction: hover or arrow keys show a
state in a panel, click pins it, drag zooms. Per-entry drawings (bins, ticks, mark lines) live
in a nested SVG whose viewBox is in entries, so zooming is one attribute; markers and labels
are in pixels (so shapes stay round) and are moved by the script.

No external resource of any kind: no fonts, no CDN, no images. All outside text is escaped
(HTML) or embedded as JSON with ``<``, ``>`` and ``&`` escaped, so a label such as
``</script>`` stays text.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any, Dict, List, Sequence, Tuple

from .crashreport import PHASES, CrashReport, CrashState, Timeline, describe_points, format_seconds

__all__ = ["render_html"]

# geometry of the chart, in SVG user units (the SVG scales to the page width)
WIDTH = 1200
GUTTER = 70           # lane names on the left
PLOT_W = WIDTH - GUTTER - 16
LANE = {              # name -> (top, height)
    "marks": (0, 30),
    "writes": (34, 56),
    "flush": (96, 12),
    "FUA": (112, 12),
    "discard": (128, 12),
    "states": (146, 24),
}
REORDER_TOP = 174
REORDER_ROW = 11
MAX_REORDER_ROWS = 8
CHAR_W = 6.4          # estimated width of a label character at the mark font size
LABEL_MAX = 28        # mark labels longer than this are shortened on the chart (full in tooltip)
KERNEL_LINES_MAX = 300  # per state, in the page; the JSON report keeps them all

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _esc(text: Any) -> str:
    """Escaped for HTML text and quoted attributes; control characters become U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", str(text)), quote=True)


def _json_for_script(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the strings hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _num(value: float) -> str:
    """A coordinate, short: 12.0 -> "12", 12.345 -> "12.3"."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _count(value: float) -> str:
    """An entry number on the axis: 950, 12.5k, 1.25M."""
    if value < 10_000:
        return f"{value:g}"
    if value < 1_000_000:
        return f"{value / 1000:g}k"
    return f"{value / 1_000_000:g}M"


def _bytes(value: float) -> str:
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _nice_step(span: float, count: int = 10) -> float:
    raw = max(span / count, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def _kernel_tail(lines: Sequence[str]) -> List[str]:
    """The last KERNEL_LINES_MAX lines, saying how many were left out."""
    shown = list(lines[-KERNEL_LINES_MAX:])
    if len(lines) > len(shown):
        shown.insert(0, f"[... {len(lines) - len(shown)} earlier lines in the JSON report]")
    return shown


def _one_line(text: str, limit: int = 160) -> str:
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= limit else first[:limit - 1] + "\u2026"


class _Chart:
    """The SVG timeline for one report, drawn for its initial view."""

    def __init__(self, report: CrashReport) -> None:
        self.report = report
        self.timeline = report.timeline
        states = report.states
        last = max((state.entry for state in states), default=0)
        self.entries = max(self.timeline.entries if self.timeline else last + 1, 1)
        first = min((state.entry for state in states), default=0)
        start = 0.0
        if first > 0.1 * self.entries:  # zoom past a long prefix (mkfs) that nothing checks
            start = max(0.0, first - 0.05 * (self.entries - first))
        self.view = (start, float(self.entries))
        self.rows = self._reorder_rows(states)
        reorder_rows = max(self.rows.values(), default=-1) + 1
        self.reorder_height = min(reorder_rows, MAX_REORDER_ROWS) * REORDER_ROW
        self.plot_bottom = REORDER_TOP + self.reorder_height if reorder_rows else \
            LANE["states"][0] + LANE["states"][1]
        self.axis_y = self.plot_bottom + 4
        self.height = self.axis_y + 22

    @staticmethod
    def _reorder_rows(states: Sequence[CrashState]) -> Dict[int, int]:
        """Position in report -> row in the reorder lane (the n-th reorder state at its entry)."""
        seen: Dict[int, int] = {}
        rows = {}
        for position, state in enumerate(states):
            if state.kind == "reorder":
                rows[position] = seen.get(state.entry, 0)
                seen[state.entry] = rows[position] + 1
        return rows

    def px(self, entry: float) -> float:
        """The x of an entry's middle in the initial view."""
        start, end = self.view
        return GUTTER + (entry + 0.5 - start) / (end - start) * PLOT_W

    def visible(self, x: float) -> bool:
        return GUTTER - 0.5 <= x <= GUTTER + PLOT_W + 0.5

    def svg(self) -> str:
        start, end = self.view
        parts = [f'<svg id="chart" viewBox="0 0 {WIDTH} {self.height}" role="img" '
                 f'aria-label="timeline of the log with the checked crash states">']
        parts.append(self._lane_names())
        parts.append(f'<svg id="plot" x="{GUTTER}" y="0" width="{PLOT_W}" height="{self.height}" '
                     f'viewBox="{_num(start)} 0 {_num(end - start)} {self.height}" '
                     f'preserveAspectRatio="none">')
        parts.append(f'<rect class="bg" x="0" y="0" width="{self.entries}" '
                     f'height="{self.plot_bottom}"/>')
        if self.timeline:
            parts.append(self._writes(self.timeline))
            for lane, cls, ticks in (("flush", "flush", self.timeline.flushes),
                                     ("FUA", "fua", self.timeline.fuas),
                                     ("discard", "discard", self.timeline.discards)):
                parts.append(self._ticks(cls, ticks, *LANE[lane]))
            parts.append(self._mark_lines(self.timeline))
        parts.append("</svg>")
        if self.timeline:
            parts.append(self._mark_flags(self.timeline))
        parts.append(self._markers())
        parts.append(self._axis())
        parts.append(f'<line id="cursor" class="cursor" x1="0" x2="0" y1="{LANE["writes"][0]}" '
                     f'y2="{self.plot_bottom}" visibility="hidden"/>'
                     f'<rect id="brush" class="brush" x="0" y="0" width="0" '
                     f'height="{self.plot_bottom}" visibility="hidden"/>')
        parts.append("</svg>")
        return "".join(parts)

    def _lane_names(self) -> str:
        names = list(LANE) if self.timeline else ["states"]
        out = ['<g class="lanes">']
        for name in names:
            top, height = LANE[name]
            out.append(f'<text x="{GUTTER - 8}" y="{top + height / 2 + 4:g}">{name}</text>')
        if self.reorder_height:
            out.append(f'<text x="{GUTTER - 8}" y="{REORDER_TOP + 11}">reorder</text>')
        out.append(f'<text x="{GUTTER - 8}" y="{self.axis_y + 14}">entry</text></g>')
        return "".join(out)

    def _writes(self, timeline: Timeline) -> str:
        """Bytes per bin as a step area, log scale (a 4 KiB fsync must show next to mkfs)."""
        top, height = LANE["writes"]
        base = top + height
        peak = max(timeline.write_bins, default=0)
        floor = 256.0
        span = math.log(max(peak, 2 * floor) / floor)
        d = [f"M0 {base}"]
        for k, written in enumerate(timeline.write_bins):
            level = 0.0 if written <= 0 else max(1.5, height * math.log(max(written, floor) / floor)
                                                 / span)
            right = min((k + 1) * timeline.bin_width, timeline.entries)
            d.append(f"V{_num(base - level)}H{right}")
        d.append(f"V{base}Z")
        title = (f"bytes written per {timeline.bin_width} entries (log scale); "
                 f"largest bin {_bytes(peak)}")
        return f'<path class="writes" d="{"".join(d)}"><title>{_esc(title)}</title></path>'

    def _ticks(self, cls: str, ticks: Sequence[int], top: int, height: int) -> str:
        """All ticks of one kind as one path, relative moves, to stay small."""
        if not ticks:
            return ""
        d = [f"M{ticks[0]}.5 {top}v{height}"]
        for before, index in zip(ticks, ticks[1:]):
            d.append(f"m{index - before}-{height}v{height}")
        return f'<path class="tick {cls}" d="{"".join(d)}"/>'

    def _mark_lines(self, timeline: Timeline) -> str:
        if not timeline.marks:
            return ""
        top = LANE["writes"][0]
        d = "".join(f"M{index}.5 {top}V{self.plot_bottom}" for index, _ in timeline.marks)
        return f'<path class="markline" d="{d}"/>'

    def _mark_flags(self, timeline: Timeline) -> str:
        """A flag per mark, its label on the first of two rows where it fits (else none)."""
        out = ['<g id="marks">']
        rights = [-1e9, -1e9]  # where the last label shown on each row ends
        for index, label in timeline.marks:
            text = label if len(label) <= LABEL_MAX else label[:LABEL_MAX - 1] + "\u2026"
            width = 12 + CHAR_W * len(text)
            x = self.px(index)
            cls = "mk"
            if not self.visible(x):
                cls += " off"
            elif x >= rights[0] + 4:
                rights[0] = x + width
            elif x >= rights[1] + 4:
                rights[1] = x + width
                cls += " row2"
            else:
                cls += " nolabel"
            out.append(f'<g class="{cls}" data-e="{index}" data-w="{width:.0f}" '
                       f'transform="translate({_num(x)})"><path d="M0 28V4"/><path class="flag" '
                       f'd="M0 4h9l-3 4 3 4H0"/>'
                       f'<text x="11" y="13">{_esc(text)}</text>'
                       f'<title>mark {_esc(repr(label))} at entry {index}</title></g>')
        out.append("</g>")
        return "".join(out)

    def _markers(self) -> str:
        """One marker per state; passed ones first so that failed ones are drawn on top."""
        order = sorted(range(len(self.report.states)),
                       key=lambda i: not self.report.states[i].ok)
        out = ['<g id="states">']
        states_top, states_height = LANE["states"]
        for position in order:
            state = self.report.states[position]
            x = self.px(state.entry)
            verdict = "ok" if state.ok else "fail"
            hidden = "" if self.visible(x) else " off"
            tip = f"state {state.index}, entry {state.entry}" + \
                (" (reordered)" if state.kind == "reorder" else "") + \
                ("" if state.label_before is None else f", after {state.label_before!r}") + \
                (": passed" if state.ok else ": FAILED: " + _one_line(state.error or ""))
            if state.kind == "point":
                y = states_top + states_height / 2
                out.append(f'<circle class="st {verdict}{hidden}" data-i="{position}" '
                           f'cx="{_num(x)}" cy="{y:g}" r="{4 if state.ok else 5.5}">'
                           f'<title>{_esc(tip)}</title></circle>')
            else:
                row = min(self.rows[position], MAX_REORDER_ROWS - 1)
                y = REORDER_TOP + row * REORDER_ROW + REORDER_ROW / 2
                size = 4 if state.ok else 5.5
                out.append(f'<path class="st re {verdict}{hidden}" data-i="{position}" '
                           f'transform="translate({_num(x)} {y:g})" '
                           f'd="M0 -{size}L{size} 0 0 {size}-{size} 0Z">'
                           f'<title>{_esc(tip)}</title></path>')
        out.append("</g>")
        return "".join(out)

    def _axis(self) -> str:
        start, end = self.view
        step = _nice_step(end - start)
        out = [f'<g id="axis"><line x1="{GUTTER}" x2="{GUTTER + PLOT_W}" y1="{self.axis_y}" '
               f'y2="{self.axis_y}"/>']
        value = math.ceil(start / step) * step
        while value <= end:
            x = GUTTER + (value - start) / (end - start) * PLOT_W
            out.append(f'<line x1="{_num(x)}" x2="{_num(x)}" y1="{self.axis_y}" '
                       f'y2="{self.axis_y + 4}"/><text x="{_num(x)}" y="{self.axis_y + 15}">'
                       f'{_count(value)}</text>')
            value += step
        out.append("</g>")
        return "".join(out)

    def script_data(self) -> Dict[str, Any]:
        """What the script needs: the geometry, the view, and each state in full.

        Kernel lines are stored once in ``lines`` and referred to by number: every state's
        mount prints nearly the same lines, and a report of thousands of states stays small.
        """
        lines: Dict[str, int] = {}
        states = []
        for position, state in enumerate(self.report.states):
            kernel = _kernel_tail(state.kernel_log)
            states.append([state.index, state.entry, state.kind == "reorder", state.ok,
                           state.label_before, state.error,
                           [lines.setdefault(line, len(lines)) for line in kernel],
                           list(state.dropped),
                           [None if phase not in state.timings else round(state.timings[phase], 4)
                            for phase in PHASES],
                           self.rows.get(position, 0)])
        return {"n": self.entries, "view": list(self.view), "initial": list(self.view),
                "gutter": GUTTER, "width": PLOT_W, "axisY": self.axis_y,
                "statesY": LANE["states"][0] + LANE["states"][1] / 2,
                "reorderY": REORDER_TOP, "hasReorder": bool(self.reorder_height),
                "reorderRow": REORDER_ROW, "reorderRows": MAX_REORDER_ROWS,
                "phases": list(PHASES), "lines": list(lines), "states": states}


def _header(report: CrashReport, chart: _Chart) -> str:
    total = len(report.states)
    failed = len(report.failures)
    if failed:
        verdict = f'<span class="verdict fail">{failed} of {total} FAILED</span>'
    elif total:
        verdict = f'<span class="verdict ok">all {total} passed</span>'
    else:
        verdict = '<span class="verdict none">no state checked</span>'
    reordered = sum(1 for state in report.states if state.kind == "reorder")
    facts = [f"points: {_esc(describe_points(report.points))}",
             f"{chart.entries} log entries" if report.timeline else "",
             f"{reordered} reordered states" if reordered else "",
             f"run: {format_seconds(report.elapsed)}"]
    for key, value in report.settings.items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else \
            repr(value) if value == "" else str(value)
        facts.append(f"{_esc(key)}: {_esc(shown)}")
    return (f'<header><h1>{verdict} <span class="title">crash states of '
            f'<code>{_esc(report.log_path)}</code></span></h1>'
            f'<p class="summary">{_esc(report.summary())}</p>'
            f'<p class="facts">{" · ".join(f for f in facts if f)}</p>'
            f'{_phases(report)}</header>')


def _phases(report: CrashReport) -> str:
    """Where the time went: one stacked bar over the run, and per phase total and mean."""
    totals = report.phase_totals()
    if not totals:
        return ""
    other = report.elapsed - sum(totals.values())
    shares: List[Tuple[str, float]] = list(totals.items())
    if other > 0.005 * report.elapsed:
        shares.append(("other", other))
    whole = sum(seconds for _, seconds in shares) or 1.0
    bar = "".join(f'<span class="ph-{name}" style="flex-grow:{seconds / whole * 1000:.0f}" '
                  f'title="{name} {format_seconds(seconds)}"></span>'
                  for name, seconds in shares if seconds > 0)
    legend = []
    for name, seconds in shares:
        ran = sum(1 for state in report.states if name in state.timings)
        mean = f", {seconds / ran * 1000:.0f} ms per state" if ran else ""
        legend.append(f'<li><i class="ph-{name}"></i><b>{name}</b> '
                      f'{format_seconds(seconds)} ({seconds / whole:.0%}{mean})</li>')
    return (f'<div class="phasebar" role="img" aria-label="time per phase">{bar}</div>'
            f'<ul class="phases">{"".join(legend)}</ul>')


def _legend(chart: _Chart) -> str:
    items = ['<li><svg viewBox="-6 -6 12 12"><circle class="st ok" r="4"/></svg>passed</li>',
             '<li><svg viewBox="-6 -6 12 12"><circle class="st fail" r="5.5"/></svg>failed</li>',
             '<li><svg viewBox="-6 -6 12 12"><path class="st re ok" d="M0 -4L4 0 0 4-4 0Z"/>'
             '</svg>reordered (some unflushed writes dropped)</li>']
    timeline = chart.timeline
    if timeline:
        if timeline.tick_width > 1:
            items.append(f"<li>ticks: at most one per {timeline.tick_width} entries</li>")
        items.append(f"<li>writes: bytes per {timeline.bin_width} "
                     f"{'entry' if timeline.bin_width == 1 else 'entries'}, log scale</li>")
    return f'<ul class="legend">{"".join(items)}</ul>'


def _failures(report: CrashReport) -> str:
    failures = report.failures
    if not report.states:
        return '<section id="failures"><h2>No crash state was checked</h2></section>'
    if not failures:
        return (f'<section id="failures"><h2>No failures</h2><p>All {len(report.states)} '
                f'states mounted and passed the check.</p></section>')
    out = [f'<section id="failures"><h2>{len(failures)} failed '
           f'{"state" if len(failures) == 1 else "states"}</h2>']
    for state in failures:
        kind = ' <span class="tag">reorder</span>' if state.kind == "reorder" else ""
        timings = " · ".join(f"{phase} {seconds * 1000:.0f} ms"
                             for phase, seconds in state.timings.items())
        out.append(f'<article class="failure" id="state-{state.index}">'
                   f'<h3><a href="#state-{state.index}">state {state.index}</a>{kind} at '
                   f'{_esc(state.where())}</h3><pre class="error">{_esc(state.error or "")}</pre>')
        if timings:
            out.append(f'<p class="timings">{timings}</p>')
        lines = state.kernel_log
        if lines:
            noun = "line" if len(lines) == 1 else "lines"
            out.append(f'<details><summary>kernel log ({len(lines)} {noun})</summary>'
                       f'<pre class="kernel">{_esc(chr(10).join(_kernel_tail(lines)))}</pre>'
                       f'</details>')
        else:
            out.append('<p class="quiet">the kernel said nothing during this state</p>')
        out.append("</article>")
    out.append("</section>")
    return "".join(out)


def render_html(report: CrashReport) -> str:
    """The whole page as a string."""
    chart = _Chart(report)
    failed = len(report.failures)
    title = f"crash report: {report.log_path} ({failed} failed)" if failed else \
        f"crash report: {report.log_path} (passed)"
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        _header(report, chart),
        '<section id="timeline"><div id="toolbar" class="toolbar" hidden>',
        '<button type="button" data-act="initial">checked range</button>',
        '<button type="button" data-act="all">whole log</button>',
        '<button type="button" data-act="out">zoom out</button>',
        '<button type="button" data-act="prevfail">\u25c0 failure</button>',
        '<button type="button" data-act="nextfail">failure \u25b6</button>',
        '<span class="hint">hover: show a state \u00b7 click: pin \u00b7 drag: zoom \u00b7 '
        '\u2190 \u2192: step \u00b7 n p: failures \u00b7 Esc: unpin</span></div>',
        chart.svg(),
        _legend(chart),
        '<div id="panel" class="panel" hidden></div>',
        "</section>",
        _failures(report),
        '<footer>made by dmflakey-ioctl \u00b7 the full data: <code>report.write_json()</code> '
        "</footer>",
        f'<script type="application/json" id="report-data">{_json_for_script(chart.script_data())}'
        "</script>",
        f"<script>{_JS}</script></body></html>\n",
    ])


_CSS = """
:root{--bg:#fff;--fg:#1d2330;--muted:#667085;--line:#d0d5dd;--panel:#f6f7f9;--ok:#1a9850;
--fail:#d7301f;--writes:#8fa9cf;--flush:#3b4252;--fua:#8e44ad;--discard:#e08214;--mark:#475467;
--replay:#5b7bd5;--snapshot:#9a6bd6;--fsck:#d6936b;--mount:#2fa39a;--check:#d6b93c;
--umount:#98a2b3;--other:#e4e7ec}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--fg:#e6e8eb;--muted:#98a2b3;
--line:#344054;--panel:#1d2229;--flush:#c0c6d0;--fua:#c39be0;--mark:#b0b8c4;--writes:#4f6d99;
--other:#344054}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1280px;padding:20px 24px 40px;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;
font-size:12.5px}
h1{font-size:22px;margin:0 0 6px;font-weight:600}
h1 .title{color:var(--muted);font-weight:400}
.verdict{padding:2px 10px;border-radius:6px;color:#fff}
.verdict.ok{background:var(--ok)}.verdict.fail{background:var(--fail)}
.verdict.none{background:var(--muted)}
.summary{margin:4px 0;font-size:15px}.facts{margin:0 0 10px;color:var(--muted)}
.phasebar{display:flex;height:14px;border-radius:4px;overflow:hidden;background:var(--other)}
.phasebar span{min-width:1px}
ul.phases,ul.legend{list-style:none;padding:0;margin:6px 0 14px;display:flex;flex-wrap:wrap;
gap:4px 18px;color:var(--muted)}
ul.phases b{color:var(--fg);font-weight:600}
ul.phases i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.ph-replay{background:var(--replay)}.ph-snapshot{background:var(--snapshot)}
.ph-fsck{background:var(--fsck)}.ph-mount{background:var(--mount)}
.ph-check{background:var(--check)}.ph-umount{background:var(--umount)}
.ph-other{background:var(--other)}
.toolbar{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:8px 0}
.toolbar[hidden]{display:none}
.toolbar button{font:inherit;font-size:12.5px;padding:2px 10px;border:1px solid var(--line);
border-radius:5px;background:var(--panel);color:var(--fg);cursor:pointer}
.toolbar button:hover{border-color:var(--muted)}
.hint{color:var(--muted);font-size:12px;margin-left:6px}
#chart{width:100%;height:auto;display:block;user-select:none;font-size:11px}
#chart .bg{fill:var(--panel)}
#chart .lanes text{text-anchor:end;fill:var(--muted)}
#chart .writes{fill:var(--writes)}
#chart .tick{stroke-width:1;vector-effect:non-scaling-stroke;fill:none}
#chart .tick.flush{stroke:var(--flush)}#chart .tick.fua{stroke:var(--fua)}
#chart .tick.discard{stroke:var(--discard)}
#chart .markline{stroke:var(--mark);stroke-width:1;stroke-dasharray:2 3;opacity:.55;
vector-effect:non-scaling-stroke;fill:none}
#chart .mk path{fill:var(--mark);stroke:var(--mark);stroke-width:1}
#chart .mk text{fill:var(--fg);paint-order:stroke;stroke:var(--panel);stroke-width:3px;
stroke-linejoin:round}
#chart .mk.nolabel text,#chart .mk.nolabel .flag,#chart .off{display:none}
#chart .mk.row2 text,#chart .mk.row2 .flag{transform:translateY(13px)}
#chart #axis line{stroke:var(--line)}#chart #axis text{text-anchor:middle;fill:var(--muted)}
.st.fail{stroke:var(--bg);stroke-width:1}
.st.ok{fill:var(--ok)}.st.fail{fill:var(--fail)}
.st.re.ok{fill:var(--ok);opacity:.8}
#chart .st{cursor:pointer}
#chart .st.sel{stroke:var(--fg);stroke-width:2}
#chart .cursor{stroke:var(--fg);stroke-width:1;opacity:.5}
#chart .brush{fill:var(--writes);opacity:.3}
ul.legend li{display:flex;align-items:center;gap:4px}
ul.legend svg{width:14px;height:14px}
.panel{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 14px;
margin:4px 0 18px;min-height:80px}
.panel[hidden]{display:none}
.panel h3{margin:0 0 6px;font-size:15px}
.panel h3 .ok{color:var(--ok)}.panel h3 .fail{color:var(--fail)}
.panel .pin{float:right;color:var(--muted);font-size:12px;font-weight:400}
.panel dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0 0 8px}
.panel dt{color:var(--muted)}.panel dd{margin:0}
.tbar{display:inline-block;height:9px;margin-right:5px;vertical-align:middle;border-radius:2px}
.timing{display:inline-block;margin-right:16px;white-space:nowrap}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0 8px;padding:8px 10px;
border-radius:6px;background:var(--panel);border:1px solid var(--line);max-height:360px;
overflow:auto}
pre.error{border-left:4px solid var(--fail)}
.panel pre{background:var(--bg)}
.tag{font-size:12px;padding:1px 7px;border-radius:9px;background:var(--other);color:var(--fg);
margin-left:6px;font-weight:400}
h2{font-size:17px;margin:24px 0 8px}
.failure{border-top:1px solid var(--line);padding:8px 0}
.failure h3{font-size:14px;margin:4px 0;font-weight:500}
.failure h3 a{color:var(--fail);font-weight:600;text-decoration:none}
.failure:target{background:var(--panel)}
.timings,.quiet{color:var(--muted);margin:2px 0;font-size:12.5px}
summary{cursor:pointer;color:var(--muted)}
footer{margin-top:30px;color:var(--muted);font-size:12px}
"""

_JS = r"""
(function () {
"use strict";
var D = JSON.parse(document.getElementById("report-data").textContent);
var chart = document.getElementById("chart"), plot = document.getElementById("plot");
var panel = document.getElementById("panel"), cursor = document.getElementById("cursor");
var brush = document.getElementById("brush");
var S = D.states, view = D.view.slice(), pinned = -1, shown = -1, drag = null;
var SVGNS = chart.namespaceURI;
var markers = {};
Array.prototype.forEach.call(chart.querySelectorAll("#states .st"), function (el) {
  markers[el.getAttribute("data-i")] = el;
});
var byEntry = S.map(function (s, i) { return i; }).sort(function (a, b) {
  return S[a][1] - S[b][1] || S[a][2] - S[b][2] || a - b;
});
var rank = {};
byEntry.forEach(function (i, r) { rank[i] = r; });

function px(e) { return D.gutter + (e + 0.5 - view[0]) / (view[1] - view[0]) * D.width; }
function inPlot(x) { return x >= D.gutter - 0.5 && x <= D.gutter + D.width + 0.5; }
function point(ev) {
  var p = chart.createSVGPoint(); p.x = ev.clientX; p.y = ev.clientY;
  return p.matrixTransform(chart.getScreenCTM().inverse());
}
function count(v) {
  if (v < 1e4) return String(+v.toFixed(0));
  if (v < 1e6) return +(v / 1e3).toPrecision(4) + "k";
  return +(v / 1e6).toPrecision(4) + "M";
}

function setView(a, b) {
  var n = D.n, span = Math.min(Math.max(b - a, Math.min(20, n)), n);
  a = Math.max(0, Math.min(a, n - span));
  view = [a, a + span];
  plot.setAttribute("viewBox", a + " 0 " + span + " " + plot.getAttribute("height"));
  layout();
}

function layout() {
  Object.keys(markers).forEach(function (i) {
    var el = markers[i], s = S[i], x = px(s[1]);
    el.classList.toggle("off", !inPlot(x));
    if (s[2]) {
      var row = Math.min(s[9], D.reorderRows - 1);
      el.setAttribute("transform", "translate(" + x.toFixed(1) + " " +
                      (D.reorderY + row * D.reorderRow + D.reorderRow / 2) + ")");
    } else {
      el.setAttribute("cx", x.toFixed(1));
    }
  });
  var rights = [-1e9, -1e9];  // the same two-row rule as the page was drawn with
  Array.prototype.forEach.call(chart.querySelectorAll("#marks .mk"), function (g) {
    var x = px(+g.getAttribute("data-e")), on = inPlot(x), row = -1;
    g.classList.toggle("off", !on);
    g.setAttribute("transform", "translate(" + x.toFixed(1) + ")");
    if (on) row = x >= rights[0] + 4 ? 0 : (x >= rights[1] + 4 ? 1 : -1);
    if (row >= 0) rights[row] = x + (+g.getAttribute("data-w"));
    g.classList.toggle("row2", row === 1);
    g.classList.toggle("nolabel", on && row < 0);
  });
  axis();
  if (shown >= 0) mark(shown);
}

function axis() {
  var g = document.getElementById("axis"), span = view[1] - view[0];
  while (g.childNodes.length > 1) g.removeChild(g.lastChild);
  var raw = Math.max(span / 10, 1), pow = Math.pow(10, Math.floor(Math.log10(raw)));
  var step = 10 * pow;
  [1, 2, 5].some(function (f) { if (f * pow >= raw) { step = f * pow; return true; } });
  for (var v = Math.ceil(view[0] / step) * step; v <= view[1]; v += step) {
    var x = (D.gutter + (v - view[0]) / span * D.width).toFixed(1);
    var tick = document.createElementNS(SVGNS, "line");
    tick.setAttribute("x1", x); tick.setAttribute("x2", x);
    tick.setAttribute("y1", D.axisY); tick.setAttribute("y2", D.axisY + 4);
    var text = document.createElementNS(SVGNS, "text");
    text.setAttribute("x", x); text.setAttribute("y", D.axisY + 15);
    text.textContent = count(v);
    g.appendChild(tick); g.appendChild(text);
  }
}

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function mark(i) {
  if (shown >= 0 && markers[shown]) markers[shown].classList.remove("sel");
  shown = i;
  var m = markers[i], x = px(S[i][1]);
  m.classList.add("sel");
  cursor.setAttribute("x1", x); cursor.setAttribute("x2", x);
  cursor.setAttribute("visibility", inPlot(x) ? "visible" : "hidden");
}

function show(i) {
  var s = S[i];
  mark(i);
  while (panel.firstChild) panel.removeChild(panel.firstChild);
  var h = el("h3");
  h.appendChild(el("span", s[3] ? "ok" : "fail", (s[3] ? "passed" : "FAILED") + ": "));
  h.appendChild(document.createTextNode("state " + s[0] + (s[2] ? " (reordered)" : "")));
  h.appendChild(el("span", "pin", pinned === i ? "pinned \u00b7 Esc or click to release"
                                                : "click to pin"));
  panel.appendChild(h);
  var dl = el("dl");
  function row(k, v) { dl.appendChild(el("dt", "", k)); var d = el("dd"); 
    if (typeof v === "string") d.textContent = v; else d.appendChild(v); dl.appendChild(d); }
  row("entry", s[1] + " of " + D.n + " (every write up to it persisted" +
      (s[2] ? ", minus the dropped ones)" : ")"));
  row("last mark", s[4] === null ? "none before this entry" : JSON.stringify(s[4]));
  if (s[2]) {
    var dropped = s[7].slice(0, 60).join(", ");
    if (s[7].length > 60) dropped += ", \u2026 (" + s[7].length + " in all)";
    row("dropped writes", s[7].length ? "entries " + dropped : "none");
  }
  var times = el("div"), total = 0;
  s[8].forEach(function (t) { if (t !== null) total += t; });
  s[8].forEach(function (t, k) {
    if (t === null) return;
    var bar = el("span", "tbar ph-" + D.phases[k]);
    bar.style.width = Math.max(2, Math.round(160 * t / (total || 1))) + "px";
    var line = el("span", "timing"); line.appendChild(bar);
    line.appendChild(document.createTextNode(D.phases[k] + " " + (t * 1000).toFixed(0) + " ms"));
    times.appendChild(line);
  });
  row("time", times.childNodes.length ? times : "not recorded");
  panel.appendChild(dl);
  if (s[5] !== null) panel.appendChild(el("pre", "error", s[5]));
  panel.appendChild(el("div", "quiet", s[6].length ? "kernel log (" + s[6].length + " lines):"
                                                   : "the kernel said nothing during this state"));
  if (s[6].length) {
    panel.appendChild(el("pre", "kernel", s[6].map(function (n) { return D.lines[n]; })
                                               .join("\n")));
  }
  if (!s[3]) {
    var a = el("a", "", "in the list of failures \u2193");
    a.href = "#state-" + s[0];
    panel.appendChild(a);
  }
}

function nearest(p) {
  var lane = D.hasReorder && p.y >= D.reorderY - 2 ? 1 : (p.y >= D.statesY - 14 ? 0 : -1);
  var best = -1, bestD = 14;
  for (var i = 0; i < S.length; i++) {
    if (lane >= 0 && (S[i][2] ? 1 : 0) !== lane) continue;
    var d = Math.abs(px(S[i][1]) - p.x) - (S[i][3] ? 0 : 2.5);  // failures win near ties
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}

function select(i) {
  if (i < 0) return;
  pinned = i;
  var x = px(S[i][1]);
  if (!inPlot(x)) {
    var span = view[1] - view[0];
    setView(S[i][1] - span / 2, S[i][1] + span / 2);
  }
  show(i);
}

function step(dir, failuresOnly) {
  var r = shown >= 0 ? rank[shown] : (dir > 0 ? -1 : byEntry.length);
  for (r += dir; r >= 0 && r < byEntry.length; r += dir) {
    if (!failuresOnly || !S[byEntry[r]][3]) return select(byEntry[r]);
  }
}

chart.addEventListener("mousedown", function (ev) {
  var p = point(ev);
  if (ev.button !== 0 || !inPlot(p.x)) return;
  drag = {x: p.x};
  ev.preventDefault();
});
window.addEventListener("mousemove", function (ev) {
  if (!drag) return;
  var p = point(ev);
  var a = Math.max(D.gutter, Math.min(drag.x, p.x));
  var b = Math.min(D.gutter + D.width, Math.max(drag.x, p.x));
  brush.setAttribute("x", a); brush.setAttribute("width", b - a);
  brush.setAttribute("visibility", b - a > 4 ? "visible" : "hidden");
});
chart.addEventListener("mousemove", function (ev) {
  if (drag || pinned >= 0) return;
  var i = nearest(point(ev));
  if (i >= 0 && i !== shown) show(i);
});
window.addEventListener("mouseup", function (ev) {
  if (!drag) return;
  var p = point(ev), x0 = drag.x;
  drag = null;
  brush.setAttribute("visibility", "hidden");
  if (Math.abs(p.x - x0) > 4) {
    var span = view[1] - view[0];
    var e = function (x) { return view[0] + (x - D.gutter) / D.width * span; };
    setView(e(Math.min(x0, p.x)), e(Math.max(x0, p.x)));
  } else {
    var i = nearest(p);
    if (i >= 0 && i !== pinned) select(i);
    else if (pinned >= 0) { pinned = -1; if (shown >= 0) show(shown); }
  }
});
chart.addEventListener("dblclick", function () { setView(D.initial[0], D.initial[1]); });
document.getElementById("toolbar").addEventListener("click", function (ev) {
  var act = ev.target.getAttribute && ev.target.getAttribute("data-act"), span = view[1] - view[0];
  if (act === "initial") setView(D.initial[0], D.initial[1]);
  else if (act === "all") setView(0, D.n);
  else if (act === "out") setView(view[0] - span / 2, view[1] + span / 2);
  else if (act === "nextfail") step(1, true);
  else if (act === "prevfail") step(-1, true);
});
document.addEventListener("keydown", function (ev) {
  if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
  var k = ev.key;
  if (k === "ArrowRight") step(1, false);
  else if (k === "ArrowLeft") step(-1, false);
  else if (k === "n") step(1, true);
  else if (k === "p") step(-1, true);
  else if (k === "Escape" && pinned >= 0) { pinned = -1; show(shown); }
  else return;
  ev.preventDefault();
});

document.getElementById("toolbar").hidden = false;
panel.hidden = false;
panel.appendChild(el("div", "quiet", S.length ?
  "Hover over a marker to see its state; click to pin it." : "No state was checked."));
var first = byEntry.filter(function (i) { return !S[i][3]; })[0];
if (first !== undefined) show(first);
})();
"""
