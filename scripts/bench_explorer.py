#!/usr/bin/env python3
"""Benchmark of the crash-state explorer against the from-scratch method (issue 10), in the guest.

    scripts/vm --memory 3072 -- python3 scripts/bench_explorer.py [--out FILE] [--rounds N]
        [--points N] [--sample N] [--big-mib N] [--small-mib N] [--device-mib N]
        [--checkpoint-every N]

Needs root and device-mapper (run it inside ``scripts/vm``).  Two ext4
workloads are recorded once, each on a device of ``--device-mib`` (default
128): files of 1 MiB written to a temp name, fsynced and renamed over one of
4 slots, until the log holds ``--big-mib`` (256) or ``--small-mib`` (32) MiB.
From the fifth file on, each save also frees the file it replaces: the
states of both logs are then alike (the same files, the same kind of
transactions), whatever the log's length.  Every ``--checkpoint-every`` (4)
files the journal is checkpointed
(EXT4_IOC_CHECKPOINT), so that a state of either log needs about the same
journal recovery at its mount; with 0 the journal fills up in the big log
and each of its states' mounts replays up to the whole journal (4 MiB), a
cost of the filesystem that both methods pay alike and that grows with the
workload's history, not with the log's length.  On each log the same
``--points`` (200) crash points are checked, evenly spaced over the entries
after the workload's first mark; the check lists the root and reads a marker
file.

* explorer: ``explore(log, check, points=...)``, the whole run timed (set-up,
  one forward replay, per state a snapshot table swapped in, mount, check,
  unmount; teardown).
* from scratch, as fstests' generic/482 does it: for each point, entries 0..point
  replayed onto a fresh sparse image (``materialize``, the same replay engine),
  the image on a loop device, then the same mount, check and unmount.  Its cost
  grows linearly with the point's position, so it is timed on ``--sample`` (20)
  points spread evenly over the 200 and scaled: total = mean per sampled point
  x points.  Counted: replay, mount, check, unmount (the loop device's attach
  and the image's removal are left out, in its favour).

Rounds (``--rounds``, default 7) run the three timed ways (explorer on the big
log, explorer on the small log, from scratch on the big log) in an order that
rotates from round to round, so that a slow phase of a shared machine hits
each way alike.  Figures: medians and lower quartiles (q1) over the rounds,
states per second, where a state's time goes (median and q1 over the states
of every round), and two ratios, each gated on its q1 figures:

* whole run, 200 points over the big log: from-scratch estimate / explorer >= 4;
* time per state (run time / states), big log / small log <= 1.3.

Also printed: the explorer's own cost per state (replay share, snapshot swap
and the rest: the run time minus fsck, mount, check and unmount), the part
that would grow with the log if the explorer replayed from scratch.

Prints a table; ``--out`` writes every figure as JSON.  Exit status 1 when a
target is missed, 2 when the machine cannot run it.  Standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from benchrun import machine, rotated, verdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmflakey_ioctl import fs  # noqa: E402
from dmflakey_ioctl.crashreport import PHASES, CrashReport  # noqa: E402
from dmflakey_ioctl.explorer import explore  # noqa: E402
from dmflakey_ioctl.kernel import loop  # noqa: E402
from dmflakey_ioctl.recording import record_writes  # noqa: E402
from dmflakey_ioctl.writelog import WriteLog  # noqa: E402

MiB = 1 << 20
SPEEDUP_TARGET = 4.0        # from-scratch time / explorer time, 200 points over 256 MiB
GROWTH_TARGET = 1.3         # explorer time per state, 256 MiB log / 32 MiB log
SLOTS = 4
EXT4_IOC_CHECKPOINT = 0x4004662B   # _IOW('f', 43, __u32), Linux 5.13
MARKER = b"written first, fsynced: present in every state checked\n"


def quartiles(values: Sequence[float]) -> Dict[str, float]:
    values = list(values)
    q1 = statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) >= 2 else values[0]
    return {"median": statistics.median(values), "q1": q1, "min": min(values),
            "max": max(values), "n": len(values)}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint(mount_point: str) -> None:
    """Write the journal's transactions home and empty it (what a full journal forces anyway)."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_CHECKPOINT, struct.pack("=I", 0))
    finally:
        os.close(fd)


def record(work: Path, name: str, log_mib: int, device_mib: int, checkpoint_every: int
           ) -> Tuple[WriteLog, int]:
    """An ext4 workload recorded until its log holds log_mib MiB; (the log, files written)."""
    directory = work / name
    directory.mkdir()
    payload = bytearray(os.urandom(MiB))
    files = 0
    with record_writes(f"bench-explorer-{os.getpid()}-{name}", str(directory), "ext4",
                       device_mib * MiB, log_size=(log_mib + 64) * MiB) as rec:
        mnt = directory / "mnt"
        mnt.mkdir()
        rec.mount(str(mnt))
        with open(mnt / "marker", "wb") as fh:
            fh.write(MARKER)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(str(mnt))
        rec.mark("setup")
        while rec.status().next_sector * 512 < log_mib * MiB:
            payload[:8] = files.to_bytes(8, "little")
            temp, final = mnt / "slot.tmp", mnt / f"slot-{files % SLOTS}"
            with open(temp, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(temp, final)
            fsync_dir(str(mnt))
            files += 1
            if checkpoint_every and files % checkpoint_every == 0:
                checkpoint(str(mnt))
        log = rec.stop()
    return log, files


def spread(first: int, last: int, count: int) -> List[int]:
    """count entry indexes spread evenly over first..last, last included."""
    if last - first + 1 <= count:
        return list(range(first, last + 1))
    return sorted({first + round((k + 1) * (last - first) / count) for k in range(count)})


def check(mount_point: str) -> None:
    """The same small check for both methods: the root lists, the marker reads back."""
    assert "marker" in os.listdir(mount_point)
    with open(os.path.join(mount_point, "marker"), "rb") as fh:
        assert fh.read() == MARKER


def run_explorer(log: WriteLog, points: List[int]) -> Tuple[float, CrashReport]:
    started = time.perf_counter()
    report = explore(log, check, points=points)
    wall = time.perf_counter() - started
    assert report.ok and len(report.states) == len(points), \
        report.summary() + "\n" + report.describe_failures()
    return wall, report


def from_scratch_one(log: WriteLog, point: int, work: Path) -> Dict[str, float]:
    """One point the generic/482 way: replay 0..point onto a fresh image, mount, check, unmount."""
    image, mnt = work / "scratch.img", work / "scratch-mnt"
    mnt.mkdir(exist_ok=True)
    times: Dict[str, float] = {}
    clock = time.perf_counter()
    log.materialize(point, image)
    times["replay"] = time.perf_counter() - clock
    try:
        with loop.attach(str(image)) as lo:
            clock = time.perf_counter()
            fs.mount(lo.path, str(mnt))
            times["mount"] = time.perf_counter() - clock
            try:
                clock = time.perf_counter()
                check(str(mnt))
                times["check"] = time.perf_counter() - clock
            finally:
                clock = time.perf_counter()
                fs.umount(str(mnt))
                times["umount"] = time.perf_counter() - clock
    finally:
        image.unlink()
    return times


def run_from_scratch(log: WriteLog, sample: List[int], points: int, work: Path
                     ) -> Tuple[float, List[Dict[str, float]]]:
    """The estimated whole-run time over all points, and the sampled points' phase times."""
    timed = [from_scratch_one(log, point, work) for point in sample]
    per_point = [sum(t.values()) for t in timed]
    return statistics.mean(per_point) * points, timed


def phase_table(reports: List[CrashReport]) -> Dict[str, Dict[str, float]]:
    """Per phase, over every state of every run: median, q1 and the mean share of a state."""
    table = {}
    for phase in PHASES:
        values = [s.timings[phase] for r in reports for s in r.states if phase in s.timings]
        if values:
            table[phase] = quartiles(values)
            table[phase]["mean"] = statistics.mean(values)
    return table


def show_phases(title: str, table: Dict[str, Dict[str, float]], rest: float) -> None:
    """Each phase per state (median, q1, mean over all states) and its share of the mean state."""
    per_state = sum(row["mean"] for row in table.values()) + rest
    print(f"  {title}: where a state's time goes (per state, over all rounds)")
    for phase, row in table.items():
        print(f"    {phase:<9} median {row['median'] * 1e3:8.1f} ms   q1 {row['q1'] * 1e3:8.1f} ms"
              f"   mean {row['mean'] * 1e3:8.1f} ms  ({row['mean'] / per_state:5.1%})")
    print(f"    {'other':<9} {'':>35} mean {rest * 1e3:8.1f} ms  ({rest / per_state:5.1%})  "
          "(kmsg, timeline, set-up and teardown)")


def unaccounted(walls: List[float], reports: List[CrashReport]) -> float:
    """Mean seconds per state of a run outside every timed phase."""
    return statistics.mean((wall - sum(report.phase_totals().values())) / len(report.states)
                           for wall, report in zip(walls, reports))


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the figures as JSON to this file")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--sample", type=int, default=20)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small-mib", type=int, default=32)
    ap.add_argument("--device-mib", type=int, default=128)
    ap.add_argument("--checkpoint-every", type=int, default=4, metavar="N",
                    help="checkpoint the journal every N files (0: never)")
    ap.add_argument("--dir", default=None, help="where the images go (default: the temp dir)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/mapper/control"):
        print("bench_explorer: needs root and device-mapper (run it in scripts/vm)", file=sys.stderr)
        return 2

    results: Dict[str, object] = {
        **machine(), "rounds": args.rounds, "points": args.points,
        "sample": args.sample, "checkpoint_every": args.checkpoint_every,
        "load_average_start": os.getloadavg()}
    missed: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-explorer-", dir=args.dir) as scratch:
        work = Path(scratch)
        started = time.perf_counter()
        logs: Dict[str, WriteLog] = {}
        for name, mib in (("big", args.big_mib), ("small", args.small_mib)):
            log, files = record(work, name, mib, args.device_mib, args.checkpoint_every)
            logs[name] = log
            written = sum(e.size for e in log if not e.flags & 4)
            results[f"{name}_log"] = {"entries": len(log), "bytes_written": written,
                                      "log_bytes": os.path.getsize(log.path), "files": files}
            print(f"{name} log: {len(log)} entries, {written / MiB:.0f} MiB of writes "
                  f"({files} files of 1 MiB on a {args.device_mib} MiB ext4)")
        print(f"recorded in {time.perf_counter() - started:.0f} s")
        try:
            points = {name: spread(log.index_of("setup") + 1, len(log) - 1, args.points)
                      for name, log in logs.items()}
            sample = [points["big"][round((k + 1) * (len(points["big"]) - 1) / args.sample)]
                      for k in range(args.sample)]
            walls: Dict[str, List[float]] = {"explorer big": [], "explorer small": [],
                                             "from scratch big": []}
            reports: Dict[str, List[CrashReport]] = {"big": [], "small": []}
            scratch_times: List[Dict[str, float]] = []
            ways: Dict[str, Callable[[], None]] = {}

            def explorer_way(name: str) -> Callable[[], None]:
                def run() -> None:
                    wall, report = run_explorer(logs[name], points[name])
                    walls[f"explorer {name}"].append(wall)
                    reports[name].append(report)
                return run

            def scratch_way() -> None:
                estimate, timed = run_from_scratch(logs["big"], sample, len(points["big"]), work)
                walls["from scratch big"].append(estimate)
                scratch_times.extend(timed)

            ways = {"explorer big": explorer_way("big"), "explorer small": explorer_way("small"),
                    "from scratch big": scratch_way}
            names = list(ways)
            for r in range(args.rounds):
                for name in rotated(names, r):
                    clock = time.perf_counter()
                    ways[name]()
                    print(f"  round {r + 1}: {name:<17} {walls[name][-1]:7.1f} s"
                          + ("  (estimated from the sample)" if "scratch" in name else "")
                          + f"  [{time.perf_counter() - clock:.0f} s; load {os.getloadavg()[0]:.1f}]",
                          flush=True)
        finally:
            for log in logs.values():
                log.close()

    n = len(points["big"])
    stats = {name: quartiles(values) for name, values in walls.items()}
    per_state = {name: {k: v / len(points[name]) for k, v in stats[f"explorer {name}"].items()
                        if k in ("median", "q1", "min", "max")} for name in ("big", "small")}
    speedup = {"median": stats["from scratch big"]["median"] / stats["explorer big"]["median"],
               "q1": stats["from scratch big"]["q1"] / stats["explorer big"]["q1"]}
    growth = {"median": per_state["big"]["median"] / per_state["small"]["median"],
              "q1": per_state["big"]["q1"] / per_state["small"]["q1"]}
    phases = {name: phase_table(reports[name]) for name in reports}
    # the explorer's own cost per state: the run minus what the filesystem and the check cost
    own = {name: quartiles([(wall - sum(t for s in report.states for p, t in s.timings.items()
                                        if p in ("fsck", "mount", "check", "umount")))
                            / len(report.states)
                            for wall, report in zip(walls[f"explorer {name}"], reports[name])])
           for name in reports}
    own_growth = own["big"]["median"] / own["small"]["median"]
    # the same ratios round by round (the ways of one round ran minutes apart, under one load)
    paired = {"speedup": quartiles([s / e for s, e in zip(walls["from scratch big"],
                                                           walls["explorer big"])]),
              "growth": quartiles([(b / len(points["big"])) / (s / len(points["small"]))
                                   for b, s in zip(walls["explorer big"],
                                                   walls["explorer small"])])}
    scratch_phases = {p: quartiles([t[p] for t in scratch_times]) for p in scratch_times[0]}
    # per round: run time and mean phase times per state (a slow round shows where it was slow)
    results["explorer_rounds"] = {
        name: [{"seconds": wall, "per_state_ms": {
            phase: 1e3 * total / len(report.states)
            for phase, total in report.phase_totals().items()}}
            for wall, report in zip(walls[f"explorer {name}"], reports[name])]
        for name in reports}
    results.update({"ways_seconds": stats, "per_state_seconds": per_state,
                    "states_per_second": {name: len(points[name]) / stats[f"explorer {name}"]["median"]
                                          for name in ("big", "small")},
                    "speedup": speedup, "speedup_target": SPEEDUP_TARGET,
                    "growth": growth, "growth_target": GROWTH_TARGET,
                    "explorer_own_per_state_seconds": own, "explorer_own_growth": own_growth,
                    "round_ratios": paired,
                    "explorer_phases": phases, "from_scratch_phases": scratch_phases,
                    "from_scratch_sample": sample, "load_average_end": os.getloadavg()})

    print(f"\n{n} crash points per log, {args.rounds} rounds (median / q1 over rounds):")
    for name, s in stats.items():
        print(f"  {name:<17} median {s['median']:7.1f} s   q1 {s['q1']:7.1f} s")
    for name in ("big", "small"):
        rate = results["states_per_second"][name]  # type: ignore[index]
        print(f"  explorer {name}: {per_state[name]['median'] * 1e3:.0f} ms per state (median; "
              f"q1 {per_state[name]['q1'] * 1e3:.0f} ms), {rate:.2f} states/s")
        show_phases(f"explorer, {name} log", phases[name],
                    unaccounted(walls[f"explorer {name}"], reports[name]))
    per_point = statistics.mean(sum(t.values()) for t in scratch_times)
    print(f"  from scratch, big log: {per_point * 1e3:.0f} ms per point (mean over "
          f"{len(scratch_times)} sampled points); phases:")
    for phase, row in scratch_phases.items():
        print(f"    {phase:<9} median {row['median'] * 1e3:8.1f} ms   q1 {row['q1'] * 1e3:8.1f} ms")
    print(f"  => speedup over from scratch: {speedup['q1']:.1f}x q1, {speedup['median']:.1f}x "
          f"median (target >= {SPEEDUP_TARGET}x q1)")
    print(f"  => time per state, {args.big_mib} MiB log / {args.small_mib} MiB log: "
          f"{growth['q1']:.2f}x q1, {growth['median']:.2f}x median (target <= {GROWTH_TARGET}x q1)")
    print(f"     round by round: speedup median {paired['speedup']['median']:.1f}x (from "
          f"{paired['speedup']['min']:.1f}x to {paired['speedup']['max']:.1f}x), time per state "
          f"{paired['growth']['median']:.2f}x (from {paired['growth']['min']:.2f}x to "
          f"{paired['growth']['max']:.2f}x)")
    print(f"     the explorer's own cost per state (replay share, snapshot, the rest): "
          f"{own['big']['median'] * 1e3:.0f} ms against {own['small']['median'] * 1e3:.0f} ms "
          f"(median), {own_growth:.2f}x")
    print(f"  load average: {results['load_average_start']} at start, "
          f"{results['load_average_end']} at the end")
    if speedup["q1"] < SPEEDUP_TARGET:
        missed.append(f"speedup {speedup['q1']:.1f}x < {SPEEDUP_TARGET}x")
    if growth["q1"] > GROWTH_TARGET:
        missed.append(f"time per state grows {growth['q1']:.2f}x > {GROWTH_TARGET}x")
    return verdict(results, missed, args.out)


if __name__ == "__main__":
    sys.exit(main())
