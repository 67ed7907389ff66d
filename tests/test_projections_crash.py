"""Projections across processes: a rebuild killed mid-way, one writer at a time,
readers that wait, and appends that never wait for any of them."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events import EventLog
from events import schema as ev
from projections import ProjectionBusy, Projections

TABLES = ("events_raw", "message_state", "attempt_log", "logs")


def build_log(data: Path, messages: int = 3000) -> None:
    with EventLog(data / "events", node="n1", segment_bytes=100_000) as log:
        batch: list[ev.Event] = []
        for i in range(messages):
            mid = f"M{i:06d}"
            rcpts = [f"u{i % 7}@d{i % 5}.example", f"v{i % 3}@d{i % 4}.example"]
            batch.append(
                ev.MessageEnqueued(
                    id=mid, sender=f"s{i % 9}@x.example", recipients=rcpts, size=i, subspool="00"
                )
            )
            batch.append(ev.DeliveryAttempted(id=mid, recipient=rcpts[0], result="delivered", code=250))
            if i % 3 == 0:
                batch.append(
                    ev.MessageDeferred(id=mid, next_attempt_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
                )
            if i % 4 == 0:
                batch.append(ev.MessageFinished(id=mid, outcome="delivered"))
            if len(batch) >= 1000:
                log.append_many(batch, "delivery")
                batch = []
        log.append_many(batch, "delivery")


def dump(p: Projections) -> dict[str, Any]:
    return {t: p.query(f"SELECT * FROM {t} ORDER BY ALL")[1] for t in TABLES}


def child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    data = tmp_path_factory.mktemp("clean")
    build_log(data)
    with Projections.open(data) as p:
        p.rebuild()
        return data, dump(p)


@pytest.mark.parametrize("kill_after", ["chunk:1", "chunk:5", "time:0.15"])
def test_a_rebuild_killed_midway_comes_back_as_a_clean_rebuild(
    tmp_path: Path, clean: tuple[Path, dict[str, Any]], kill_after: str
) -> None:
    source, expected = clean
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(source / "events", data / "events")
    with Projections.open(data) as p:  # a previous state, which the rebuild throws away
        p.catch_up()
    proc = child(
        f"""
        import sys, time
        from projections import Projections
        def tick(n):
            print("chunk", flush=True)
            time.sleep(0.01)
        with Projections.open({str(data)!r}) as p:
            print("start", flush=True)
            p.rebuild(progress=tick)
            print("done", flush=True)
            time.sleep(60)
        """
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "start"
        kind, value = kill_after.split(":")
        if kind == "chunk":
            for _ in range(int(value)):
                assert proc.stdout.readline().strip() == "chunk"
        else:
            time.sleep(float(value))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    with Projections.open(data) as p:
        p.catch_up()
        assert dump(p) == expected


@pytest.fixture
def writer_elsewhere(tmp_path: Path) -> Iterator[Path]:
    build_log(tmp_path, messages=50)
    proc = child(
        f"""
        import sys
        from projections import Projections
        with Projections.open({str(tmp_path)!r}) as p:
            p.catch_up()
            print("ready", flush=True)
            sys.stdin.read()
        """
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    try:
        yield tmp_path
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_one_writer_at_a_time_and_readers_wait(writer_elsewhere: Path) -> None:
    data = writer_elsewhere
    started = time.monotonic()
    with pytest.raises(ProjectionBusy, match="another process"):
        Projections.open(data, wait=0.3)
    with pytest.raises(ProjectionBusy, match="another process"):
        Projections.open(data, read_only=True, wait=0.3)
    assert time.monotonic() - started < 15
    # the log's writers never wait for the projections
    with EventLog(data / "events", node="n1") as log:
        t = time.monotonic()
        log.append(ev.MessageHeld(id="M000001"), "cli:test")
        assert time.monotonic() - t < 10  # the writer holds the projections until we say so: no waiting on it


def test_a_reader_gets_in_once_the_writer_is_gone(tmp_path: Path) -> None:
    build_log(tmp_path, messages=20)
    proc = child(
        f"""
        import time
        from projections import Projections
        with Projections.open({str(tmp_path)!r}) as p:
            p.catch_up()
            print("ready", flush=True)
            time.sleep(0.5)
        """
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    with Projections.open(tmp_path, read_only=True, wait=10) as p:
        assert len(p.list_spool()) == 15
    proc.wait(timeout=30)


@pytest.mark.parametrize("fold", ["small", "set-based"])
@pytest.mark.parametrize("kill_at", [0.02, 0.08, 0.2])
def test_a_catch_up_killed_midway_is_finished_by_the_next_command(
    tmp_path: Path, clean: tuple[Path, dict[str, Any]], fold: str, kill_at: float
) -> None:
    """The log grows while the projections lag; a catch-up is killed at some moment;
    the next catch-up ends where a clean rebuild of the whole log ends."""
    source, expected = clean
    segments = sorted((source / "events").glob("*.jsonl"))
    assert len(segments) > 4
    data = tmp_path / "data"
    (data / "events").mkdir(parents=True)
    for seg in segments[:2]:  # the log as it was when the projections last caught up
        shutil.copy(seg, data / "events" / seg.name)
    with Projections.open(data) as p:
        p.catch_up()
    for seg in segments[2:]:  # what the daemon appended since
        shutil.copy(seg, data / "events" / seg.name)
    threshold = "projections.core.SMALL_CATCH_UP = 1" if fold == "set-based" else ""
    proc = child(
        f"""
        import time
        import projections.core
        {threshold}
        from projections import Projections
        with Projections.open({str(data)!r}) as p:
            print("start", flush=True)
            p.catch_up()
            print("done", flush=True)
            time.sleep(60)
        """
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "start"
        time.sleep(kill_at)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    if kill_at == 0.02:  # the earliest kill lands inside the catch-up, not after it
        assert "done" not in proc.stdout.read()
    with Projections.open(data) as p:
        p.catch_up()
        got = dump(p)

    def where_not(tables: dict[str, Any]) -> dict[str, Any]:
        # the logs table names the log's directory: a copy here, the original there
        return {**tables, "logs": [row[:1] + row[2:] for row in tables["logs"]]}

    assert where_not(got) == where_not(expected)
