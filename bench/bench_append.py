"""Durable event appends with group commit, from concurrent writer threads.

Variants, interleaved run by run, each run in a fresh log directory:
  a  EventLog, each writer keeps up to --window appends in flight
     (submit() futures; it waits for the oldest when --window are outstanding)
  b  EventLog, each writer waits for each append (window 1, i.e. append())
  c  baseline without group commit: one write and one fdatasync per event,
     the writers taking turns under a threading.Lock on one file (same
     canonical, hash-chained lines as the log)

An append counts once its future has resolved (or, for c, once its
fdatasync returned): every figure is of durable events per second.

    .venv/bin/python -m bench.bench_append [--runs 5] [--events 200000] [--window 64]
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from bench.common import Bench, clock, fmt, out, parser, positive_int, run_threads, split, temp_dir
from events import EventLog, head_seq
from events import clock as ev_clock
from events.log import Ticket, _Pending
from events.schema import GENESIS, AnyEvent, MessageEnqueued, MessageForced, Record, encode_record
from spoolfs.ids import new_id

ACTOR = "smtp:bench"
NODE = "bench"
POOL = 1024  # distinct events per writer, cycled
TARGET = 100_000


class CountingLog(EventLog):
    """EventLog that counts its group commits (one write + one fdatasync each)."""

    commits = 0

    def _commit(self, batch: list[_Pending]) -> list[list[Record]]:
        self.commits += 1
        return super()._commit(batch)


class FsyncPerEvent:
    """The simple writer: one line, one fdatasync, per event, under a lock."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._seq, self._prev = 0, GENESIS

    def append(self, event: AnyEvent, actor: str) -> int:
        with self._lock:
            seq = self._seq + 1
            record = Record(
                prev=self._prev, seq=seq, at=ev_clock.now(), actor=actor, node=NODE, payload=event
            )
            line = encode_record(record)
            view = memoryview(line + b"\n")
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
            self._seq, self._prev = seq, hashlib.sha256(line).hexdigest()
            return seq

    def close(self) -> None:
        os.close(self._fd)


def make_events(kind: str, count: int) -> list[AnyEvent]:
    if kind == "forced":
        return [MessageForced(id=new_id()) for _ in range(count)]
    return [
        MessageEnqueued(
            id=new_id(),
            sender=f"newsletter+{i}@lists.example.org",
            recipients=[f"alice.{i}@example.com", f"bob.{i}@mail.example.net"],
            size=4096 + i,
            subspool=f"{i % 16:02x}",
            source="smtp",
            client_ip="192.0.2.17",
            helo="mx1.lists.example.org",
            session_id=new_id(),
        )
        for i in range(count)
    ]


def run_group(
    base: str | None, pools: Sequence[Sequence[AnyEvent]], total: int, window: int, max_seconds: float
) -> tuple[int, float, int, bool]:
    """One run of a or b: (events, seconds, group commits, cut short)."""
    writers = len(pools)
    quotas = split(total, writers)
    cut = [False] * writers
    with temp_dir(base, "bench-append-") as d:
        log = CountingLog(d / "events", node=NODE)
        try:

            def work(i: int, deadline: float) -> int:
                pool, n = pools[i], len(pools[i])
                pending: deque[Ticket] = deque()
                done = 0
                for k in range(quotas[i]):
                    if len(pending) >= window:
                        pending.popleft().result()
                        done += 1
                    if clock() > deadline:
                        cut[i] = True
                        break
                    pending.append(log.submit([pool[k % n]], ACTOR))
                while pending:
                    pending.popleft().result()
                    done += 1
                return done

            seconds, done = run_threads(writers, work, max_seconds)
        finally:
            log.close()
        head = head_seq(d / "events")
        if head != done:
            raise RuntimeError(f"the log holds {head} records, the writers counted {done}")
        return done, seconds, log.commits, any(cut)


def run_fsync_each(
    base: str | None, pools: Sequence[Sequence[AnyEvent]], total: int, max_seconds: float
) -> tuple[int, float, bool]:
    """One run of c: (events, seconds, cut short)."""
    writers = len(pools)
    quotas = split(total, writers)
    cut = [False] * writers
    with temp_dir(base, "bench-append-") as d:
        (d / "events").mkdir()
        writer = FsyncPerEvent(d / "events" / "0000000000000001.jsonl")
        try:

            def work(i: int, deadline: float) -> int:
                pool, n = pools[i], len(pools[i])
                done = 0
                for k in range(quotas[i]):
                    if clock() > deadline:
                        cut[i] = True
                        break
                    writer.append(pool[k % n], ACTOR)
                    done += 1
                return done

            seconds, done = run_threads(writers, work, max_seconds)
        finally:
            writer.close()
        head = head_seq(d / "events")
        if head != done:
            raise RuntimeError(f"the file holds {head} records, the writers counted {done}")
        return done, seconds, any(cut)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--events", type=positive_int, default=200_000, help="events per run of a (default 200000)"
    )
    p.add_argument(
        "--slow-events",
        type=positive_int,
        default=5_000,
        help="events per run of b and c, which are slow (default 5000)",
    )
    p.add_argument(
        "--window", type=positive_int, default=64, help="appends in flight per writer in a (default 64)"
    )
    p.add_argument("--writers", type=positive_int, default=8, help="concurrent writer threads (default 8)")
    p.add_argument(
        "--payload",
        choices=["enqueued", "forced"],
        default="enqueued",
        help="event type: a realistic message_enqueued (default) or a small message_forced",
    )
    args = p.parse_args(argv)

    pools = [make_events(args.payload, POOL) for _ in range(args.writers)]
    line = len(
        encode_record(
            Record(prev=GENESIS, seq=123456, at=ev_clock.now(), actor=ACTOR, node=NODE, payload=pools[0][0])
        )
    )
    bench = Bench(
        "bench_append",
        "events/s",
        {
            "runs": args.runs,
            "writers": args.writers,
            "window": args.window,
            "events_a": args.events,
            "events_b_c": args.slow_events,
            "payload": args.payload,
            "line_bytes": line + 1,
            "max_seconds": args.max_seconds,
        },
    )
    bench.variant("a", f"group commit, window {args.window}")
    bench.variant("b", "group commit, window 1 (append)")
    bench.variant("c", "fdatasync per event (baseline)")
    bench.header(f"durable appends from {args.writers} writer threads")

    for run in range(1, args.runs + 1):
        for key, window, total in (("a", args.window, args.events), ("b", 1, args.slow_events)):
            done, seconds, commits, cut = run_group(args.dir, pools, total, window, args.max_seconds)
            detail = f"{fmt(commits)} fsyncs, {done / max(commits, 1):.1f} events/fsync"
            bench.record(key, run, args.runs, done, seconds, detail, cut)
        done, seconds, cut = run_fsync_each(args.dir, pools, args.slow_events, args.max_seconds)
        bench.record("c", run, args.runs, done, seconds, f"{fmt(done)} fsyncs", cut)
    out()
    bench.finish(ratios=[("a", "b"), ("a", "c")], target_key="a", target=TARGET, as_json=args.json)


if __name__ == "__main__":
    main()
