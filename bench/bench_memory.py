"""Memory: the RSS of `spool serve`'s processes while it delivers N queued messages; Postfix alongside.

Targets (issue 4): with 100,000 messages queued and delivery running, the
delivery worker's RSS <= 150 MB and all of `spool serve`'s processes
together <= 300 MB.

Variants, interleaved run by run, each run on a fresh server; one smtp-sink
is the relayhost of both:
  a  `spool serve`: the spool is filled with N 4 KB messages through
     Spool.enqueue (20 threads) while delivery is stopped, then
     `spool services start delivery`, until the spool is empty
  b  Postfix: filled by smtp-source with every message held, then
     `postsuper -H ALL; postqueue -f`, until the queue is empty (for
     comparison; Postfix has no target here)

While the queue drains, every --interval seconds the script reads VmRSS
from /proc/PID/status of the supervisor (Postfix: master) and of every
process under it, and keeps the largest sum seen and the largest RSS of the
delivery worker (Postfix: qmgr, its scheduler). VmHWM (the kernel's own
high-water mark) of the delivery worker is read at the end too, so a peak
between two samples is not missed. RSS counts shared pages in every
process, so the sum is an upper bound of the memory used; the sum of PSS
(shared pages divided among their sharers, from smaps_rollup) is printed
too. The delivery rate
of the run is printed as a side figure.

A full run at 100,000 messages fills for minutes on each side; --messages
scales it down (the figures say what was run). --runs defaults to 1 here:
memory, unlike throughput, barely changes from run to run.

    .venv/bin/python -m bench.bench_memory [--runs 1] [--messages 100000] [--interval 1.0] [--no-postfix]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import clock, fmt, free_port, median, out, parser, positive_float, positive_int
from bench.postfix import postfix_instance, proc_name, rss_kb, run_smtp_source, smtp_sink
from bench.serve import provenance, smtp_source_like, spool_serve, wait_until

STALL = 60.0  # seconds without progress that end a run (messages stranded)
WORKER_TARGET_MB = 150.0
TOTAL_TARGET_MB = 300.0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pss_kb(pid: int) -> int:
    """Pss from /proc/PID/smaps_rollup: shared pages divided among the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Sampled:
    """Peaks of one run, in MB."""

    messages: int
    seconds: float
    before_total: float = 0.0
    peak_total: float = 0.0
    peak_pss: float = 0.0
    peak_worker: float = 0.0
    worker_hwm: float = 0.0
    peak_processes: int = 0
    samples: int = 0
    cut_short: bool = False
    by_process: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        parts = [
            f"peak total RSS {self.peak_total:,.1f} MB over {self.peak_processes} processes"
            f" (PSS {self.peak_pss:,.1f} MB)",
            f"scheduler/delivery peak {self.peak_worker:,.1f} MB (VmHWM {self.worker_hwm:,.1f} MB)",
            f"before start {self.before_total:,.1f} MB",
            f"{fmt(self.messages / self.seconds if self.seconds else 0)} messages/s delivered",
            f"{self.samples} samples",
        ]
        return ", ".join(parts) + (
            "  [cut short: --max-seconds, or the queue stopped moving]" if self.cut_short else ""
        )


def sample_until_empty(
    pids: Callable[[], list[int]],
    worker: Callable[[], int],
    count: Callable[[], int],
    interval: float,
    max_seconds: float,
) -> Sampled:
    """Sample RSS until count() is 0 (or max_seconds, or STALL s without progress); return the peaks."""
    start = clock()
    deadline = start + max_seconds
    s = Sampled(0, 0.0)
    left = count()
    next_count = start
    moved, last_left = start, left
    while True:
        ps = pids()
        rss = {p: rss_kb(p) for p in ps}
        total = sum(rss.values()) / 1024
        s.peak_pss = max(s.peak_pss, sum(_pss_kb(p) for p in ps) / 1024)
        if total > s.peak_total:
            s.peak_total = total
            s.peak_processes = len(ps)
            s.by_process = {}
            for p, kb in rss.items():
                key = proc_name(p)
                s.by_process[key] = s.by_process.get(key, 0.0) + kb / 1024
        w = worker()
        if w:
            s.peak_worker = max(s.peak_worker, rss.get(w, rss_kb(w)) / 1024)
            s.worker_hwm = max(s.worker_hwm, _hwm_kb(w) / 1024)
        s.samples += 1
        now = clock()
        if now >= next_count:  # a queue scan costs more than a sample: at most every 0.25 s
            left = count()
            next_count = now + 0.25
            if left != last_left:
                moved, last_left = now, left
        if not left or now > deadline or now - moved > STALL:
            break
        time.sleep(interval)
    s.seconds = clock() - start
    s.cut_short = bool(left)
    return s


def run_ours(base: str | None, sink: str, messages: int, interval: float, max_seconds: float) -> Sampled:
    with spool_serve(relayhost=sink, delivery=False, base=base) as srv:
        fill = srv.fill_library(smtp_source_like(4096), messages, threads=20, max_seconds=max_seconds)
        out(f"  a: filled {fmt(messages)} in {fill:.1f} s ({fmt(messages / fill)}/s)")
        before = sum(rss_kb(p) for p in srv.pids()) / 1024
        srv.start_delivery()
        if not wait_until(lambda: srv.worker_pids("delivery"), 30.0, 0.01):
            raise RuntimeError("the delivery worker did not start")

        def worker() -> int:
            w = srv.worker_pids("delivery")
            return w[0] if w else 0

        s = sample_until_empty(srv.pids, worker, srv.count, interval, max_seconds)
        s.before_total = before
        s.messages = messages - srv.count()
        restarts = srv.restarts()
    if restarts:
        out(f"  a: {len(restarts)} worker restarts: {restarts[:3]}")
    return s


def run_postfix(base: str | None, sink: str, messages: int, interval: float, max_seconds: float) -> Sampled:
    with postfix_instance(port=free_port(), relayhost=sink, hold=True, base=base) as pf:
        fill = run_smtp_source(pf.address, messages, timeout=max_seconds)
        out(f"  b: filled {fmt(messages)} in {fill:.1f} s ({fmt(messages / fill)}/s)")
        before = sum(rss_kb(p) for p in pf.pids()) / 1024
        pf.release_held()
        pf.flush()

        def qmgr() -> int:
            return next((p for p in pf.pids() if _comm(p) == "qmgr"), 0)

        s = sample_until_empty(pf.pids, qmgr, pf.count, interval, max_seconds)
        s.before_total = before
        s.messages = messages - pf.count()
    return s


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__.split("\n\n")[0], runs=1, max_seconds=3600.0, max_seconds_help="time bound of one drain"
    )
    p.add_argument("--messages", type=positive_int, default=100_000, help="messages queued (default 100000)")
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--no-postfix", action="store_true", help="measure spool serve only")
    args = p.parse_args(argv)

    out(f"bench_memory: RSS while delivering {fmt(args.messages)} queued 4 KB messages to smtp-sink")
    out(f"parameters: runs={args.runs}, messages={args.messages}, interval={args.interval}")
    out(provenance())
    out()
    ours: list[Sampled] = []
    theirs: list[Sampled] = []
    sink_port = free_port()
    sink = f"127.0.0.1:{sink_port}"
    with smtp_sink(sink_port):
        for run in range(1, args.runs + 1):
            s = run_ours(args.dir, sink, args.messages, args.interval, args.max_seconds)
            ours.append(s)
            out(f"run {run}/{args.runs}  a  spool serve   {s.line()}")
            out(
                "      a peak RSS by process (MB, summed by name): "
                + ", ".join(f"{k} {v:.1f}" for k, v in s.by_process.items())
            )
            if not args.no_postfix:
                s = run_postfix(args.dir, sink, args.messages, args.interval, args.max_seconds)
                theirs.append(s)
                out(f"run {run}/{args.runs}  b  Postfix       {s.line()}")
                top = sorted(s.by_process.items(), key=lambda kv: -kv[1])[:6]
                out("      b peak by process name (MB, summed): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    worker = median([max(s.peak_worker, s.worker_hwm) for s in ours])
    total = median([s.peak_total for s in ours])
    pss = median([s.peak_pss for s in ours])
    out()
    worker_met = "met" if worker <= WORKER_TARGET_MB else "NOT met"
    total_met = "met" if total <= TOTAL_TARGET_MB else "NOT met"
    out(
        f"delivery worker peak RSS (max of samples and VmHWM), median: {worker:,.1f} MB;"
        f" target <= {WORKER_TARGET_MB:g} MB: {worker_met}"
    )
    out(
        f"all spool serve processes, peak sum, median: RSS {total:,.1f} MB (PSS {pss:,.1f} MB);"
        f" target <= {TOTAL_TARGET_MB:g} MB (RSS): {total_met}"
    )
    if theirs:
        pf_total = median([s.peak_total for s in theirs])
        pf_pss = median([s.peak_pss for s in theirs])
        pf_qmgr = median([max(s.peak_worker, s.worker_hwm) for s in theirs])
        out(
            f"Postfix, peak sum of all processes, median: RSS {pf_total:,.1f} MB, PSS {pf_pss:,.1f} MB;"
            f" qmgr peak {pf_qmgr:,.1f} MB"
        )
    if args.json:
        obj = {
            "benchmark": "bench_memory",
            "unit": "MB",
            "params": {"runs": args.runs, "messages": args.messages, "interval": args.interval},
            "ours": [s.__dict__ for s in ours],
            "postfix": [s.__dict__ for s in theirs],
            "targets": {
                "worker_mb": WORKER_TARGET_MB,
                "worker_median": round(worker, 1),
                "worker_met": worker <= WORKER_TARGET_MB,
                "total_mb": TOTAL_TARGET_MB,
                "total_median": round(total, 1),
                "total_met": total <= TOTAL_TARGET_MB,
            },
        }
        out(json.dumps(obj))
    out(
        f"SUMMARY bench_memory: {fmt(args.messages)} queued; delivery worker peak {worker:,.1f} MB"
        f" (target <= {WORKER_TARGET_MB:g}: {'met' if worker <= WORKER_TARGET_MB else 'NOT met'});"
        f" all spool serve processes {total:,.1f} MB (target <= {TOTAL_TARGET_MB:g}:"
        f" {'met' if total <= TOTAL_TARGET_MB else 'NOT met'})"
        + (f"; Postfix all processes {median([s.peak_total for s in theirs]):,.1f} MB" if theirs else "")
    )


if __name__ == "__main__":
    main()
