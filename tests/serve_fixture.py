"""`spool serve` as a subprocess for tests, and the small helpers around it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SPOOL = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parent.parent


def cli(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SPOOL, "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        input=stdin,
        check=False,
    )


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def smtp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


@contextmanager
def serve(data: Path, port: int, *extra: str, config: str = "") -> Iterator[subprocess.Popen[bytes]]:
    cfg = data.parent / f"spool-{port}.toml"
    cfg.write_text(config)
    argv = [
        *SPOOL,
        "--config",
        str(cfg),
        "--data-dir",
        str(data),
        "serve",
        "--smtp",
        f"127.0.0.1:{port}",
        *extra,
    ]
    log = open(data.parent / f"serve-{port}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: smtp_ready(port) or proc.poll() is not None, 30, "spool serve to listen")
        assert proc.poll() is None, (data.parent / f"serve-{port}.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
