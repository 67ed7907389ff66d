"""Delivery: N queued 4 KB messages to an smtp-sink on loopback, from `spool serve` and from Postfix.

Variants, interleaved run by run, each run on a fresh server; one smtp-sink
(`smtp-sink -u nobody 127.0.0.1:SINKPORT 256`) serves both as the relayhost:
  a  `spool serve --relayhost 127.0.0.1:SINKPORT`, delivery stopped while
     the spool is filled; the clock starts at `spool services start
     delivery` and stops when DATA/spool/NN/ holds no sidecar any more.
     Filling: Spool.enqueue from 20 threads in this process (--fill library,
     the default, fast), or smtp-source into the server (--fill smtp).
  b  Postfix with relayhost = [127.0.0.1]:SINKPORT, filled by smtp-source
     with every message held; the clock starts at `postsuper -H ALL;
     postqueue -f` and stops when maildrop, incoming, active, deferred and
     hold are empty.

Both clocks include getting going: for a, the CLI command, the supervisor
noticing it (it polls the log every 0.2 s), the delivery worker's start and
its scan of the spool; for b, postsuper moving N files and the queue
manager's scan. The queue is scanned every 0.25 s while more than 1,000
messages are left, then every 0.05 s; a queue that stops moving for 15 s
with messages left ends the run: it is timed until the queue last moved, and
the line says how many messages were stranded. Otherwise every message must
have been delivered (a: `finished: delivered` lines of the delivery log; b:
`status=sent` lines of the maillog). Each run line also gives the CPU time
the server's processes used while draining (utime + stime from /proc,
reaped children included; for b that includes postsuper's and postqueue's
work done by the daemons, not the two commands themselves).

With --profile DIR, one more run of a (not counted) is made with py-spy
recording the delivery worker; the raw profile and its summary go to DIR.

    .venv/bin/python -m bench.bench_delivery [--runs 5] [--messages 20000] [--fill library|smtp]
"""

from __future__ import annotations

from pathlib import Path

from bench import pyspy
from bench.common import Bench, clock, free_port, out, parser, positive_int
from bench.postfix import CpuMeter, postfix_instance, run_smtp_source, smtp_sink
from bench.serve import Server, drain, provenance, smtp_source_like, spool_serve, wait_until


def fill_ours(srv: Server, messages: int, how: str, max_seconds: float) -> float:
    if how == "smtp":
        seconds = run_smtp_source(srv.address, messages, timeout=max_seconds)
    else:
        seconds = srv.fill_library(smtp_source_like(4096), messages, threads=20, max_seconds=max_seconds)
    stored = srv.count()
    if stored != messages:
        raise RuntimeError(f"the spool holds {stored} messages after filling {messages}")
    return seconds


def run_ours(
    base: str | None,
    sink: str,
    messages: int,
    fill: str,
    max_seconds: float,
    profile: Path | None = None,
    mode: str = "gil",
) -> tuple[int, float, str, bool]:
    with spool_serve(relayhost=sink, delivery=False, base=base) as srv:
        fill_seconds = fill_ours(srv, messages, fill, max_seconds)
        meter = CpuMeter(srv.pids)
        meter.start()
        start = clock()
        srv.start_delivery()
        if profile is None:
            drain_start = clock()
            drained, left, cut = drain(srv.count, max_seconds)
            started = 0.0
        else:
            if not wait_until(lambda: srv.worker_pids("delivery"), 30.0, 0.01):
                raise RuntimeError("the delivery worker did not start")
            started = clock() - start
            raw = profile / f"delivery-worker-{mode}.txt"
            with pyspy.record(srv.worker_pids("delivery")[0], raw, mode=mode):
                drain_start = clock()
                drained, left, cut = drain(srv.count, max_seconds)
            summary = pyspy.summarize(raw)
            raw.with_suffix(".summary.txt").write_text(summary + "\n")
            out(summary)
        end = clock()
        meter.stop()
        # cut short: timed until the queue last moved (drain() measured from its own start)
        seconds = end - start if not left else drain_start - start + drained
        finished = srv.finished()
        restarts = srv.restarts()
    delivered = finished.get("delivered", 0)
    if not left and delivered != messages:
        raise RuntimeError(f"{delivered} of {messages} delivered; outcomes {finished}")
    detail = f"{meter.text(messages)}, fill {messages / fill_seconds:,.0f}/s by {fill}"
    if started:
        detail += f", worker up after {started:.2f} s"
    if restarts:
        detail += f", {len(restarts)} worker restarts"
    detail += f", {left} stranded (queue stopped moving)" if left and not cut else ""
    return messages - left, seconds, detail, cut


def run_postfix(
    base: str | None, sink: str, messages: int, max_seconds: float
) -> tuple[int, float, str, bool]:
    with postfix_instance(port=free_port(), relayhost=sink, hold=True, base=base) as pf:
        fill_seconds = run_smtp_source(pf.address, messages, timeout=max_seconds)
        if pf.held() != messages:
            raise RuntimeError(f"Postfix holds {pf.held()} messages after filling {messages}")
        meter = CpuMeter(pf.pids)
        meter.start()
        start = clock()
        pf.release_held()
        pf.flush()
        drain_start = clock()
        drained, left, cut = drain(pf.count, max_seconds)
        seconds = clock() - start if not left else drain_start - start + drained
        meter.stop()
        sent = pf.sent()
    if not left and sent != messages:
        raise RuntimeError(f"Postfix sent {sent} of {messages}")
    detail = f"{meter.text(messages)}, fill {messages / fill_seconds:,.0f}/s by smtp-source"
    detail += f", {left} stranded (queue stopped moving)" if left and not cut else ""
    return messages - left, seconds, detail, cut


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], max_seconds=900.0, max_seconds_help="time bound of one delivery run")
    p.add_argument("--messages", type=positive_int, default=20_000, help="messages per run (default 20000)")
    p.add_argument(
        "--fill",
        choices=("library", "smtp"),
        default="library",
        help="how our spool is filled: Spool.enqueue from 20 threads (default) or smtp-source",
    )
    p.add_argument("--profile", type=Path, default=None, help="also profile the delivery worker into DIR")
    p.add_argument("--profile-mode", choices=("gil", "wall"), default="gil", help="py-spy mode (default gil)")
    args = p.parse_args(argv)

    bench = Bench(
        "bench_delivery",
        "messages/s",
        {
            "runs": args.runs,
            "messages": args.messages,
            "fill": args.fill,
            "size": "4 KB (smtp-source -l 4096)",
        },
    )
    bench.variant("a", "spool serve delivery")
    bench.variant("b", "Postfix (postsuper -H; postqueue -f)")
    out(provenance())
    bench.header(f"{args.messages} queued messages to smtp-sink on loopback (relayhost)")
    sink_port = free_port()
    sink = f"127.0.0.1:{sink_port}"
    with smtp_sink(sink_port):
        for run in range(1, args.runs + 1):
            count, seconds, detail, cut = run_ours(args.dir, sink, args.messages, args.fill, args.max_seconds)
            bench.record("a", run, args.runs, count, seconds, detail, cut_short=cut)
            count, seconds, detail, cut = run_postfix(args.dir, sink, args.messages, args.max_seconds)
            bench.record("b", run, args.runs, count, seconds, detail, cut_short=cut)
        out()
        bench.finish(
            ratios=[("a", "b")],
            target_key="a",
            target=bench.variants["b"].median,
            as_json=args.json,
            extra={"target_rule": "a >= 1.0x the median of b (Postfix) in the same run"},
        )
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            out()
            out(f"profile run (not counted): py-spy on the delivery worker, raw profile in {args.profile}")
            count, seconds, detail, _ = run_ours(
                args.dir, sink, args.messages, args.fill, args.max_seconds, args.profile, args.profile_mode
            )
            out(f"profiled run: {count / seconds:,.0f} messages/s ({count} in {seconds:.3f} s, {detail})")


if __name__ == "__main__":
    main()
