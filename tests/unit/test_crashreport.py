"""The crash report without a kernel: the data model, its summary, JSON, and the HTML page."""

from __future__ import annotations

import json
import re
import time
from collections import namedtuple
from html.parser import HTMLParser

import pytest

from dmflakey_ioctl.crashreport import (PHASES, CrashReport, CrashState, Timeline, clean_text,
                                        describe_exception, describe_fsck)
from dmflakey_ioctl.errors import InvalidArgumentError

Entry = namedtuple("Entry", "flags size label")  # what Timeline.from_entries reads of a LogEntry
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
EVIL = "<script>alert(1)</script> & \"quoted\" 'single'"
VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "param",
        "source", "track", "wbr"}


def passed(index, entry, label="mkfs", **kw):
    kw.setdefault("timings", {"replay": 0.01, "snapshot": 0.02, "mount": 0.1, "check": 0.005,
                              "umount": 0.03})
    return CrashState(index, entry, label, True, **kw)


def failed(index, entry, error="AssertionError: file is empty", label="mkfs", **kw):
    kw.setdefault("timings", {"replay": 0.01, "mount": 0.1, "check": 0.005})
    return CrashState(index, entry, label, False, error, **kw)


def small_timeline():
    entries = [Entry(0, 4096, None)] * 3 + [
        Entry(MARK, 0, "mkfs"), Entry(0, 1024, None), Entry(FLUSH, 0, None),
        Entry(FUA | METADATA, 2048, None), Entry(DISCARD, 1 << 20, None), Entry(MARK, 0, EVIL),
        Entry(FLUSH | FUA, 512, None)]
    return Timeline.from_entries(len(entries), iter(entries), max_bins=4)


def sample_report():
    states = [passed(0, 5), failed(1, 6, error=f"AssertionError: lost {EVIL}",
                                   kernel_log=("EXT4-fs (dm-3): recovery complete",
                                               f"EXT4-fs error: {EVIL}")),
              CrashState(2, 6, "mkfs", True, kind="reorder", dropped=[4]),
              CrashState(3, 9, EVIL, False, "DMFlakeyError: mount: [EUCLEAN]", kind="reorder",
                         dropped=(4, 6), kernel_log=["EXT4-fs (dm-4): bad geometry"]),
              passed(4, 9, label=EVIL)]
    return CrashReport("/tmp/x/wal.log", "flush", states, 2.0, small_timeline(),
                       {"after": EVIL, "reorder": 1, "seed": 7, "fsck": ("e2fsck", "-fn"),
                        "mount_options": ""})


# --- the data model ---------------------------------------------------------------------------

def test_timeline_bins_ticks_and_marks_in_one_pass():
    timeline = small_timeline()
    assert timeline.entries == 10 and timeline.bin_width == 3      # 10 entries in at most 4 bins
    assert timeline.write_bins == [3 * 4096, 1024, 2048, 512]  # marks, discards write nothing
    assert timeline.flushes == [5, 9] and timeline.fuas == [6, 9] and timeline.discards == [7]
    assert timeline.marks == [(3, "mkfs"), (8, EVIL)]
    assert timeline.tick_width == 1


def test_timeline_of_a_million_entries_stays_small():
    n = 1_000_000
    entries = (Entry(FLUSH if i % 3 == 0 else 0, 4096, None) for i in range(n))
    started = time.monotonic()
    timeline = Timeline.from_entries(n, entries)
    seconds = time.monotonic() - started
    assert len(timeline.write_bins) <= 600 and sum(timeline.write_bins) == n * 4096
    assert len(timeline.flushes) <= 4096 and timeline.tick_width == 245
    assert timeline.flushes[:2] == [0, 246]           # the first flush in each run of 245 entries
    assert seconds < 10, f"{seconds:.1f} s for a million entries"


@pytest.mark.parametrize("announced, count", [(2, "more than 2"), (1, "more than 1"),
                                              (4, "3"), (6, "3")])
def test_timeline_refuses_a_log_of_another_length(announced, count):
    with pytest.raises(InvalidArgumentError, match=f"the log has {count} entries, not the "
                                                   f"{announced} announced"):
        Timeline.from_entries(announced, [Entry(0, 512, None)] * 3, max_bins=2)


@pytest.mark.parametrize("kwargs, cause", [
    (dict(kind="torn"), "kind 'torn'"),
    (dict(dropped=(3,)), "point state drops no writes"),
    (dict(ok=True, error="x"), "passed has no error"),
    (dict(ok=False), "needs an error"),
    (dict(timings={"fsync": 1.0}), "unknown timing phase fsync"),
])
def test_state_refuses_what_cannot_be(kwargs, cause):
    args = dict(index=7, entry=1, label_before=None, ok=True)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=cause) as info:
        CrashState(**args)
    assert "state 7" in str(info.value)


def test_state_normalises_its_text_and_sequences():
    state = CrashState(0, 3, b"bad\xff".decode("utf-8", "surrogateescape"), False,
                       "\udcfe error", [b"kernel \xfe line", "ok line"], "reorder", [1, 2],
                       {"umount": 1, "replay": 2})
    assert state.label_before == "bad\ufffd" and state.error == "\ufffd error"
    assert state.kernel_log == ("kernel \ufffd line", "ok line") and state.dropped == (1, 2)
    assert list(state.timings) == ["replay", "umount"]        # in phase order
    assert hash(state) == hash(CrashState(**state.to_dict()))  # usable in sets, timings aside
    json.dumps(state.to_dict(), ensure_ascii=False).encode("utf-8")  # never a UnicodeEncodeError


def test_clean_text():
    assert clean_text(b"\xc3\xa9\xff") == "\u00e9\ufffd"
    assert clean_text("plain") == "plain"


def test_describe_exception_names_type_message_and_the_failing_line():
    def check():
        data = b""
        assert data == b"new"
    with pytest.raises(AssertionError) as info:
        check()
    text = describe_exception(info.value)
    assert text.startswith("AssertionError")
    assert "test_crashreport.py" in text and "in check" in text
    bare = AssertionError()
    assert describe_exception(bare) == "AssertionError"
    assert describe_exception(OSError(117, "Structure needs cleaning")) == \
        "OSError: [Errno 117] Structure needs cleaning (EUCLEAN)"
    named = InvalidArgumentError("mount", "/dev/x", "refused", 22)
    assert describe_exception(named) == \
        "InvalidArgumentError: mount /dev/x: refused [EINVAL: Invalid argument]"


def test_describe_fsck_keeps_the_tail():
    output = "".join(f"line {i}\n" for i in range(50)).encode() + b"bad \xff\n"
    text = describe_fsck(["e2fsck", "-fn", "/dev/mapper/x"], 4, output, tail=3)
    assert text.splitlines() == [
        "fsck failed: e2fsck -fn /dev/mapper/x exited with status 4 (last 3 of 51 lines)",
        "line 48", "line 49", "bad \ufffd"]


# --- summary and failure text ------------------------------------------------------------------

def test_summary_all_passed():
    report = CrashReport("/tmp/x/wal.log", "flush", [passed(i, 10 + i) for i in range(212)], 41.2)
    assert report.ok and report.failures == []
    assert report.summary() == \
        "explored 212 crash states of wal.log at flush points: all passed; 41.2 s, 5.1 states/s"


def test_summary_with_failures_and_reorder_states():
    report = sample_report()
    assert not report.ok and [s.index for s in report.failures] == [1, 3]
    assert report.summary() == (
        "explored 5 crash states of wal.log (3 at flush points, 2 reordered): 2 FAILED, the first "
        "at entry 6 after mark 'mkfs'; 2.0 s, 2.5 states/s")


@pytest.mark.parametrize("points, words", [(10, "every 10th entry"), (1, "every entry"),
                                           (22, "every 22nd entry"), (12, "every 12th entry"),
                                           ("fua", "FUA points"), ("list", "listed entries"),
                                           ("mark", "marks"), ("entry", "every entry")])
def test_summary_names_the_points_mode(points, words):
    report = CrashReport("wal.log", points, [failed(0, 3, label=None)], 190.0)
    assert report.summary() == (f"explored 1 crash state of wal.log at {words}: 1 FAILED, the "
                                f"first at entry 3 before any mark; 3 min 10 s, 190.0 s per state")


def test_summary_when_nothing_was_checked():
    report = CrashReport("/dev/loop3", "mark")
    assert report.ok
    assert report.summary() == "explored 0 crash states of loop3 at marks: none to check; 0.0 s"


@pytest.mark.parametrize("points", ["flushes", 0, -1, True, 2.5])
def test_report_refuses_an_unknown_points_mode(points):
    with pytest.raises(InvalidArgumentError, match="points"):
        CrashReport("wal.log", points)


def test_describe_failures():
    report = sample_report()
    assert report.describe_failures() == "\n".join([
        "state 1 at entry 6, after mark 'mkfs':",
        f"    AssertionError: lost {EVIL}",
        "    kernel: EXT4-fs (dm-3): recovery complete",
        f"    kernel: EXT4-fs error: {EVIL}",
        f"state 3 at entry 9 with 2 unflushed writes dropped (4, 6), after mark {EVIL!r}:",
        "    DMFlakeyError: mount: [EUCLEAN]",
        "    kernel: EXT4-fs (dm-4): bad geometry",
        "rebuild a state: dmflakey replay /tmp/x/wal.log --until ENTRY --to IMAGE"])


def test_describe_failures_limits_states_and_lines():
    long_error = "\n".join(f"error line {i}" for i in range(20))
    states = [failed(i, i, error=long_error, kernel_log=[f"k{j}" for j in range(9)])
              for i in range(7)]
    text = CrashReport("wal.log", 5, states).describe_failures(limit=2, kernel_lines=2,
                                                               error_lines=4)
    assert text.splitlines() == [
        "state 0 at entry 0, after mark 'mkfs':", "    error line 0", "    error line 1",
        "    error line 2", "    ... (17 more lines)", "    kernel: k7", "    kernel: k8",
        "state 1 at entry 1, after mark 'mkfs':", "    error line 0", "    error line 1",
        "    error line 2", "    ... (17 more lines)", "    kernel: k7", "    kernel: k8",
        "... and 5 more failed states",
        "rebuild a state: dmflakey replay wal.log --until ENTRY --to IMAGE"]
    assert CrashReport("wal.log", 5, [passed(0, 1)]).describe_failures() == ""


def test_phase_totals():
    report = sample_report()
    totals = report.phase_totals()
    assert list(totals) == ["replay", "snapshot", "mount", "check", "umount"]  # no fsck ran
    assert totals["mount"] == pytest.approx(0.3) and totals["snapshot"] == pytest.approx(0.04)


# --- JSON --------------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    report = sample_report()
    report.states.append(CrashState(5, 9, None, False, "bad \udcff byte", (b"\xff",), "point", (),
                                    {p: 0.5 for p in PHASES}))
    path = tmp_path / "report.json"
    report.write_json(path)
    again = CrashReport.read_json(path)
    assert again == report
    assert again.settings["fsck"] == ["e2fsck", "-fn"] and again.settings["after"] == EVIL
    assert again.summary() == report.summary()
    assert again.states[5].error == "bad \ufffd byte"
    assert json.loads(path.read_text(encoding="utf-8"))["summary"] == report.summary()
    assert CrashReport.from_dict(json.loads(report.to_json())) == report
    no_timeline = CrashReport("wal.log", 3, [passed(0, 1)], 1.5)
    assert CrashReport.from_dict(no_timeline.to_dict()) == no_timeline


@pytest.mark.parametrize("change, cause", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(format="other"), "not a dmflakey-crash-report"),
    (lambda d: d.pop("states"), "malformed report: KeyError"),
    (lambda d: d["states"][0].update(kind="torn"), "kind 'torn'"),
    (lambda d: d["states"][0].update(colour="red"), "malformed report: TypeError"),
])
def test_from_dict_refuses_what_it_cannot_read(change, cause):
    data = sample_report().to_dict()
    change(data)
    with pytest.raises(InvalidArgumentError, match=cause):
        CrashReport.from_dict(data)


# --- HTML --------------------------------------------------------------------------------------

class PageChecker(HTMLParser):
    """Every element closed in order, and what the tests look for collected on the way."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.markers, self.scripts, self.urls = [], [], [], [], []
        self.text, self.data = [], {}
        self.in_script = None

    def handle_starttag(self, tag, attrs):
        self._element(tag, dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._element(tag, dict(attrs))

    def _element(self, tag, attrs):
        classes = (attrs.get("class") or "").split()
        if "st" in classes and "data-i" in attrs:
            self.markers.append((tag, int(attrs["data-i"]), set(classes)))
        if tag == "script":
            self.scripts.append(attrs)
            self.in_script = attrs.get("id", "")
            self.data[self.in_script] = ""
        for name in ("src", "href", "xlink:href", "action"):
            if name in attrs:
                self.urls.append(attrs[name])

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "script":
            self.in_script = None

    def handle_data(self, data):
        if self.in_script is not None:
            self.data[self.in_script] += data
        else:
            self.text.append(data)


def check_page(path):
    page = path.read_text(encoding="utf-8")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    return page, checker


def test_html_page_is_well_formed_with_a_marker_per_state(tmp_path):
    report = sample_report()
    path = tmp_path / "report.html"
    report.write_html(path)
    page, checker = check_page(path)
    by_position = {position: (tag, classes) for tag, position, classes in checker.markers}
    assert len(checker.markers) == len(by_position) == len(report.states)
    for position, state in enumerate(report.states):
        tag, classes = by_position[position]
        assert ("ok" in classes) == state.ok and ("fail" in classes) == (not state.ok)
        assert tag == ("circle" if state.kind == "point" else "path")
        assert ("re" in classes) == (state.kind == "reorder")
    # the failures are in the page as plain HTML, kernel log folded
    text = "".join(checker.text)
    assert "2 failed states" in text and report.summary() in text
    assert f"AssertionError: lost {EVIL}" in text and "EXT4-fs (dm-4): bad geometry" in text
    assert page.count('<article class="failure"') == 2 and page.count("<details>") == 2
    settings = f"after: {EVIL} · reorder: 1 · seed: 7 · fsck: e2fsck -fn · mount_options: ''"
    assert settings in text


def test_html_escapes_everything_from_outside(tmp_path):
    report = sample_report()
    report.states.append(failed(5, 9, error="ctrl \x00\x1b[31m red", label=EVIL,
                                kernel_log=["</script><script>alert(2)</script>"]))
    path = tmp_path / "report.html"
    report.write_html(path)
    page, checker = check_page(path)
    assert "<script>alert" not in page and "</script><script>alert" not in page
    assert [attrs.get("id") for attrs in checker.scripts] == ["report-data", None]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x00" not in page and "\x1b" not in page
    # the script's data reads back to the exact text, escapes and all
    data = json.loads(checker.data["report-data"])
    assert [s[4] for s in data["states"]][-2:] == [EVIL, EVIL]
    kernel_lines = [[data["lines"][n] for n in state[6]] for state in data["states"]]
    assert kernel_lines[-1] == ["</script><script>alert(2)</script>"]
    assert kernel_lines[1] == list(report.states[1].kernel_log)
    assert data["states"][1][5] == f"AssertionError: lost {EVIL}"


def test_html_fetches_nothing_from_outside(tmp_path):
    path = tmp_path / "report.html"
    sample_report().write_html(path)
    page, checker = check_page(path)
    assert all(url.startswith("#") for url in checker.urls), checker.urls
    assert not re.search(r"https?:|@import|url\(|<link|<img|<iframe", page)
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", page)


def test_html_of_an_empty_report(tmp_path):
    path = tmp_path / "empty.html"
    CrashReport("wal.log", "flush").write_html(path)
    page, checker = check_page(path)
    assert checker.markers == [] and "No crash state was checked" in page


def test_html_stays_light_for_a_big_run(tmp_path):
    """2000 states (a tenth of them failed, 500 reordered) over a log of a million entries."""
    n = 1_000_000
    entries = (Entry(FLUSH if i % 7 == 0 else (MARK if i % 50_000 == 0 else 0),
                     4096 * (1 + i % 5), f"step-{i}" if i % 50_000 == 0 else None)
               for i in range(n))
    timeline = Timeline.from_entries(n, entries)
    kernel = ("EXT4-fs (dm-9): recovery complete",
              "EXT4-fs (dm-9): mounted filesystem 3f2a7c1e-aa01 r/w with ordered data mode.")
    states = []
    for i in range(2000):
        entry = 100_000 + i * 450
        if i % 4 == 3:
            states.append(CrashState(i, entry, "step", i % 40 != 3, None if i % 40 != 3 else
                                     "DMFlakeyError: mount: [EUCLEAN]", kernel, "reorder",
                                     (entry - 3, entry - 1), {p: 0.01 for p in PHASES}))
        elif i % 10 == 0:
            states.append(failed(i, entry, error="AssertionError: lost it\n" + "x" * 300,
                                 kernel_log=kernel * 10))
        else:
            states.append(passed(i, entry, kernel_log=kernel))
    report = CrashReport("big.log", "flush", states, 900.0, timeline)
    path = tmp_path / "big.html"
    report.write_html(path)
    size = path.stat().st_size
    page, checker = check_page(path)
    assert len(checker.markers) == 2000
    assert size < 2_500_000, f"{size} bytes"


def test_html_mark_labels_take_two_rows_then_give_way(tmp_path):
    marks = [Entry(MARK, 0, name) for name in ("first-label", "second-label", "third-label")]
    timeline = Timeline.from_entries(1000, marks + [Entry(0, 512, None)] * 997)
    path = tmp_path / "marks.html"
    CrashReport("wal.log", "mark", [passed(0, 5)], 1.0, timeline).write_html(path)
    page, _ = check_page(path)
    classes = re.findall(r'<g class="(mk[^"]*)" data-e="(\d)"', page)
    assert classes == [("mk", "0"), ("mk row2", "1"), ("mk nolabel", "2")]
    assert all(f"mark {name!r} at entry" in page.replace("&#x27;", "'")
               for name in ("first-label", "second-label", "third-label"))


def test_html_opens_on_the_checked_part_of_a_long_log(tmp_path):
    timeline = Timeline.from_entries(1000, [Entry(MARK, 0, "mkfs")] + [Entry(0, 512, None)] * 999)
    path = tmp_path / "view.html"
    report = CrashReport("wal.log", "flush", [passed(0, 800), failed(1, 900)], 1.0, timeline)
    report.write_html(path)
    page, checker = check_page(path)
    start, width = map(float, re.search(r'<svg id="plot"[^>]* viewBox="([\d.]+) 0 ([\d.]+)',
                                        page).groups())
    assert start == 790 and start + width == 1000          # 5% of the checked span before it
    assert '<g class="mk off" data-e="0"' in page            # the mkfs mark is out of view
    assert json.loads(checker.data["report-data"])["view"] == [790, 1000]


def test_html_shows_the_tail_of_a_long_kernel_log(tmp_path):
    kernel = [f"kernel line {i}" for i in range(1000)]
    path = tmp_path / "long.html"
    CrashReport("wal.log", "flush", [failed(0, 3, kernel_log=kernel)]).write_html(path)
    page, checker = check_page(path)
    assert "[... 700 earlier lines in the JSON report]\nkernel line 700\n" in page
    assert "kernel line 699\n" not in page and "kernel line 999</pre>" in page
    data = json.loads(checker.data["report-data"])
    assert [data["lines"][n] for n in data["states"][0][6]][:2] == [
        "[... 700 earlier lines in the JSON report]", "kernel line 700"]
