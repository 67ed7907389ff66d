"""Disk syncs per acknowledged message at SMTP ingest: `spool serve` against Postfix.

Not a speed figure: the count of the system calls that wait for the disk,
which explains the ingest figure of bench_ingest on a given machine. Each
side takes the same `smtp-source -s 20 -l 4096 -m N` load as in
bench_ingest (ours with delivery stopped, Postfix with every message held),
with `strace -f -c` attached to the processes that store mail (our SMTP
workers; Postfix's master, followed into every smtpd and cleanup it forks).
Per message, it prints the calls that make data durable (fsync, fdatasync,
syncfs, sync_file_range), the renames and the file creations (openat with
O_CREAT cannot be told apart by strace -c, so all openat calls are counted).

It also says whether the file system under --dir has a journal: without
one, every fsync writes its inode and data blocks on its own, and a sync
count is close to a count of device round trips.

    .venv/bin/python -m bench.bench_syncs [--messages 2000] [--dir /tmp]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import DEFAULT_BASE, free_port, out, parser, positive_int, temp_dir
from bench.postfix import postfix_instance, run_smtp_source
from bench.serve import spool_serve

SYNC_CALLS = ("fsync", "fdatasync", "syncfs", "sync_file_range")
TRACED = (*SYNC_CALLS, "rename", "renameat", "renameat2", "openat", "flock")
ATTACH_SECONDS = 1.0  # strace needs a moment to attach before the load starts
ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """{syscall: calls} from the table `strace -c` writes."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = calls.get(m.group(2), 0) + int(m.group(1))
    return calls


@contextmanager
def traced(pids: list[int], workdir: Path) -> Iterator[Callable[[], dict[str, int]]]:
    """strace -f -c on each pid; the yielded function stops them and sums their tables."""
    procs = []
    outputs = []
    for pid in pids:
        output = workdir / f"strace.{pid}"
        outputs.append(output)
        args = ["strace", "-f", "-c", "-o", str(output), "-e", "trace=" + ",".join(TRACED), "-p", str(pid)]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(ATTACH_SECONDS)

    def stop() -> dict[str, int]:
        for p in procs:
            p.send_signal(signal.SIGINT)
        total: dict[str, int] = {}
        for p, output in zip(procs, outputs, strict=True):
            p.wait(timeout=30)
            for name, n in parse_strace_summary(output.read_text()).items():
                total[name] = total.get(name, 0) + n
        return total

    try:
        yield stop
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def journal_of(path: str) -> str:
    """'yes', 'no' or 'unknown': whether the ext4 file system holding `path` has a journal."""
    dev = os.stat(path).st_dev
    try:
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        task = Path(f"/sys/fs/ext4/{name}/journal_task").read_text().strip()
    except OSError:
        return "unknown"
    return "no" if task == "<none>" else "yes"


def per_message(calls: dict[str, int], messages: int) -> dict[str, float]:
    syncs = sum(calls.get(c, 0) for c in SYNC_CALLS)
    renames = sum(calls.get(c, 0) for c in ("rename", "renameat", "renameat2"))
    return {
        "syncs": syncs / messages,
        "fsync": calls.get("fsync", 0) / messages,
        "fdatasync": calls.get("fdatasync", 0) / messages,
        "renames": renames / messages,
        "openat": calls.get("openat", 0) / messages,
        "flock": calls.get("flock", 0) / messages,
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], runs=1, max_seconds=300.0)
    p.add_argument("--messages", type=positive_int, default=2_000, help="messages a side (default 2000)")
    args = p.parse_args(argv)
    if shutil.which("strace") is None:
        p.error("strace is not installed (apt-get install strace)")
    base = args.dir or DEFAULT_BASE
    results: dict[str, list[dict[str, float]]] = {"spool serve": [], "Postfix": []}
    out(
        f"bench_syncs: smtp-source -s 20 -l 4096 -m {args.messages}; file system under {base}: journal {journal_of(base)}"
    )
    for run in range(1, args.runs + 1):
        with temp_dir(args.dir, "bench-syncs-") as work:
            with spool_serve(delivery=False, base=args.dir) as srv:
                with traced(srv.worker_pids("smtp"), work) as stop:
                    run_smtp_source(srv.address, args.messages, timeout=args.max_seconds)
                    calls = stop()
                if srv.count() != args.messages:
                    raise RuntimeError(f"the spool holds {srv.count()} messages, not {args.messages}")
            results["spool serve"].append(per_message(calls, args.messages))
            with postfix_instance(port=free_port(), hold=True, base=args.dir) as pf:
                master = pf.master_pid()
                if master is None:
                    raise RuntimeError("Postfix's master is not running")
                with traced([master], work) as stop:
                    run_smtp_source(pf.address, args.messages, timeout=args.max_seconds)
                    calls = stop()
                if pf.held() != args.messages:
                    raise RuntimeError(f"Postfix holds {pf.held()} messages, not {args.messages}")
            results["Postfix"].append(per_message(calls, args.messages))
        for side, runs in results.items():
            r = runs[-1]
            out(
                f"run {run}/{args.runs}  {side:<12} per message: {r['syncs']:.2f} syncs "
                f"(fsync {r['fsync']:.2f}, fdatasync {r['fdatasync']:.2f}), {r['renames']:.2f} renames, "
                f"{r['openat']:.2f} openat, {r['flock']:.2f} flock"
            )
    last = {side: runs[-1] for side, runs in results.items()}
    ratio = (
        last["spool serve"]["syncs"] / last["Postfix"]["syncs"] if last["Postfix"]["syncs"] else float("nan")
    )
    out(
        f"SUMMARY bench_syncs: syncs per message: spool serve {last['spool serve']['syncs']:.2f}, "
        f"Postfix {last['Postfix']['syncs']:.2f} ({ratio:.1f}x); journal {journal_of(base)}"
    )
    if args.json:
        out(
            json.dumps(
                {
                    "bench": "bench_syncs",
                    "messages": args.messages,
                    "journal": journal_of(base),
                    "runs": results,
                }
            )
        )


if __name__ == "__main__":
    main()
