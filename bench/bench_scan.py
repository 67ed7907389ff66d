"""The cost of scanning: SMTP ingest through `spool serve` with clamd and spamd on, and off.

Variants, interleaved run by run, each run on a fresh `spool serve` (its
delivery service stopped before it starts, so messages only pile up):
  a  scanning on: `[scan] enabled = true`, clamd and spamd on loopback;
     every message is relayed from 127.0.0.1 (a trusted network), so every
     message is scanned by both, concurrently, before its 250
  b  scanning off: the same server and load, `[scan] enabled = false`
and, to show where the time goes, the scanners alone (no SMTP, no spool),
with the same concurrency, through our own clients, sending the very
message smtp-source sent in run a, as the server stored it:
  c  spamd alone: SYMBOLS round trips, 20 in flight
  d  clamd alone: INSTREAM round trips, 20 in flight

The load for a and b: `smtp-source -s 20 -l 4096 -m N -f bench@example.org
-t rcpt@example.net 127.0.0.1:PORT`, timed from its start to its exit (the
last 250); afterwards the spool must hold exactly N messages (a 451 from a
scanner timeout would show as a shortfall). clamd loads only the project's
test signature (tests/data/); spamd runs with its package's rules, -L.
Everything is on loopback; every run is bounded by --max-seconds.

    .venv/bin/python -m bench.bench_scan [--runs 5] [--messages 600] [--plain-messages 4000]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import Bench, clock, out, parser, positive_int, temp_dir

ROOT = Path(__file__).resolve().parent.parent
SPOOL = str(Path(sys.executable).parent / "spool")
SIGNATURES = ROOT / "tests" / "data"
SENDER, RECIPIENT = "bench@example.org", "rcpt@example.net"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"bench_scan: {name} not found; apt-get install {package} (`make system-deps`)")
    return path


def wait_for(probe, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = clock() + START_TIMEOUT
    while not probe():
        if proc.poll() is not None or clock() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    elif proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)


def answers(port: int, request: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            if request:
                sock.sendall(request)
            return expect in sock.recv(128)
    except OSError:
        return False


# --- the scanners -----------------------------------------------------------------------


@contextlib.contextmanager
def scanners(base: str | None, spamd_children: int) -> Iterator[tuple[str, str]]:
    """clamd and spamd on free loopback ports, for the whole benchmark; yields their addresses."""
    clamd_bin, spamd_bin = binary("clamd", "clamav-daemon"), binary("spamd", "spamd")
    with temp_dir(base, "bench-scan-peers-") as work:
        work.chmod(0o711)
        (work / "db").mkdir()
        for f in SIGNATURES.glob("*.ndb"):
            shutil.copy(f, work / "db" / f.name)
        (work / "tmp").mkdir()
        home = work / "home"
        home.mkdir()
        cport, sport = free_port(), free_port()
        (work / "clamd.conf").write_text(
            f"Foreground true\nTCPSocket {cport}\nTCPAddr 127.0.0.1\nDatabaseDirectory {work}/db\n"
            f"TemporaryDirectory {work}/tmp\nScanMail true\nSelfCheck 0\nBytecode false\nMaxThreads 20\n"
        )
        spamd_argv = [spamd_bin, "-i", "127.0.0.1", "-p", str(sport), "-A", "127.0.0.1", "-L", "-x"]
        if os.geteuid() == 0:
            os.chown(home, 65534, 65534)
            spamd_argv += ["-u", "nobody", "-g", "nogroup"]
        spamd_argv += [
            f"--helper-home-dir={home}",
            f"--max-children={spamd_children}",
            f"--min-children={spamd_children}",
            "--syslog=stderr",
        ]
        clog, slog = work / "clamd.log", work / "spamd.log"
        with open(clog, "wb") as c, open(slog, "wb") as s:
            clamd_proc = subprocess.Popen(
                [clamd_bin, "--config-file", str(work / "clamd.conf")], stdout=c, stderr=c
            )
            spamd_proc = subprocess.Popen(spamd_argv, stdout=s, stderr=s)
        try:
            wait_for(lambda: answers(cport, b"zPING\0", b"PONG"), clamd_proc, "clamd", clog)
            wait_for(lambda: answers(sport, b"PING SPAMC/1.5\r\n\r\n", b"PONG"), spamd_proc, "spamd", slog)
            yield f"127.0.0.1:{cport}", f"127.0.0.1:{sport}"
        finally:
            stop(spamd_proc)
            stop(clamd_proc)


# --- spool serve ----------------------------------------------------------------------


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:port (one per SMTP worker, SO_REUSEPORT)."""
    needle = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f if (p := line.split())[1] == needle and p[3] == "0A")


@contextlib.contextmanager
def spool_serve(base: str | None, config: str) -> Iterator[tuple[str, Path]]:
    """A fresh `spool serve` (delivery stopped) with `config`; yields (address, data dir)."""
    with temp_dir(base, "bench-scan-serve-") as root:
        data, port = root / "data", free_port()
        (root / "spool.toml").write_text(config)
        subprocess.run(
            [SPOOL, "--data-dir", str(data), "services", "stop", "delivery"], check=True, capture_output=True
        )
        argv = [SPOOL, "--config", str(root / "spool.toml"), "--data-dir", str(data), "serve"]
        argv += ["--smtp", f"127.0.0.1:{port}", "--mynetworks", "127.0.0.0/8"]
        log = root / "serve.out"
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            workers = os.cpu_count() or 1
            wait_for(
                lambda: listeners(port) >= workers and answers(port, b"", b"220"), proc, "spool serve", log
            )
            yield f"127.0.0.1:{port}", data
        finally:
            stop(proc, group=True)


def spooled(data: Path) -> int:
    spool = data / "spool"
    return sum(
        len([n for n in os.listdir(d) if n.endswith(".json")]) for d in spool.iterdir() if len(d.name) == 2
    )


def run_ingest(
    base: str | None, config: str, messages: int, sessions: int, max_seconds: float
) -> tuple[int, float, bytes]:
    """One smtp-source run; returns (messages stored, seconds, one stored message as received)."""
    source = binary("smtp-source", "postfix")
    with spool_serve(base, config) as (address, data):
        argv = [source, "-s", str(sessions), "-l", "4096", "-m", str(messages), "-f", SENDER, "-t", RECIPIENT]
        start = clock()
        done = subprocess.run(
            [*argv, address], capture_output=True, text=True, timeout=max_seconds, check=False
        )
        seconds = clock() - start
        stored = spooled(data)
        unavailable = sum(
            line.count('"type":"scanner_unavailable"')
            for seg in (data / "events").glob("*.jsonl")
            for line in seg.read_text().splitlines()
        )
        sample = next((data / "spool").glob("*/*.eml")).read_bytes() if stored else b""
    if done.returncode != 0 or stored != messages:
        raise RuntimeError(
            f"smtp-source exited {done.returncode}, the spool holds {stored} of {messages} "
            f"({unavailable} scanner_unavailable): {done.stderr.strip()[-500:]}"
        )
    return stored, seconds, sample


# --- the scanners alone ---------------------------------------------------------------


def run_alone(
    kind: str, address: str, raw: bytes, messages: int, concurrency: int, max_seconds: float
) -> tuple[int, float]:
    """`messages` round trips of `raw` to one scanner, `concurrency` in flight, through our clients."""
    from spoolfs.scan import ClamdClient, SpamdClient

    async def main() -> tuple[int, float]:
        left = [messages]
        deadline = clock() + max_seconds
        clamd_client = ClamdClient(address, timeout=60)
        spamd_client = SpamdClient(address, timeout=60)

        async def worker() -> int:
            done = 0
            while left[0] > 0 and clock() < deadline:
                left[0] -= 1
                if kind == "clamd":
                    assert await clamd_client.scan(raw) == ""
                else:
                    assert not (await spamd_client.check(raw)).is_spam
                done += 1
            return done

        start = clock()
        counts = await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sum(counts), clock() - start

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], max_seconds=300.0, max_seconds_help="time bound of one run")
    p.add_argument(
        "--messages", type=positive_int, default=600, help="messages per scanned run (default 600)"
    )
    p.add_argument(
        "--plain-messages", type=positive_int, default=4000, help="messages per unscanned run (default 4000)"
    )
    p.add_argument(
        "--sessions", type=positive_int, default=20, help="smtp-source -s, and scanner concurrency (20)"
    )
    p.add_argument("--spamd-children", type=positive_int, default=4, help="spamd --max-children (default 4)")
    args = p.parse_args(argv)

    bench = Bench(
        "bench_scan",
        "messages/s",
        {
            "runs": args.runs,
            "messages_scanned": args.messages,
            "messages_plain": args.plain_messages,
            "sessions": args.sessions,
            "length": 4096,
            "spamd_children": args.spamd_children,
            "cpus": os.cpu_count(),
        },
    )
    bench.variant("a", "spool serve, clamd + spamd on")
    bench.variant("b", "spool serve, scanning off")
    bench.variant("c", "spamd alone (SYMBOLS)")
    bench.variant("d", "clamd alone (INSTREAM)")
    with scanners(args.dir, args.spamd_children) as (clamd_address, spamd_address):
        on = f'[scan]\nenabled = true\nclamd = "{clamd_address}"\nspamd = "{spamd_address}"\ntimeout = 60.0\n'
        off = "[scan]\nenabled = false\n"
        bench.header(f"SMTP ingest, smtp-source -s {args.sessions} -l 4096, scanning on vs off")
        for run in range(1, args.runs + 1):
            count, seconds, sample = run_ingest(args.dir, on, args.messages, args.sessions, args.max_seconds)
            bench.record("a", run, args.runs, count, seconds)
            count, seconds, _ = run_ingest(
                args.dir, off, args.plain_messages, args.sessions, args.max_seconds
            )
            bench.record("b", run, args.runs, count, seconds)
            # the very message smtp-source sent, as the server stored it (with our Received header)
            for key, kind, address in (("c", "spamd", spamd_address), ("d", "clamd", clamd_address)):
                count, seconds = run_alone(
                    kind, address, sample, args.messages, args.sessions, args.max_seconds
                )
                bench.record(key, run, args.runs, count, seconds, f"{len(sample)}-byte message")
    out()
    a, b, c = (bench.variants[k].median for k in "abc")
    out(
        f"per message: scanned {1000 / a:.1f} ms, unscanned {1000 / b:.2f} ms, cost of scanning {1000 / a - 1000 / b:.1f} ms"
    )
    out(f"scanned ingest is {a / c:.2f}x of spamd alone (the slower scanner)")
    bench.finish(
        ratios=[("a", "b"), ("a", "c"), ("c", "d")],
        target_key="a",
        target=0.8 * c,
        as_json=args.json,
        extra={"target_rule": "a >= 0.8x of c: scanning costs the scanners' own time, not more"},
    )


if __name__ == "__main__":
    main()
