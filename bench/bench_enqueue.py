"""Durable enqueue of 4 KB messages through the library, from concurrent callers.

Variants, interleaved run by run, each run in a fresh data directory:
  a  Spool.enqueue(raw, sender, recipients) from --threads caller threads:
     body to tmp/ + fsync, message_enqueued appended (group commit), body
     renamed into its subspool + directory fsync, sidecar written durably
  b  reference: a raw durable file write from as many threads, per message
     one 4 KB file written to tmp/, fsynced, renamed into one of 16
     directories, directory fsynced (no log, no sidecar)

A message counts once enqueue() (or the write) has returned, so every
figure is of durable messages per second.

    .venv/bin/python -m bench.bench_enqueue [--runs 5] [--messages 5000] [--threads 20]
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from bench.common import Bench, clock, out, parser, positive_int, run_threads, split, temp_dir
from spoolfs.config import load_config
from spoolfs.spool import Spool

TARGET = 2_000
SUBDIRS = 16
SENDER = "newsletter@lists.example.org"
RECIPIENTS = ("alice@example.com", "bob@mail.example.net")


def make_message(size: int) -> bytes:
    """A plain RFC 5322 message of exactly `size` bytes (CRLF line ends)."""
    head = (
        b"Return-Path: <newsletter@lists.example.org>\r\n"
        b"Received: from mx1.lists.example.org (mx1.lists.example.org [192.0.2.17])\r\n"
        b"\tby mx.example.com with ESMTP; Mon, 3 Jun 2024 10:15:00 +0000\r\n"
        b"From: Newsletter <newsletter@lists.example.org>\r\n"
        b"To: alice@example.com, bob@mail.example.net\r\n"
        b"Subject: Benchmark message\r\n"
        b"Date: Mon, 3 Jun 2024 10:14:59 +0000\r\n"
        b"Message-ID: <bench.0001@lists.example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = bytearray()
    while len(head) + len(body) < size:
        body += line
    data = (head + bytes(body))[: size - 2] + b"\r\n"
    assert len(data) == size
    return data


def run_spool(
    base: str | None, raw: bytes, total: int, threads: int, max_seconds: float
) -> tuple[int, float, bool]:
    """One run of a: (messages, seconds, cut short)."""
    quotas = split(total, threads)
    cut = [False] * threads
    with temp_dir(base, "bench-enqueue-") as d:
        config = load_config(data_dir=str(d / "data"))
        with Spool.open(config, actor="smtp:bench") as spool:

            def work(i: int, deadline: float) -> int:
                done = 0
                for _ in range(quotas[i]):
                    if clock() > deadline:
                        cut[i] = True
                        break
                    spool.enqueue(raw, SENDER, RECIPIENTS, source="smtp", client_ip="192.0.2.17")
                    done += 1
                return done

            seconds, done = run_threads(threads, work, max_seconds)
            stored = len(spool.ids())
        if stored != done:
            raise RuntimeError(f"the spool holds {stored} messages, the callers counted {done}")
        return done, seconds, any(cut)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_raw(
    base: str | None, raw: bytes, total: int, threads: int, max_seconds: float
) -> tuple[int, float, bool]:
    """One run of b: (messages, seconds, cut short)."""
    quotas = split(total, threads)
    cut = [False] * threads
    with temp_dir(base, "bench-enqueue-raw-") as d:
        tmp = d / "tmp"
        dirs = [d / f"{n:02x}" for n in range(SUBDIRS)]
        for p in (tmp, *dirs):
            p.mkdir()

        def work(i: int, deadline: float) -> int:
            done = 0
            for k in range(quotas[i]):
                if clock() > deadline:
                    cut[i] = True
                    break
                name = f"{i:02d}-{k:06d}.eml"
                final_dir = dirs[zlib.crc32(name.encode()) % SUBDIRS]
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                try:
                    view = memoryview(raw)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp / name, final_dir / name)
                _fsync_dir(final_dir)
                done += 1
            return done

        seconds, done = run_threads(threads, work, max_seconds)
        stored = sum(len(os.listdir(p)) for p in dirs)
        if stored != done:
            raise RuntimeError(f"{stored} files were written, the writers counted {done}")
        return done, seconds, any(cut)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=positive_int, default=5_000, help="messages per run (default 5000)")
    p.add_argument("--threads", type=positive_int, default=20, help="concurrent callers (default 20)")
    p.add_argument("--size", type=positive_int, default=4096, help="message size in bytes (default 4096)")
    args = p.parse_args(argv)
    if args.size < 1024:
        p.error("--size must be at least 1024")

    raw = make_message(args.size)
    bench = Bench(
        "bench_enqueue",
        "messages/s",
        {
            "runs": args.runs,
            "messages": args.messages,
            "threads": args.threads,
            "size": args.size,
            "max_seconds": args.max_seconds,
        },
    )
    bench.variant("a", "Spool.enqueue")
    bench.variant("b", "raw durable file write (reference)")
    bench.header(f"durable {args.size}-byte messages from {args.threads} threads")
    for run in range(1, args.runs + 1):
        done, seconds, cut = run_spool(args.dir, raw, args.messages, args.threads, args.max_seconds)
        bench.record("a", run, args.runs, done, seconds, cut_short=cut)
        done, seconds, cut = run_raw(args.dir, raw, args.messages, args.threads, args.max_seconds)
        bench.record("b", run, args.runs, done, seconds, cut_short=cut)
    out()
    bench.finish(ratios=[("a", "b")], target_key="a", target=TARGET, as_json=args.json)


if __name__ == "__main__":
    main()
