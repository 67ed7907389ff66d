"""Projections and reports: rebuild, catch-up, and `spool list --json` / `spool summary` against Postfix.

Issue 3's figures, in two parts, each interleaved run by run.

Part 1, a log of --events (1,000,000) realistic records, built once with
EventLog.append_many: message lifecycles as the server writes them
(message_enqueued; a delivery_attempted per recipient, then
message_finished, or message_deferred and a later retry; a few messages
held, a few left deferred), so the projection ends with a spool of a few
percent of the messages. Then, run by run:
  r  rebuild: projections.duckdb deleted, then Projections.open, rebuild(),
     close(), in this process: the whole rebuild, schema and commit included
  c  catch-up: --catch-up (1,000) new records are appended (the lifecycles
     go on), the projections opened (not timed), then catch_up() is timed;
     the open and close around it are printed beside it
  l  the whole command `spool --data-dir D list --limit 1 > /dev/null` as a
     subprocess, after --catch-up new records were appended: Python's start,
     imports, the catch-up and the query
  z  the same command with nothing new in the log (the fixed cost of the
     command; for reference, no target)

Part 2, a spool of --messages (100,000) 4 KB messages against a Postfix
queue of as many held messages, both on this machine (Postfix: a throwaway
instance, loopback only, every message held, see bench/postfix.py). Ours is
filled through Spool.enqueue from 20 threads (no server runs), Postfix's by
smtp-source; each side's listing is checked once to count --messages lines
before anything is timed. Then, run by run, whole commands as subprocesses,
output to /dev/null:
  a  `spool --data-dir D list --json`     b  `postqueue -c DIR -j`
  s  `spool --data-dir D summary`         q  `qshape -c DIR hold`
Warm, as a sysadmin finds it: the projections were caught up once after
the fill (not timed), and before each run of a and s, --daemon-events
(1,000) records are appended to the log as a delivery daemon would have
meanwhile (a delivery_attempted and a message_deferred for a message in
the spool), so every timed command also catches up on those. Postfix reads
its queue files each time (they are in the page cache, like our log and
projections file).

Targets: r <= 3 s; c <= 50 ms; l <= 300 ms; a <= 0.5x b; s <= 0.5x q.

    .venv/bin/python -m bench.bench_projections [--runs 5] [--events 1000000] [--catch-up 1000]
        [--messages 100000] [--daemon-events 1000] [--skip-log | --skip-postfix]
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    clock,
    fmt,
    free_port,
    median,
    out,
    parser,
    positive_int,
    temp_dir,
)
from bench.postfix import postfix_instance, run_smtp_source
from bench.serve import RECIPIENT, SPOOL, fill_spool, provenance, smtp_source_like
from events import EventLog
from events import schema as ev
from events.log import DEFAULT_SEGMENT_BYTES
from events.segments import list_segments
from projections import Projections
from spoolfs.ids import new_id

NODE = "mx1"
BATCH = 10_000
REBUILD_TARGET = 3.0
CATCH_UP_TARGET = 0.050
LIST_TARGET = 0.300
POSTFIX_RATIO_TARGET = 0.5
COMMAND_TIMEOUT = 600.0

# --- the log: message lifecycles -------------------------------------------------------

ATTEMPT_LAG = 40  # messages enqueued between a message's enqueue and its first attempt
RETRY_LAG = 400  # ... and its retry, when the first attempt was deferred
DEFERRED_EVERY = 5  # one message in 5 is deferred at its first attempt
STUCK_EVERY = 25  # ... and one in 25 is never retried (it stays in the spool, deferred)
HELD_EVERY = 97  # one in 97 is held right after enqueue and stays so


class Lifecycles:
    """An endless stream of the records a server writes for its messages, in time order.

    Message k is enqueued at tick k; its first attempt comes at tick
    k + ATTEMPT_LAG (one delivery_attempted per recipient, then
    message_finished, or message_deferred for one in DEFERRED_EVERY); a
    deferred message is retried and delivered at tick k + RETRY_LAG, unless
    it is one in STUCK_EVERY. One in HELD_EVERY is held after its enqueue.
    """

    def __init__(self) -> None:
        self.tick = 0
        self.later: dict[int, list[tuple[str, ev.Event]]] = {}
        self.buffer: list[tuple[str, ev.Event]] = []
        self.session = new_id()
        self.now = dt.datetime.now(dt.UTC)

    def _at(self, tick: int, item: tuple[str, ev.Event]) -> None:
        self.later.setdefault(tick, []).append(item)

    def _step(self) -> None:
        k = self.tick
        if k % 8 == 0:  # one SMTP session hands over a few messages
            self.session = new_id()
        mid = new_id()
        rcpts = [f"alice.{k % 9973}@example.com"]
        if k % 3 == 0:
            rcpts.append(f"bob.{k % 7919}@mail.example.net")
        self.buffer.append(
            (
                "smtp",
                ev.MessageEnqueued(
                    id=mid,
                    sender=f"newsletter+{k}@lists.example.org",
                    recipients=rcpts,
                    size=2048 + (k * 7919) % 60000,
                    subspool=f"{k % 16:02x}",
                    source="smtp",
                    client_ip=f"192.0.2.{k % 250 + 1}",
                    helo="mx1.lists.example.org",
                    session_id=self.session,
                ),
            )
        )
        if k % HELD_EVERY == 0:
            self.buffer.append(("cli:root", ev.MessageHeld(id=mid)))
        else:
            deferred = k % DEFERRED_EVERY == 0
            first: list[tuple[str, ev.Event]] = [
                (
                    "delivery",
                    ev.DeliveryAttempted(
                        id=mid,
                        recipient=r,
                        result="deferred" if deferred else "delivered",
                        code=451 if deferred else 250,
                        response="4.7.1 try again later" if deferred else "2.0.0 Ok: queued as 4Zx1",
                        host="mx.example.com[198.51.100.7]:25",
                    ),
                )
                for r in rcpts
            ]
            if deferred:
                first.append(
                    (
                        "delivery",
                        ev.MessageDeferred(
                            id=mid,
                            next_attempt_at=self.now + dt.timedelta(minutes=5),
                            reason="4.7.1 try again later",
                        ),
                    )
                )
            else:
                first.append(("delivery", ev.MessageFinished(id=mid, outcome="delivered")))
            for item in first:
                self._at(k + ATTEMPT_LAG, item)
            if deferred and k % STUCK_EVERY != 0:
                for r in rcpts:
                    self._at(
                        k + RETRY_LAG,
                        (
                            "delivery",
                            ev.DeliveryAttempted(
                                id=mid,
                                recipient=r,
                                result="delivered",
                                code=250,
                                response="2.0.0 Ok: queued as 4Zx2",
                                host="mx.example.com[198.51.100.7]:25",
                            ),
                        ),
                    )
                self._at(k + RETRY_LAG, ("delivery", ev.MessageFinished(id=mid, outcome="delivered")))
        self.buffer.extend(self.later.pop(k, ()))
        self.tick += 1

    def take(self, count: int) -> list[tuple[str, ev.Event]]:
        """The next `count` records (actor, event)."""
        while len(self.buffer) < count:
            self._step()
        batch, self.buffer = self.buffer[:count], self.buffer[count:]
        return batch


def append(log: EventLog, items: list[tuple[str, ev.Event]]) -> None:
    """Append in order, one append_many (one commit) per run of records with the same actor."""
    futures = []
    start = 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i][0] != items[start][0]:
            futures.append(log.submit([e for _, e in items[start:i]], items[start][0]))
            start = i
    for future in futures:  # committed in the order submitted
        future.result()


def build_log(directory: Path, total: int, life: Lifecycles, max_seconds: float) -> float:
    start = clock()
    last_print = start
    with EventLog(directory, node=NODE, segment_bytes=DEFAULT_SEGMENT_BYTES) as log:
        done = 0
        while done < total:
            n = min(BATCH, total - done)
            append(log, life.take(n))
            done += n
            now = clock()
            if now - start > max_seconds and done < total:
                raise SystemExit(f"building the log took more than {max_seconds:g} s; use --events")
            if now - last_print >= 5 or done == total:
                out(f"  built {fmt(done)} / {fmt(total)} records ({now - start:.1f} s)")
                last_print = now
    return clock() - start


def head_seq(directory: Path) -> int:
    from projections.sources import head_seq as head

    return head(directory)


# --- timing: seconds, lower is better ----------------------------------------------------


@dataclass
class Series:
    key: str
    label: str
    seconds: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.seconds)


@dataclass
class Report:
    """Runs of each variant in seconds: printed as they come, then medians, ranges, ratios, targets."""

    name: str
    params: dict[str, Any]
    series: dict[str, Series] = field(default_factory=dict)
    targets: list[tuple[str, str, float, str]] = field(default_factory=list)  # key, den, max, text

    def variant(self, key: str, label: str) -> None:
        self.series[key] = Series(key, label)

    def record(self, key: str, run: int, runs: int, seconds: float, detail: str = "") -> None:
        s = self.series[key]
        s.seconds.append(seconds)
        s.details.append(detail)
        note = f"  ({detail})" if detail else ""
        out(f"run {run}/{runs}  {key}  {s.label:<52} {_ms(seconds):>10}{note}")

    def ratio(self, num: str, den: str) -> float:
        a, b = self.series[num].median, self.series[den].median
        return a / b if b else float("nan")

    def finish(self, ratios: list[tuple[str, str]]) -> tuple[dict[str, Any], str]:
        """Print the table, the ratios and the target verdicts; return (JSON object, summary text)."""
        out()
        out(f"{'variant':<56} {'median':>10} {'min':>10} {'max':>10}  runs")
        for s in self.series.values():
            if s.seconds:
                out(
                    f"{s.key}  {s.label:<53} {_ms(s.median):>10} {_ms(min(s.seconds)):>10}"
                    f" {_ms(max(s.seconds)):>10}  {len(s.seconds):>4}"
                )
        ratio_values = {f"{a}/{b}": self.ratio(a, b) for a, b in ratios if self.series[b].seconds}
        if ratio_values:
            out("ratios of medians: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratio_values.items()))
        verdicts: dict[str, dict[str, Any]] = {}
        for key, den, limit, text in self.targets:
            if not self.series[key].seconds:
                continue
            got = self.ratio(key, den) if den else self.series[key].median
            met = got <= limit
            shown = f"{got:.2f}x" if den else _ms(got)
            out(f"target: {text}: {shown}: {'MET' if met else f'NOT MET ({got / limit:.2f}x of the limit)'}")
            verdicts[key] = {"text": text, "value": round(got, 4), "max": limit, "met": met}
        obj = {
            "params": self.params,
            "variants": {
                s.key: {
                    "label": s.label,
                    "runs": [round(x, 4) for x in s.seconds],
                    "details": s.details,
                    "median": round(s.median, 4),
                    "min": round(min(s.seconds), 4),
                    "max": round(max(s.seconds), 4),
                }
                for s in self.series.values()
                if s.seconds
            },
            "ratios": {k: round(v, 3) for k, v in ratio_values.items()},
            "targets": verdicts,
        }
        parts = [f"{s.key} {_ms(s.median)}" for s in self.series.values() if s.seconds]
        text = (
            "; ".join(parts)
            + "".join(f"; {k} {v:.2f}x" for k, v in ratio_values.items())
            + "".join(f"; {k} {'met' if v['met'] else 'NOT met'}" for k, v in verdicts.items())
        )
        return obj, text


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def timed_command(args: list[str]) -> float:
    """Wall seconds of a whole command, its output to /dev/null; raises if it fails."""
    start = clock()
    done = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    seconds = clock() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr.decode()[-2000:]}")
    return seconds


def output_lines(args: list[str]) -> int:
    done = subprocess.run(args, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr.decode()[-2000:]}")
    return done.stdout.count(b"\n")


def runs_of(runs: int, max_seconds: float) -> Iterator[int]:
    started = clock()
    for run in range(1, runs + 1):
        if run > 1 and clock() - started > max_seconds:
            out(f"stopping after {run - 1} runs: --max-seconds {max_seconds:g} reached")
            return
        yield run


# --- part 1: rebuild and catch-up ---------------------------------------------------------


def part_log(args: Any, base: Path) -> Report:
    data = base / "log-data"
    events = data / "events"
    life = Lifecycles()
    out(f"building a log of {fmt(args.events)} records in {events} ...")
    build_seconds = build_log(events, args.events, life, args.max_build_seconds)
    segments = list_segments(events)
    size = sum(s.stat().st_size for s in segments)
    out(
        f"built in {build_seconds:.1f} s: {len(segments)} segments, {size / 1e6:,.0f} MB, "
        f"{size / args.events:.0f} bytes/record, {life.tick:,} messages enqueued"
    )
    report = Report(
        "part 1, the log",
        {
            "runs": args.runs,
            "events": args.events,
            "catch_up": args.catch_up,
            "segments": len(segments),
            "log_mb": round(size / 1e6),
            "messages": life.tick,
            "build_seconds": round(build_seconds, 1),
        },
    )
    report.variant("r", f"rebuild of {fmt(args.events)} records (open+rebuild+close)")
    report.variant("c", f"catch_up() of {fmt(args.catch_up)} new records")
    report.variant("l", f"`spool list --limit 1`, {fmt(args.catch_up)} new records")
    report.variant("z", "`spool list --limit 1`, nothing new (reference)")
    report.targets = [
        ("r", "", REBUILD_TARGET, f"r <= {REBUILD_TARGET:g} s"),
        ("c", "", CATCH_UP_TARGET, f"c <= {CATCH_UP_TARGET * 1000:g} ms"),
        ("l", "", LIST_TARGET, f"l <= {LIST_TARGET * 1000:g} ms"),
    ]
    out()
    out(f"{report.name}: " + ", ".join(f"{k}={v}" for k, v in report.params.items()))
    command = [SPOOL, "--data-dir", str(data), "list", "--limit", "1"]
    with EventLog(events, node=NODE) as log:
        for run in runs_of(args.runs, args.max_seconds):
            # r: the whole rebuild
            db = data / "projections.duckdb"
            for p in (db, db.with_name(db.name + ".wal")):
                p.unlink(missing_ok=True)
            t0 = clock()
            with Projections.open(data) as proj:
                result = proj.rebuild()
            seconds = clock() - t0
            head = head_seq(events)
            if result.events != head:
                raise RuntimeError(f"rebuild applied {result.events} records, the log holds {head}")
            report.record(
                "r",
                run,
                args.runs,
                seconds,
                f"{fmt(result.events)} records, {db.stat().st_size / 1e6:.0f} MB file",
            )
            # c: catch-up of N new records (open and close not timed)
            append(log, life.take(args.catch_up))
            t0 = clock()
            proj = Projections.open(data)
            opened = clock() - t0
            try:
                t0 = clock()
                result = proj.catch_up()
                seconds = clock() - t0
            finally:
                t1 = clock()
                proj.close()
                closed = clock() - t1
            if result.events != args.catch_up:
                raise RuntimeError(f"catch-up applied {result.events} records, {args.catch_up} were appended")
            report.record("c", run, args.runs, seconds, f"open {_ms(opened)}, close {_ms(closed)}")
            # l: the whole command, N new records
            append(log, life.take(args.catch_up))
            report.record("l", run, args.runs, timed_command(command))
            # z: nothing new
            report.record("z", run, args.runs, timed_command(command))
    return report


# --- part 2: against Postfix ------------------------------------------------------------


def spool_ids(data: Path) -> list[str]:
    ids = []
    for entry in os.scandir(data / "spool"):
        if entry.is_dir() and len(entry.name) == 2:
            with os.scandir(entry.path) as it:
                ids += [e.name[:-5] for e in it if e.name.endswith(".json")]
    return sorted(ids)


class Daemon:
    """Appends what a delivery daemon would have appended between two commands."""

    def __init__(self, log: EventLog, ids: list[str]) -> None:
        self.log = log
        self.ids = ids
        self.next = 0

    def work(self, records: int) -> None:
        events: list[ev.Event] = []
        later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
        while len(events) < records:
            mid = self.ids[self.next % len(self.ids)]
            self.next += 1
            events.append(
                ev.DeliveryAttempted(
                    id=mid,
                    recipient=RECIPIENT,
                    result="deferred",
                    code=451,
                    response="4.3.0 busy",
                    host="sink",
                )
            )
            events.append(ev.MessageDeferred(id=mid, next_attempt_at=later, reason="4.3.0 busy"))
        self.log.append_many(events[:records], "delivery")


def part_postfix(args: Any, base: Path) -> Report:
    data = base / "spool-data"
    raw = smtp_source_like(4096)
    out(f"filling our spool with {fmt(args.messages)} messages (Spool.enqueue, 20 threads) ...")
    fill_ours = fill_spool(data, raw, args.messages, 20, args.max_fill_seconds)
    out(f"  {fill_ours:.1f} s ({args.messages / fill_ours:,.0f} messages/s)")
    ids = spool_ids(data)
    if len(ids) != args.messages:
        raise RuntimeError(f"the spool holds {len(ids)} messages after filling {args.messages}")
    ours_list = [SPOOL, "--data-dir", str(data), "list", "--json"]
    ours_summary = [SPOOL, "--data-dir", str(data), "summary"]
    t0 = clock()
    listed = output_lines(ours_list)  # also the first catch-up, not timed
    out(f"  first `spool list --json` (builds the projections): {clock() - t0:.2f} s, {fmt(listed)} lines")
    if listed != args.messages:
        raise RuntimeError(f"`spool list --json` printed {listed} lines for {args.messages} messages")
    report = Report(
        "part 2, against Postfix",
        {
            "runs": args.runs,
            "messages": args.messages,
            "daemon_events": args.daemon_events,
            "size": "4 KB (smtp-source -l 4096)",
        },
    )
    report.variant("a", f"`spool list --json`, {fmt(args.daemon_events)} new records")
    report.variant("b", "`postqueue -j` (Postfix, all held)")
    report.variant("s", f"`spool summary`, {fmt(args.daemon_events)} new records")
    report.variant("q", "`qshape hold` (Postfix)")
    report.targets = [
        ("a", "b", POSTFIX_RATIO_TARGET, f"a <= {POSTFIX_RATIO_TARGET:g}x b"),
        ("s", "q", POSTFIX_RATIO_TARGET, f"s <= {POSTFIX_RATIO_TARGET:g}x q"),
    ]
    with postfix_instance(port=free_port(), hold=True, base=str(base)) as pf:
        out(f"filling Postfix's hold queue with {fmt(args.messages)} messages (smtp-source) ...")
        fill_pf = run_smtp_source(pf.address, args.messages, timeout=args.max_fill_seconds)
        out(f"  {fill_pf:.1f} s ({args.messages / fill_pf:,.0f} messages/s)")
        if pf.held() != args.messages:
            raise RuntimeError(f"Postfix holds {pf.held()} messages after filling {args.messages}")
        postqueue = pf.postqueue_json_args()
        qshape = pf.qshape_args("hold")
        listed = output_lines(postqueue)
        if listed != args.messages:
            raise RuntimeError(f"`postqueue -j` printed {listed} lines for {args.messages} messages")
        out()
        out(f"{report.name}: " + ", ".join(f"{k}={v}" for k, v in report.params.items()))
        with EventLog(data / "events", node=NODE) as log:
            daemon = Daemon(log, ids)
            for run in runs_of(args.runs, args.max_seconds):
                daemon.work(args.daemon_events)
                report.record("a", run, args.runs, timed_command(ours_list))
                report.record("b", run, args.runs, timed_command(postqueue))
                daemon.work(args.daemon_events)
                report.record("s", run, args.runs, timed_command(ours_summary))
                report.record("q", run, args.runs, timed_command(qshape))
    report.params["fill_ours_per_s"] = round(args.messages / fill_ours)
    report.params["fill_postfix_per_s"] = round(args.messages / fill_pf)
    return report


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__.split("\n\n")[0],
        max_seconds=900.0,
        max_seconds_help="no new run of a part starts after its timed runs have taken this long",
    )
    p.add_argument(
        "--events", type=positive_int, default=1_000_000, help="records in the log (default 1000000)"
    )
    p.add_argument(
        "--catch-up", type=positive_int, default=1_000, help="new records a catch-up (default 1000)"
    )
    p.add_argument(
        "--messages", type=positive_int, default=100_000, help="messages in each queue (default 100000)"
    )
    p.add_argument(
        "--daemon-events",
        type=int,
        default=1_000,
        help="records appended before each timed spool command (default 1000; 0: none)",
    )
    p.add_argument("--skip-log", action="store_true", help="skip part 1 (rebuild, catch-up)")
    p.add_argument("--skip-postfix", action="store_true", help="skip part 2 (against Postfix)")
    p.add_argument("--max-build-seconds", type=float, default=900.0, help="bound on building the log")
    p.add_argument("--max-fill-seconds", type=float, default=1800.0, help="bound on filling each queue")
    args = p.parse_args(argv)
    if args.daemon_events < 0:
        p.error("--daemon-events must be 0 or more")

    out(provenance())
    parts: dict[str, dict[str, Any]] = {}
    texts: list[str] = []
    runs = 0
    with temp_dir(args.dir, "bench-projections-") as base:
        base.chmod(0o755)  # Postfix's user must reach its queue inside
        if not args.skip_log:
            report = part_log(args, base)
            parts["log"], text = report.finish([("l", "z")])
            texts.append(text)
            runs = max(runs, *(len(s.seconds) for s in report.series.values()))
            shutil.rmtree(base / "log-data", ignore_errors=True)
            out()
        if not args.skip_postfix:
            report = part_postfix(args, base)
            parts["postfix"], text = report.finish([("a", "b"), ("s", "q")])
            texts.append(text)
            runs = max(runs, *(len(s.seconds) for s in report.series.values()))
    out()
    if args.json:
        out(
            json.dumps(
                {"benchmark": "bench_projections", "unit": "seconds (lower is better)", "parts": parts}
            )
        )
    out(f"SUMMARY bench_projections: {'; '.join(texts)} (medians of {runs} runs)")


if __name__ == "__main__":
    main()
