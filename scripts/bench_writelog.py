#!/usr/bin/env python3
"""Benchmark of the dm-log-writes reader and replayer (dmflakey_ioctl.writelog) on the host.

    scripts/bench_writelog.py [--out FILE] [--rounds N] [--entries N] [--data-mib N] [--dir DIR]

No root and no kernel target needed: the logs are synthetic, built here in the
kernel's layout (a super block, then per entry a header block and its data).

* index: ``WriteLog.open`` + ``close`` of a log of 100 000 entries (writes of
  1-8 sectors, flushes, FUA writes, discards, marks; data left sparse), next to
  a floor that only walks the headers (``struct.unpack_from`` per entry, no
  checks, no columns).  Target: at least 200 000 entries per second (median).
* replay: two logs holding 64 MiB of data each (``large``: 4-256 KiB writes,
  ``small``: 1-4 KiB writes as ext4 with 1 KiB blocks makes them; both in runs
  of adjacent writes with jumps between them and some overwrites), replayed
  onto a fresh sparse file, next to a floor that copies the same bytes from a
  plain file with ``os.pread``/``os.pwrite`` in 1 MiB chunks onto a fresh
  sparse file.  Both fsync at the end (replay does by contract); the ratio
  without the fsync, where the copy engines alone are compared, is measured
  too.  Target: replay within 1.5x the floor (median), with and without fsync.

The ways run interleaved: in each round every way runs once, in an order that
rotates from round to round, so a slow phase of the machine hits every way
alike.  Files live in the page cache (warm); targets are made and deleted
untimed.  Prints a table; ``--out`` writes the figures as JSON.  Exit status 1
when a target is missed.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmflakey_ioctl.writelog import WriteLog  # noqa: E402

MAGIC = 0x6A736677736872
SS = 512
MiB = 1 << 20
INDEX_TARGET = 200_000      # entries per second
REPLAY_TARGET = 1.5         # replay time / floor time
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
                     seed: int) -> int:
    """A log of data_bytes of writes (sizes in sectors), and the same bytes in a plain file.

    Returns the device size (a size mark is the first entry, as the library's recorder writes).
    """
    rng = random.Random(seed)
    payload = os.urandom(data_bytes)
    device = 4 * data_bytes
    body: List[bytes] = []
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
        body.append(header(pos, nr, 0))
        body.append(payload[used:used + nr * SS])
        used += nr * SS
        pos += nr
        count += 1
    with open(path, "wb") as fh:
        fh.write(super_block(count))
        fh.write(header(0, 0, 8, f"dmflakey-size:{device}".encode()))
        for part in body:
            fh.write(part)
    plain.write_bytes(payload)
    return device


def fresh_target(path: Path, size: int) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def floor_copy(plain: str, target: str, fsync: bool) -> None:
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


def summary(times: List[float]) -> Dict[str, float]:
    q1 = statistics.quantiles(times, n=4)[0] if len(times) >= 2 else times[0]
    return {"median": statistics.median(times), "q1": q1, "min": min(times), "runs": len(times)}


def interleave(ways: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    names = list(ways)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(ways[name]())
    return times


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the figures as JSON to this file")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--dir", default=None, help="where the scratch files go (default: the temp dir)")
    args = ap.parse_args(argv)

    results: Dict[str, object] = {"host": platform.node(), "python": platform.python_version(),
                                  "kernel": platform.release(), "rounds": args.rounds}
    missed: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-writelog-", dir=args.dir) as scratch:
        tmp = Path(scratch)

        # -- index -----------------------------------------------------------------------------
        index_log = tmp / "index.log"
        build_index_log(index_log, args.entries)
        header_walk(str(index_log))                          # warm the page cache

        def index_once() -> float:
            t = time.perf_counter()
            log = WriteLog.open(index_log)
            n = len(log)
            log.close()
            elapsed = time.perf_counter() - t
            assert n == args.entries, n
            return elapsed

        def walk_once() -> float:
            t = time.perf_counter()
            header_walk(str(index_log))
            return time.perf_counter() - t

        times = interleave({"index": index_once, "header walk floor": walk_once}, args.rounds)
        index = {name: summary(t) for name, t in times.items()}
        rate = args.entries / index["index"]["median"]
        results["index"] = {"entries": args.entries, "log_bytes": index_log.stat().st_size,
                            "ways": index, "entries_per_s_median": rate,
                            "entries_per_s_q1": args.entries / index["index"]["q1"],
                            "ratio_to_floor_median": index["index"]["median"]
                            / index["header walk floor"]["median"],
                            "target_entries_per_s": INDEX_TARGET}
        print(f"index: {args.entries} entries, {index_log.stat().st_size / MiB:.0f} MiB log (sparse)")
        for name, s in index.items():
            print(f"  {name:<22} median {s['median'] * 1e3:8.1f} ms   q1 {s['q1'] * 1e3:8.1f} ms")
        print(f"  => {rate:,.0f} entries/s (median; target >= {INDEX_TARGET:,})  "
              f"{results['index']['ratio_to_floor_median']:.2f}x the header walk")
        if rate < INDEX_TARGET:
            missed.append(f"index {rate:,.0f} entries/s < {INDEX_TARGET:,}")
        index_log.unlink()

        # -- replay ----------------------------------------------------------------------------
        data_bytes = args.data_mib * MiB
        replay_results = {}
        for kind, sizes in (("large", (8, 512)), ("small", (2, 8))):
            log_path, plain = tmp / f"{kind}.log", tmp / f"{kind}.plain"
            device = build_replay_log(log_path, plain, data_bytes, sizes, seed=len(kind))
            log = WriteLog.open(log_path)
            assert log.device_size == device
            counter = iter(range(1 << 30))

            def timed(run: Callable[[str], None]) -> float:
                target = tmp / f"target-{next(counter)}"
                fresh_target(target, device)
                t = time.perf_counter()
                run(str(target))
                elapsed = time.perf_counter() - t
                target.unlink()
                return elapsed

            def replay_sync(target: str, log: WriteLog = log) -> None:
                result = log.replay(target)
                assert result.bytes_written == data_bytes, result

            def replay_nosync(target: str, log: WriteLog = log) -> None:
                with log.replayer(target) as rep:
                    rep.advance()

            ways = {
                "replay": lambda: timed(replay_sync),
                "floor": lambda: timed(lambda t: floor_copy(str(plain), t, True)),
                "replay, no fsync": lambda: timed(replay_nosync),
                "floor, no fsync": lambda: timed(lambda t: floor_copy(str(plain), t, False)),
            }
            ways["floor, no fsync"]()                       # warm the plain file and the log
            ways["replay, no fsync"]()
            times = interleave(ways, args.rounds)
            stats = {name: summary(t) for name, t in times.items()}
            ratio = stats["replay"]["median"] / stats["floor"]["median"]
            ratio_nosync = stats["replay, no fsync"]["median"] / stats["floor, no fsync"]["median"]
            replay_results[kind] = {
                "entries": len(log), "data_bytes": data_bytes, "log_bytes": log_path.stat().st_size,
                "ways": stats, "ratio_median": ratio,
                "ratio_q1": stats["replay"]["q1"] / stats["floor"]["q1"],
                "ratio_no_fsync_median": ratio_nosync,
                "ratio_no_fsync_q1": stats["replay, no fsync"]["q1"] / stats["floor, no fsync"]["q1"],
                "replay_mib_per_s": data_bytes / MiB / stats["replay"]["median"],
                "target_ratio": REPLAY_TARGET}
            log.close()
            log_path.unlink()
            plain.unlink()
            print(f"replay ({kind} entries): {len(log)} entries, {args.data_mib} MiB of data")
            for name, s in stats.items():
                print(f"  {name:<22} median {s['median'] * 1e3:8.1f} ms   q1 {s['q1'] * 1e3:8.1f} ms")
            print(f"  => replay/floor {ratio:.2f}x with fsync, {ratio_nosync:.2f}x without "
                  f"(median; target <= {REPLAY_TARGET}x)")
            for what, value in (("", ratio), (" without fsync", ratio_nosync)):
                if value > REPLAY_TARGET:
                    missed.append(f"replay ({kind}){what} {value:.2f}x the floor > {REPLAY_TARGET}x")
        results["replay"] = replay_results

    results["missed"] = missed
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if missed:
        print("MISSED: " + "; ".join(missed))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
