"""`spool serve` in a temporary data directory, for the server benchmarks.

`spool_serve(relayhost=..., delivery=...)` starts `.venv/bin/spool --data-dir
DIR/data serve --smtp 127.0.0.1:PORT --mynetworks 127.0.0.0/8 [--relayhost
HOST:PORT]` on a free port, in a session of its own, and waits until every
SMTP worker listens on the port and one of them answers with its 220
greeting. With `delivery=False` the delivery service is stopped through the
CLI before the server starts (services.json), so no delivery worker ever
runs until `start_delivery()`. On leaving: SIGTERM to the supervisor, a
bounded wait, then SIGKILL to the process group it leads (which holds only
the processes it started), and the directory is removed.

Helpers: stop/start delivery through the CLI, the number of messages in the
spool (scanning DATA/spool/NN/*.json), finished deliveries (the delivery
protocol log), the pids of the supervisor and its workers, and
`fill_library()`, which enqueues messages through `Spool.enqueue` from
threads (faster than SMTP, for filling the spool before a delivery run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import clock, free_port, run_threads, split, temp_dir
from bench.postfix import proc_children

VENV_BIN = Path(sys.executable).parent
SPOOL = str(VENV_BIN / "spool")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0  # the supervisor gives workers 15 s, delivery finishes in-flight work within 30 s
CLI_TIMEOUT = 60.0

SENDER = "bench@example.org"
RECIPIENT = "rcpt@example.net"


def smtp_source_like(payload: int = 4096) -> bytes:
    """A message shaped like the one `smtp-source -l PAYLOAD` sends, with a Received header like ours.

    smtp-source sends From, To, Date and Message-Id headers, a blank line and
    PAYLOAD bytes of numbered 80-column lines; the server adds a Received
    header of about 150 bytes. Used when the spool is filled through the
    library, so both servers deliver messages of the same size.
    """
    head = (
        b"Received: from vm ([127.0.0.1])\r\n"
        b"\tby bench (spoolfs) with SMTP id 01M8KY1YEY0B261Y3RR2CMVXDR\r\n"
        b"\tfor <rcpt@example.net>;\r\n"
        b"\tSun, 29 Nov 2026 15:18:09 +0000\r\n"
        b"From: <bench@example.org>\r\n"
        b"To: <rcpt@example.net>\r\n"
        b"Date: Sun, 29 Nov 2026 15:18:09 +0000 (UTC)\r\n"
        b"Message-Id: <418a.0003.0000@vm>\r\n"
        b"\r\n"
    )
    body = bytearray()
    n = 0
    while len(body) < payload:
        n += 1
        line = (str(n % 10).encode() + b"X" * 79)[: min(80, payload - len(body))]
        body += line + b"\r\n"
    return head + bytes(body)


def provenance() -> str:
    """Which spoolfs tree the server runs from (the workers inherit PYTHONPATH and the cwd)."""
    import spoolfs

    where = Path(spoolfs.__file__).resolve().parent.parent
    return f"spoolfs from {where}" + (
        f" (PYTHONPATH={os.environ['PYTHONPATH']})" if "PYTHONPATH" in os.environ else ""
    )


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port` (each SMTP worker binds its own, SO_REUSEPORT)."""
    want = f"0100007F:{port:04X}"
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":
                n += 1
    return n


def greeting(port: int, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = s.recv(512).decode(errors="replace")
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
            s.recv(512)
    return data


@dataclass
class Server:
    root: Path
    port: int
    relayhost: str | None
    proc: subprocess.Popen[bytes] | None = None
    smtp_workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> Path:
        return self.root / "serve.out"

    # --- the CLI ---------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [SPOOL, "--data-dir", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"spool {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def stop_delivery(self) -> None:
        self.cli("services", "stop", "delivery")

    def start_delivery(self) -> None:
        self.cli("services", "start", "delivery")

    # --- the process -----------------------------------------------------------------

    def start(self) -> None:
        args = [SPOOL, "--data-dir", str(self.data), "serve", "--smtp", self.address]
        args += ["--mynetworks", "127.0.0.0/8"]
        if self.relayhost:
            args += ["--relayhost", self.relayhost]
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = clock() + START_TIMEOUT
        while clock() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spool serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if listeners(self.port) >= self.smtp_workers:
                with contextlib.suppress(OSError):
                    if greeting(self.port).startswith("220"):
                        return
            time.sleep(0.05)
        raise RuntimeError(f"spool serve did not greet on {self.address}:\n{self.log_tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the session this supervisor leads (its workers)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def restarts(self) -> list[str]:
        """Lines where the supervisor says a worker died and was restarted."""
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if "restarting" in line]

    def pids(self) -> list[int]:
        """The supervisor and every process under it."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *proc_children(self.proc.pid)]

    def worker_pids(self, service: str) -> list[int]:
        if self.proc is None:
            return []
        out = []
        for pid in proc_children(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"spoolfs.serve.worker" in cmd and service.encode() in cmd:
                out.append(pid)
        return out

    # --- the spool ---------------------------------------------------------------------

    def count(self) -> int:
        """Messages in the spool: DATA/spool/NN/*.json."""
        n = 0
        spool = self.data / "spool"
        for entry in os.scandir(spool):
            if entry.is_dir() and len(entry.name) == 2:
                with os.scandir(entry.path) as it:
                    n += sum(1 for e in it if e.name.endswith(".json"))
        return n

    def finished(self) -> dict[str, int]:
        """`finished: OUTCOME` lines of the delivery protocol log, by outcome."""
        counts: dict[str, int] = {}
        for path in (self.data / "log").glob("delivery-*.log"):
            with open(path, "rb") as f:
                for line in f:
                    i = line.find(b" finished: ")
                    if i >= 0:
                        kind = line[i + 11 :].split(b",")[0].strip().decode()
                        counts[kind] = counts.get(kind, 0) + 1
        return counts

    def fill_library(self, raw: bytes, total: int, threads: int = 20, max_seconds: float = 3600.0) -> float:
        """Enqueue `total` copies of `raw` through Spool.enqueue from `threads` threads; return seconds."""
        return fill_spool(self.data, raw, total, threads, max_seconds)


def fill_spool(data: Path, raw: bytes, total: int, threads: int = 20, max_seconds: float = 3600.0) -> float:
    """Enqueue `total` copies of `raw` into the spool in `data` from `threads` threads; return seconds."""
    from spoolfs.config import load_config
    from spoolfs.spool import Spool

    quotas = split(total, threads)
    with Spool.open(load_config(data_dir=str(data)), actor="smtp") as spool:

        def work(i: int, deadline: float) -> int:
            done = 0
            for _ in range(quotas[i]):
                if clock() > deadline:
                    break
                spool.enqueue(raw, SENDER, [RECIPIENT], source="smtp", client_ip="127.0.0.1", helo="vm")
                done += 1
            return done

        seconds, done = run_threads(threads, work, max_seconds)
    if done != total:
        raise RuntimeError(f"filled {done} of {total} messages within {max_seconds:g} s")
    return seconds


@contextlib.contextmanager
def spool_serve(
    *, relayhost: str | None = None, delivery: bool = True, base: str | None = None
) -> Iterator[Server]:
    """A started `spool serve` on a free loopback port; stopped and removed afterwards."""
    with temp_dir(base, "bench-serve-") as root:
        server = Server(root, free_port(), relayhost)
        if not delivery:
            server.stop_delivery()  # takes effect on the files; the supervisor will not start it
        try:
            server.start()
            yield server
        finally:
            server.stop()


def wait_until(predicate: Callable[[], object], timeout: float, poll: float = 0.05) -> bool:
    """Call `predicate()` every `poll` seconds until it is true or `timeout` passes."""
    deadline = clock() + timeout
    while True:
        if predicate():
            return True
        if clock() >= deadline:
            return False
        time.sleep(poll)


SLOW_POLL, FAST_POLL, FAST_BELOW = 0.25, 0.05, 1_000


def drain(count: Callable[[], int], max_seconds: float, stall: float = 15.0) -> tuple[float, int, bool]:
    """Wait until count() is 0: (seconds, messages left, whether max_seconds cut it short).

    A scan of a large queue costs CPU, so the queue is scanned every 0.25 s
    while more than 1,000 messages are left, then every 0.05 s. The wait also
    ends when the count has not moved for `stall` seconds (messages stranded
    in the queue). With messages left, the seconds are those until the count
    last moved.
    """
    start = clock()
    deadline = start + max_seconds
    left = count()
    moved = start
    while left and clock() < deadline and clock() - moved < stall:
        time.sleep(SLOW_POLL if left > FAST_BELOW else FAST_POLL)
        now_left = count()
        if now_left != left:
            moved = clock()
        left = now_left
    if left:
        return moved - start, left, clock() >= deadline
    return clock() - start, 0, False
