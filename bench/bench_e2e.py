"""End to end: smtp-source -> server -> smtp-sink, all at once, for `spool serve` and for Postfix.

Variants, interleaved run by run, each run on a fresh server; one smtp-sink
(`smtp-sink -u nobody 127.0.0.1:SINKPORT 256`) is the relayhost of both:
  a  `spool serve --relayhost 127.0.0.1:SINKPORT`, every service running
     (the delivery worker has been up for 2 s when the clock starts)
  b  Postfix with relayhost = [127.0.0.1]:SINKPORT, nothing held

The load is `smtp-source -s 20 -l 4096 -m N -f bench@example.org -t
rcpt@example.net 127.0.0.1:PORT`. A run is timed from the start of
smtp-source until the queue is empty again (a: no sidecar left in
DATA/spool/NN/; b: maildrop, incoming, active, deferred and hold empty), so
the figure is messages accepted *and* delivered per second. The detail
gives the ingest rate alone (smtp-source's own time) and the CPU time the
server's processes used (utime + stime, reaped children included). Afterwards every
message must have been delivered (delivery log / maillog). If the queue
stops moving for 15 s with messages left, the run ends there, timed until
the queue last moved, and the line says how many messages were stranded.

    .venv/bin/python -m bench.bench_e2e [--runs 5] [--messages 20000]
"""

from __future__ import annotations

import time

from bench.common import Bench, clock, free_port, out, parser, positive_int
from bench.postfix import CpuMeter, postfix_instance, run_smtp_source, smtp_sink, smtp_source_args
from bench.serve import drain, provenance, spool_serve, wait_until

SETTLE = 2.0  # seconds between the delivery worker's start and the clock's


def run_ours(base: str | None, sink: str, messages: int, max_seconds: float) -> tuple[int, float, str, bool]:
    with spool_serve(relayhost=sink, delivery=True, base=base) as srv:
        if not wait_until(lambda: srv.worker_pids("delivery"), 30.0):
            raise RuntimeError("the delivery worker did not start")
        # Let the worker finish start-up (imports, its scan of the empty spool) before the
        # clock starts, as Postfix's queue manager has; mail arriving during that scan can
        # be missed by it (see BENCHMARKS.md).
        time.sleep(SETTLE)
        meter = CpuMeter(srv.pids)
        meter.start()
        start = clock()
        ingest = run_smtp_source(srv.address, messages, timeout=max_seconds)
        drain_start = clock()
        drained, left, cut = drain(srv.count, max(1.0, max_seconds - (clock() - start)))
        seconds = clock() - start if not left else drain_start - start + drained
        meter.stop()
        delivered = srv.finished().get("delivered", 0)
        restarts = srv.restarts()
    if not left and delivered != messages:
        raise RuntimeError(f"{delivered} of {messages} delivered")
    detail = f"ingest {messages / ingest:,.0f}/s, {meter.text(messages)}"
    detail += f", {left} stranded (queue stopped moving)" if left and not cut else ""
    if restarts:
        detail += f", {len(restarts)} worker restarts"
    return messages - left, seconds, detail, cut


def run_postfix(
    base: str | None, sink: str, messages: int, max_seconds: float
) -> tuple[int, float, str, bool]:
    with postfix_instance(port=free_port(), relayhost=sink, hold=False, base=base) as pf:
        meter = CpuMeter(pf.pids)
        meter.start()
        start = clock()
        ingest = run_smtp_source(pf.address, messages, timeout=max_seconds)
        drain_start = clock()
        drained, left, cut = drain(pf.count, max(1.0, max_seconds - (clock() - start)))
        seconds = clock() - start if not left else drain_start - start + drained
        meter.stop()
        sent = pf.sent()
    if not left and sent != messages:
        raise RuntimeError(f"Postfix sent {sent} of {messages}")
    detail = f"ingest {messages / ingest:,.0f}/s, {meter.text(messages)}"
    detail += f", {left} stranded (queue stopped moving)" if left and not cut else ""
    return messages - left, seconds, detail, cut


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], max_seconds=900.0, max_seconds_help="time bound of one run")
    p.add_argument("--messages", type=positive_int, default=20_000, help="messages per run (default 20000)")
    args = p.parse_args(argv)

    bench = Bench("bench_e2e", "messages/s", {"runs": args.runs, "messages": args.messages, "length": 4096})
    bench.variant("a", "smtp-source -> spool serve -> sink")
    bench.variant("b", "smtp-source -> Postfix -> sink")
    out(provenance())
    bench.header(
        "accepted and delivered, "
        + " ".join(smtp_source_args("127.0.0.1:PORT", args.messages))
        + " -> smtp-sink"
    )
    sink_port = free_port()
    sink = f"127.0.0.1:{sink_port}"
    with smtp_sink(sink_port):
        for run in range(1, args.runs + 1):
            count, seconds, detail, cut = run_ours(args.dir, sink, args.messages, args.max_seconds)
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


if __name__ == "__main__":
    main()
