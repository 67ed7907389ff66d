"""SMTP ingest: smtp-source into `spool serve` (delivery stopped) and into Postfix (queue held).

Variants, interleaved run by run, each run on a fresh server:
  a  `spool serve` in a fresh data directory, its delivery service stopped
     before it starts (so messages only pile up in the spool)
  b  Debian's Postfix in a fresh temporary instance, every message held as
     it arrives (smtpd_data_restrictions = check_client_access static:HOLD:
     cleanup writes straight to hold/, the queue manager never touches it)

The load is the same for both: `smtp-source -s 20 -l 4096 -m N -f
bench@example.org -t rcpt@example.net 127.0.0.1:PORT`, 20 parallel sessions,
one connection a message. A run is timed from the start of smtp-source to its
exit, i.e. until the last 250 (both servers answer 250 only once a message is
durable); afterwards the spool, or hold/, must hold exactly N messages.
Each run line also gives the CPU time the server's processes used during
the run (utime + stime from /proc, reaped children included), in total and
per message: on a noisy machine that figure moves much less than the rate.

With --profile DIR, one more run of a (not counted) is made with py-spy
recording one SMTP worker; the raw profile and its summary go to DIR.

    .venv/bin/python -m bench.bench_ingest [--runs 5] [--messages 20000] [--sessions 20]
"""

from __future__ import annotations

from pathlib import Path

from bench import pyspy
from bench.common import Bench, free_port, out, parser, positive_int
from bench.postfix import CpuMeter, postfix_instance, run_smtp_source, smtp_source_args
from bench.serve import provenance, spool_serve

TARGET_RATIO = 1.0  # at least Postfix's messages/s


def run_ours(
    base: str | None,
    messages: int,
    sessions: int,
    max_seconds: float,
    profile: Path | None = None,
    mode: str = "gil",
) -> tuple[int, float, str]:
    with spool_serve(delivery=False, base=base) as srv:
        meter = CpuMeter(srv.pids)
        meter.start()
        if profile is None:
            seconds = run_smtp_source(srv.address, messages, sessions=sessions, timeout=max_seconds)
        else:
            pid = srv.worker_pids("smtp")[0]
            raw = profile / f"ingest-smtp-worker-{mode}.txt"
            with pyspy.record(pid, raw, mode=mode):
                seconds = run_smtp_source(srv.address, messages, sessions=sessions, timeout=max_seconds)
            summary = pyspy.summarize(raw)
            raw.with_suffix(".summary.txt").write_text(summary + "\n")
            out(summary)
        meter.stop()
        stored = srv.count()
        restarts = srv.restarts()
    if stored != messages:
        raise RuntimeError(f"the spool holds {stored} messages, smtp-source sent {messages}")
    detail = meter.text(messages) + (f", {len(restarts)} worker restarts" if restarts else "")
    return stored, seconds, detail


def run_postfix(base: str | None, messages: int, sessions: int, max_seconds: float) -> tuple[int, float, str]:
    with postfix_instance(port=free_port(), hold=True, base=base) as pf:
        meter = CpuMeter(pf.pids)
        meter.start()
        seconds = run_smtp_source(pf.address, messages, sessions=sessions, timeout=max_seconds)
        meter.stop()
        held = pf.held()
    if held != messages:
        raise RuntimeError(f"Postfix holds {held} messages, smtp-source sent {messages}")
    return held, seconds, meter.text(messages)


def main(argv: list[str] | None = None) -> None:
    p = parser(
        __doc__.split("\n\n")[0], max_seconds=900.0, max_seconds_help="time bound of one smtp-source run"
    )
    p.add_argument("--messages", type=positive_int, default=20_000, help="messages per run (default 20000)")
    p.add_argument("--sessions", type=positive_int, default=20, help="smtp-source -s (default 20)")
    p.add_argument(
        "--profile", type=Path, default=None, help="also profile one SMTP worker (py-spy) into DIR"
    )
    p.add_argument(
        "--profile-mode",
        choices=("gil", "wall"),
        default="gil",
        help="gil: Python CPU time (py-spy --gil, default); wall: every thread (--idle)",
    )
    args = p.parse_args(argv)

    bench = Bench(
        "bench_ingest",
        "messages/s",
        {"runs": args.runs, "messages": args.messages, "sessions": args.sessions, "length": 4096},
    )
    bench.variant("a", "spool serve (delivery stopped)")
    bench.variant("b", "Postfix (queue held)")
    out(provenance())
    bench.header("SMTP ingest, " + " ".join(smtp_source_args("127.0.0.1:PORT", args.messages, args.sessions)))
    for run in range(1, args.runs + 1):
        count, seconds, detail = run_ours(args.dir, args.messages, args.sessions, args.max_seconds)
        bench.record("a", run, args.runs, count, seconds, detail)
        count, seconds, detail = run_postfix(args.dir, args.messages, args.sessions, args.max_seconds)
        bench.record("b", run, args.runs, count, seconds, detail)
    target = bench.variants["b"].median * TARGET_RATIO
    out()
    bench.finish(
        ratios=[("a", "b")],
        target_key="a",
        target=target,
        as_json=args.json,
        extra={"target_rule": "a >= 1.0x the median of b (Postfix) in the same run"},
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        out()
        out(f"profile run (not counted): py-spy on one SMTP worker, raw profile in {args.profile}")
        count, seconds, _ = run_ours(
            args.dir, args.messages, args.sessions, args.max_seconds, args.profile, args.profile_mode
        )
        out(f"profiled run: {count / seconds:,.0f} messages/s ({count} in {seconds:.3f} s)")


if __name__ == "__main__":
    main()
