#!/usr/bin/env python3
"""Benchmark of the dm-log-writes reader and replayer (dmflakey_ioctl.writelog) on the host.

    scripts/bench_writelog.py [--out FILE] [--rounds N] [--entries N] [--data-mib N] [--dir DIR]

No root and no kernel target needed: the logs are synthetic, built here in the
kernel's layout (a super block, then per entry a header block and its data).

* index: ``WriteLog.open`` + ``close`` of a log of 100 000 entries (writes of
  1-8 sectors, flushes, FUA writes, discards, marks; data left sparse), next to
  a floor that only walks the headers (``struct.unpack_from`` per entry, no
  checks, no columns).  Target: at least 200 000 entries per second (q1).
* replay: two logs holding 64 MiB of data each (``large``: 4-256 KiB writes,
  ``small``: 1-4 KiB writes as ext4 with 1 KiB blocks makes them; both in runs
  of adjacent writes with jumps between them and some overwrites), replayed
  onto a fresh sparse file, next to two floors: the issue's, the same bytes
  copied from a plain file with ``os.pread``/``os.pwrite`` in 1 MiB chunks in
  order, and the ``runs floor``, the least any replayer must do for that log
  (one ``os.pwrite`` per run of adjacent writes, from bytes ready in memory;
  thousands of small scattered writes cost the kernel far more than 64 big
  sequential ones).  Every way writes onto a fresh sparse file and fsyncs at
  the end (replay does by contract); the same without the fsync compares the
  copy engines alone.  Targets: on the ``large`` log replay within 1.5x the
  issue's floor; on the ``small`` log (a guard on the replayer's per-entry
  cost) within 2x the runs floor; with and without fsync.

The ways run interleaved: in each round every way runs once, in an order that
rotates from round to round, so a slow phase of the machine hits every way
alike.  Files live in the page cache (warm); targets are made and deleted
untimed.  The targets compare lower quartiles (q1): on a shared host
a slow phase lengthens some runs of every way, but rarely all of them.  CPU
seconds (user + system of this process) are printed too: they do not count
time spent waiting for the CPU.  Prints a table; ``--out`` writes the figures
as JSON.  Exit status 1
when a target is missed.  Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from benchrun import machine, rotated, verdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmflakey_ioctl.writelog import WriteLog  # noqa: E402

MAGIC = 0x6A736677736872
SS = 512
MiB = 1 << 20
INDEX_TARGET = 200_000      # entries per second
REPLAY_TARGET = 1.5         # replay time / floor time (large log, the floor)
SMALL_TARGET = 2.0          # replay time / runs floor time (small log)
CHUNK = 1 * MiB


def header(sector: int, nr: int, flags: int, label: bytes = b"") -> bytes:
    head = struct.pack("<4Q", sector, nr, flags, len(label)) + label
    return head + bytes(SS - len(head))


def super_block(count: int) -> bytes:
    head = struct.pack("<QQQI", MAGIC, 1, count, SS)
    return head + bytes(SS - len(head))


def build_index_log(path: Path, entries: int) -> None:
    """Headers only (pwrite at their offsets); the data blocks stay holes."""
    rng = random.Random(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, super_block(entries), 0)
        off = SS
        for i in range(entries):
            roll = rng.random()
            if roll < 0.01:
                block, nr = header(0, 0, 8, f"mark-{i}".encode()), 0
            elif roll < 0.06:
                block, nr = header(0, 0, 1), 0
            elif roll < 0.08:
                block, nr = header(rng.randrange(1 << 20), 64, 4), 0      # discard: no data
            else:
                nr = rng.randint(1, 8)
                block = header(rng.randrange(1 << 20), nr, 2 if roll < 0.15 else 0)
            os.pwrite(fd, block, off)
            off += SS + nr * SS
        os.ftruncate(fd, off)
    finally:
        os.close(fd)


def build_replay_log(path: Path, plain: Path, data_bytes: int, sizes: Tuple[int, int],
                     seed: int) -> Tuple[int, List[Tuple[int, bytes]]]:
    """A log of data_bytes of writes (sizes in sectors), and the same bytes in a plain file.

    Returns the device size (a size mark is the first entry, as the library's
    recorder writes) and the writes' runs: (byte position, bytes) of the
    writes merged where one continues the previous one on the device.
    """
    rng = random.Random(seed)
    payload = os.urandom(data_bytes)
    device = 4 * data_bytes
    body: List[bytes] = []
    runs: List[Tuple[int, bytes]] = []
    count, used, pos = 1, 0, 0
    while used < data_bytes:
        nr = min(rng.randint(*sizes), (data_bytes - used) // SS)
        roll = rng.random()
        if roll < 0.15:
            pos = rng.randrange(0, device // SS - nr)          # a jump (sometimes an overwrite)
        if roll > 0.98:
            body.append(header(0, 0, 1))                       # a flush now and then
            count += 1
        if pos + nr > device // SS:
            pos = 0
        data = payload[used:used + nr * SS]
        body.append(header(pos, nr, 0))
        body.append(data)
        if runs and runs[-1][0] + len(runs[-1][1]) == pos * SS:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((pos * SS, data))
        used += nr * SS
        pos += nr
        count += 1
    with open(path, "wb") as fh:
        fh.write(super_block(count))
        fh.write(header(0, 0, 8, f"dmflakey-size:{device}".encode()))
        for part in body:
            fh.write(part)
    plain.write_bytes(payload)
    return device, runs


def fresh_target(path: Path, size: int) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def floor_copy(plain: str, target: str, fsync: bool) -> None:
    """The issue's floor: the same bytes, os.pread/os.pwrite in 1 MiB chunks, in order."""
    src = os.open(plain, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY)
    try:
        pos = 0
        while True:
            chunk = os.pread(src, CHUNK, pos)
            if not chunk:
                break
            os.pwrite(dst, chunk, pos)
            pos += len(chunk)
        if fsync:
            os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def runs_floor(runs: List[Tuple[int, bytes]], target: str, fsync: bool) -> None:
    """The least any replayer does for this log: one pwrite per run, from bytes ready in memory."""
    dst = os.open(target, os.O_WRONLY)
    try:
        for pos, data in runs:
            os.pwrite(dst, data, pos)
        if fsync:
            os.fsync(dst)
    finally:
        os.close(dst)


def header_walk(path: str) -> int:
    """The least an index can do: unpack every header, follow nr_sectors."""
    import mmap
    unpack = struct.Struct("<QQQQ").unpack_from
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        size, off, n = len(mm), SS, 0
        while off + SS <= size:
            _sector, nr, flags, _len = unpack(mm, off)
            off += SS + (0 if flags & 4 else nr * SS)
            n += 1
    return n


def summary(walls: List[float], cpus: List[float]) -> Dict[str, float]:
    q1 = statistics.quantiles(walls, n=4, method="inclusive")[0] if len(walls) >= 2 else walls[0]
    return {"median": statistics.median(walls), "q1": q1, "min": min(walls),
            "cpu_median": statistics.median(cpus), "runs": len(walls)}


def interleave(ways: Dict[str, Callable[[], Tuple[float, float]]], rounds: int) -> Dict[str, Dict]:
    """Each way once per round, the order rotating; (wall, cpu) seconds per run."""
    names = list(ways)
    walls: Dict[str, List[float]] = {n: [] for n in names}
    cpus: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotated(names, r):
            wall, cpu = ways[name]()
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {n: summary(walls[n], cpus[n]) for n in names}


def clock(run: Callable[[], object]) -> Tuple[float, float]:
    c, t = time.process_time(), time.perf_counter()
    run()
    return time.perf_counter() - t, time.process_time() - c


def show(stats: Dict[str, Dict]) -> None:
    for name, s in stats.items():
        print(f"  {name:<24} median {s['median'] * 1e3:8.1f} ms   q1 {s['q1'] * 1e3:8.1f} ms   "
              f"cpu {s['cpu_median'] * 1e3:7.1f} ms")


def ratios(stats: Dict[str, Dict], way: str, floor: str) -> Dict[str, float]:
    return {"median": stats[way]["median"] / stats[floor]["median"],
            "q1": stats[way]["q1"] / stats[floor]["q1"],
            "cpu": stats[way]["cpu_median"] / stats[floor]["cpu_median"]}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the figures as JSON to this file")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where the scratch files go (default: the temp dir)")
    args = ap.parse_args(argv)

    results: Dict[str, object] = {**machine(), "rounds": args.rounds,
                                  "load_average": os.getloadavg()}
    missed: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-writelog-", dir=args.dir) as scratch:
        tmp = Path(scratch)

        # -- index -----------------------------------------------------------------------------
        index_log = tmp / "index.log"
        build_index_log(index_log, args.entries)
        header_walk(str(index_log))                          # warm the page cache

        def index_once() -> None:
            with WriteLog.open(index_log) as log:
                assert len(log) == args.entries, len(log)

        stats = interleave({"index (WriteLog.open)": lambda: clock(index_once),
                            "header walk floor": lambda: clock(lambda: header_walk(str(index_log)))},
                           args.rounds)
        way = stats["index (WriteLog.open)"]
        rate = {"median": args.entries / way["median"], "q1": args.entries / way["q1"],
                "cpu": args.entries / way["cpu_median"]}
        results["index"] = {"entries": args.entries, "log_bytes": index_log.stat().st_size,
                            "ways": stats, "entries_per_s": rate,
                            "ratio_to_header_walk": ratios(stats, "index (WriteLog.open)",
                                                           "header walk floor"),
                            "target_entries_per_s": INDEX_TARGET}
        print(f"index: {args.entries} entries, a {index_log.stat().st_size / MiB:.0f} MiB log "
              f"(sparse data)")
        show(stats)
        print(f"  => {rate['q1']:,.0f} entries/s (q1; median {rate['median']:,.0f}, per cpu second "
              f"{rate['cpu']:,.0f}; target >= {INDEX_TARGET:,})")
        if rate["q1"] < INDEX_TARGET:
            missed.append(f"index {rate['q1']:,.0f} entries/s < {INDEX_TARGET:,}")
        index_log.unlink()

        # -- replay ----------------------------------------------------------------------------
        data_bytes = args.data_mib * MiB
        replay_results = {}
        for kind, sizes, gate_floor, target in (("large", (8, 512), "floor", REPLAY_TARGET),
                                                ("small", (2, 8), "runs floor", SMALL_TARGET)):
            log_path, plain = tmp / f"{kind}.log", tmp / f"{kind}.plain"
            device, runs = build_replay_log(log_path, plain, data_bytes, sizes, seed=len(kind))
            log = WriteLog.open(log_path)
            assert log.device_size == device
            counter = iter(range(1 << 30))

            def timed(run: Callable[[str], object]) -> Tuple[float, float]:
                target = tmp / f"target-{next(counter)}"
                fresh_target(target, device)
                try:
                    return clock(lambda: run(str(target)))
                finally:
                    target.unlink()

            def replay(target: str, fsync: bool, log: WriteLog = log) -> None:
                with log.replayer(target) as rep:
                    assert rep.advance().bytes_written == data_bytes
                    if fsync:
                        rep.flush()

            ways = {}
            for suffix, fsync in (("", True), (", no fsync", False)):
                ways["replay" + suffix] = functools.partial(timed, functools.partial(replay, fsync=fsync))
                ways["floor" + suffix] = functools.partial(
                    timed, lambda t, fsync=fsync: floor_copy(str(plain), t, fsync))
                ways["runs floor" + suffix] = functools.partial(
                    timed, lambda t, fsync=fsync: runs_floor(runs, t, fsync))
            for warm in ("floor, no fsync", "replay, no fsync"):
                ways[warm]()                                  # the log and the plain file in cache
            stats = interleave(ways, args.rounds)
            figures = {"entries": len(log), "runs": len(runs), "data_bytes": data_bytes,
                       "log_bytes": log_path.stat().st_size, "ways": stats, "gated_against": gate_floor,
                       "target_ratio": target}
            print(f"replay ({kind} writes, {sizes[0] * SS // 1024}-{sizes[1] * SS // 1024} KiB): "
                  f"{len(log)} entries in {len(runs)} runs, {args.data_mib} MiB of data")
            show(stats)
            for suffix in ("", ", no fsync"):
                for floor in ("floor", "runs floor"):
                    r = ratios(stats, "replay" + suffix, floor + suffix)
                    figures[f"replay/{floor}{suffix}"] = r
                    gated = floor == gate_floor
                    print(f"  => replay{suffix} / {floor}{suffix}: {r['q1']:.2f}x q1, {r['median']:.2f}x "
                          f"median, {r['cpu']:.2f}x cpu" + (f"  (target <= {target}x q1)"
                                                          if gated else ""))
                    if gated and r["q1"] > target:
                        missed.append(f"replay ({kind}){suffix} {r['q1']:.2f}x the {floor} > "
                                      f"{target}x")
            replay_results[kind] = figures
            log.close()
            log_path.unlink()
            plain.unlink()
        results["replay"] = replay_results
    return verdict(results, missed, args.out)


if __name__ == "__main__":
    sys.exit(main())
