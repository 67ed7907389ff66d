"""Verifying the hash chain of a large event log.

The log is built once (realistic `message_enqueued` events: a 26-char ID,
a sender, two recipients, client IP, HELO and session ID; appended with
EventLog.append_many in batches, so records within a batch share `at`),
then `events.verify.verify()` is timed, interleaved run by run:
  a  verify(directory)             default workers (one process per segment, at most one per CPU)
  b  verify(directory, workers=1)  in this process

The log was just written, so it is in the page cache: these are warm-cache
figures (hashing and line handling, not disk reads). The CLI command
(`spool events verify`) is not measured yet.

    .venv/bin/python -m bench.bench_verify [--runs 5] [--events 1000000]
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import Bench, clock, fmt, out, parser, positive_float, positive_int, temp_dir
from events import EventLog, verify
from events.log import DEFAULT_SEGMENT_BYTES
from events.schema import Event, MessageEnqueued
from events.segments import list_segments
from spoolfs.ids import new_id

ACTOR = "smtp:bench"
NODE = "mx1"
TARGET = 1_000_000


def make_batch(start: int, count: int) -> list[Event]:
    events: list[Event] = []
    session = new_id()
    for i in range(start, start + count):
        if i % 8 == 0:  # one SMTP session hands over a few messages
            session = new_id()
        events.append(
            MessageEnqueued(
                id=new_id(),
                sender=f"newsletter+{i}@lists.example.org",
                recipients=[f"alice.{i % 9973}@example.com", f"bob.{i % 7919}@mail.example.net"],
                size=2048 + (i * 7919) % 60000,
                subspool=f"{i % 16:02x}",
                source="smtp",
                client_ip=f"192.0.2.{i % 250 + 1}",
                helo="mx1.lists.example.org",
                session_id=session,
            )
        )
    return events


def build(directory: Path, total: int, batch: int, segment_bytes: int, max_seconds: float) -> float:
    """Append `total` events; return the seconds it took. Stops (and raises) past `max_seconds`."""
    start = clock()
    last_print = start
    with EventLog(directory, node=NODE, segment_bytes=segment_bytes) as log:
        done = 0
        while done < total:
            n = min(batch, total - done)
            log.append_many(make_batch(done, n), ACTOR)
            done += n
            now = clock()
            if now - start > max_seconds and done < total:
                raise SystemExit(
                    f"building the log took more than {max_seconds:g} s ({fmt(done)} of {fmt(total)} events); "
                    "use --events or --max-build-seconds"
                )
            if now - last_print >= 5 or done == total:
                out(f"  built {fmt(done)} / {fmt(total)} events ({now - start:.1f} s)")
                last_print = now
    return clock() - start


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__.split("\n\n")[0],
        max_seconds=600.0,
        max_seconds_help="no new run starts after the timed runs have taken this long in total",
    )
    p.add_argument(
        "--events", type=positive_int, default=1_000_000, help="events in the log (default 1000000)"
    )
    p.add_argument(
        "--batch", type=positive_int, default=10_000, help="events per append_many (default 10000)"
    )
    p.add_argument(
        "--segment-bytes",
        type=positive_int,
        default=DEFAULT_SEGMENT_BYTES,
        help=f"segment size of the built log (default {DEFAULT_SEGMENT_BYTES}, the config default)",
    )
    p.add_argument(
        "--max-build-seconds",
        type=positive_float,
        default=900.0,
        help="give up building the log after this long (default 900)",
    )
    args = p.parse_args(argv)

    with temp_dir(args.dir, "bench-verify-") as d:
        directory = d / "events"
        out(f"building a log of {fmt(args.events)} events in {directory} ...")
        build_seconds = build(directory, args.events, args.batch, args.segment_bytes, args.max_build_seconds)
        segments = list_segments(directory)
        size = sum(s.stat().st_size for s in segments)
        default_workers = min(len(segments), os.cpu_count() or 1)
        out(
            f"built in {build_seconds:.1f} s: {len(segments)} segments, {size / 1e6:,.0f} MB, "
            f"{size / args.events:.0f} bytes/event"
        )
        out()
        bench = Bench(
            "bench_verify",
            "events/s",
            {
                "runs": args.runs,
                "events": args.events,
                "segments": len(segments),
                "log_mb": round(size / 1e6),
                "bytes_per_event": round(size / args.events),
                "default_workers": default_workers,
                "cpus": os.cpu_count(),
            },
        )
        bench.variant("a", f"verify(), default workers ({default_workers})")
        bench.variant("b", "verify(workers=1)")
        bench.header("verify() of a freshly built log (warm page cache)")
        started = clock()
        for run in range(1, args.runs + 1):
            if run > 1 and clock() - started > args.max_seconds:
                out(f"stopping after {run - 1} runs: --max-seconds {args.max_seconds:g} reached")
                break
            for key, workers in (("a", None), ("b", 1)):
                t0 = clock()
                result = verify(directory, workers=workers)
                seconds = clock() - t0
                if result.count != args.events:
                    raise RuntimeError(f"verify counted {result.count} records, {args.events} were appended")
                bench.record(key, run, args.runs, result.count, seconds)
        out()
        bench.finish(
            ratios=[("a", "b")],
            target_key="a",
            target=TARGET,
            as_json=args.json,
            extra={"build_seconds": round(build_seconds, 1)},
        )


if __name__ == "__main__":
    main()
