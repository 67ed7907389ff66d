"""EventLog, the writer: seq and chain on disk, durability, threads, segment rolling, group commit."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time

import events.log
from events import EventLog, LogError, StorageFull, read_records, verify
from events.schema import GENESIS, MessageHeld, MessageReleased, Record, decode_record, encode_record

UTC = dt.UTC


# --- helpers: read the files ourselves, independent of events.reader/verify -----------


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def disk_lines(directory: Path) -> list[bytes]:
    """Every complete line of every segment, in order; asserts there is no torn tail."""
    out: list[bytes] = []
    for seg in segment_files(directory):
        data = seg.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{seg.name} does not end with a newline"
        out.extend(data.split(b"\n")[:-1])
    return out


def assert_chain(lines: list[bytes]) -> None:
    """seq 1..n gap-free, first prev is 64 zeros, each prev is sha256 of the previous line."""
    prev = "0" * 64
    for expected_seq, line in enumerate(lines, start=1):
        obj = json.loads(line)
        assert obj["seq"] == expected_seq
        assert obj["prev"] == prev, f"seq {expected_seq}: prev does not match the line before"
        prev = hashlib.sha256(line).hexdigest()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "events"


@pytest.fixture
def log(log_dir: Path) -> Iterator[EventLog]:
    with EventLog(log_dir, node="node-a") as el:
        yield el


class FakeClock:
    def __init__(self, start: dt.datetime) -> None:
        self.t = start

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += dt.timedelta(**kw)


# --- basics ----------------------------------------------------------------------


def test_empty_log_creates_directory_but_no_segment(log_dir: Path) -> None:
    with EventLog(log_dir, node="n"):
        pass
    assert log_dir.is_dir()
    assert segment_files(log_dir) == []
    assert verify(log_dir).count == 0


def test_first_record_seq_1_and_genesis_prev(log: EventLog, log_dir: Path) -> None:
    record = log.append(MessageHeld(id="m1"), actor="cli:root")
    assert record.seq == 1
    assert record.prev == GENESIS == "0" * 64
    assert record.actor == "cli:root"
    assert record.node == "node-a"
    files = segment_files(log_dir)
    assert [f.name for f in files] == ["0000000000000001.jsonl"]
    line = files[0].read_bytes()
    assert line == encode_record(record) + b"\n"
    obj = json.loads(line)
    assert obj["prev"] == "0" * 64
    assert obj["seq"] == 1
    assert obj["actor"] == "cli:root"
    assert obj["node"] == "node-a"
    assert obj["payload"] == {"type": "message_held", "id": "m1"}


def test_seq_gap_free_and_prev_is_sha256_of_previous_line(log: EventLog, log_dir: Path) -> None:
    records = [log.append(MessageHeld(id=f"m{i}"), actor="smtp") for i in range(30)]
    assert [r.seq for r in records] == list(range(1, 31))
    lines = disk_lines(log_dir)
    assert len(lines) == 30
    assert_chain(lines)
    for record, line in zip(records, lines, strict=True):
        assert encode_record(record) == line
    for before, after in zip(lines, records[1:], strict=False):
        assert after.prev == hashlib.sha256(before).hexdigest()


def test_at_is_utc_with_microseconds(log: EventLog, log_dir: Path) -> None:
    before = dt.datetime.now(UTC)
    record = log.append(MessageHeld(id="m"), actor="smtp")
    after = dt.datetime.now(UTC)
    assert record.at.utcoffset() == dt.timedelta(0)
    assert before <= record.at <= after
    at_text = json.loads(disk_lines(log_dir)[0])["at"]
    assert at_text.endswith("Z")
    parsed = dt.datetime.fromisoformat(at_text.replace("Z", "+00:00"))
    assert parsed == record.at


def test_injected_clock_is_used(log_dir: Path) -> None:
    clock = FakeClock(dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    with EventLog(log_dir, node="n", now=clock) as el:
        r1 = el.append(MessageHeld(id="a"), actor="x")
        clock.advance(seconds=90)
        r2 = el.append(MessageHeld(id="b"), actor="x")
    assert r1.at == dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert r2.at == dt.datetime(2030, 1, 2, 3, 5, 35, 678901, tzinfo=UTC)
    ats = [json.loads(line)["at"] for line in disk_lines(log_dir)]
    assert ats == ["2030-01-02T03:04:05.678901Z", "2030-01-02T03:05:35.678901Z"]


def test_freezegun_frozen_clock_is_recorded(log_dir: Path) -> None:
    with EventLog(log_dir, node="n") as el, freeze_time("2024-01-02 03:04:05"):
        record = el.append(MessageHeld(id="m"), actor="x")
    assert record.at == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json.loads(disk_lines(log_dir)[0])["at"] == "2024-01-02T03:04:05Z"


def test_append_returns_only_after_line_is_written_and_fdatasynced(
    log: EventLog, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced_sizes: list[int] = []
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        real(fd)
        synced_sizes.append(os.fstat(fd).st_size)

    monkeypatch.setattr(events.log.os, "fdatasync", recording_fdatasync)
    total = 0
    for i in range(5):
        record = log.append(MessageHeld(id=f"m{i}"), actor="smtp")
        line = encode_record(record) + b"\n"
        total += len(line)
        # the line is in the file when append returns ...
        data = segment_files(log_dir)[0].read_bytes()
        assert data.endswith(line)
        assert len(data) == total
        # ... and an fdatasync covering it has already happened
        assert synced_sizes, "append returned without any fdatasync"
        assert synced_sizes[-1] >= total


def test_append_many_gives_consecutive_seqs_in_one_batch(log: EventLog, log_dir: Path) -> None:
    log.append(MessageHeld(id="first"), actor="a")
    batch = [MessageHeld(id=f"m{i}") for i in range(10)] + [MessageReleased(id="m0"), MessageHeld(id="m0")]
    many = log.append_many(batch, actor="b")
    assert [r.seq for r in many] == list(range(2, 14))
    assert len({r.at for r in many}) == 1  # one commit, one timestamp
    assert [r.payload for r in many] == batch
    assert all(r.actor == "b" for r in many)
    lines = disk_lines(log_dir)
    assert_chain(lines)
    assert [decode_record(line) for line in lines[1:]] == many


def test_append_many_empty_list_writes_nothing(log: EventLog, log_dir: Path) -> None:
    log.append(MessageHeld(id="a"), actor="a")
    before = segment_files(log_dir)[0].read_bytes()
    assert log.append_many([], actor="a") == []
    assert segment_files(log_dir)[0].read_bytes() == before


def test_append_async(log: EventLog, log_dir: Path) -> None:
    async def main() -> list[Record]:
        return list(
            await asyncio.gather(*(log.append_async(MessageHeld(id=f"m{i}"), "smtp") for i in range(20)))
        )

    records = asyncio.run(main())
    assert sorted(r.seq for r in records) == list(range(1, 21))
    lines = disk_lines(log_dir)
    assert_chain(lines)
    on_disk = {decode_record(line).seq: line for line in lines}
    for r in records:
        assert on_disk[r.seq] == encode_record(r)


def test_reopen_continues_the_chain(log_dir: Path) -> None:
    with EventLog(log_dir, node="n1") as el:
        for i in range(5):
            el.append(MessageHeld(id=f"a{i}"), actor="x")
    with EventLog(log_dir, node="n2") as el:
        r = el.append(MessageHeld(id="b"), actor="y")
    assert r.seq == 6
    lines = disk_lines(log_dir)
    assert r.prev == hashlib.sha256(lines[4]).hexdigest()
    assert_chain(lines)
    assert [json.loads(line)["node"] for line in lines] == ["n1"] * 5 + ["n2"]


def test_two_instances_in_one_process_interleave(log_dir: Path) -> None:
    a = EventLog(log_dir, node="a")
    b = EventLog(log_dir, node="b")
    try:
        seqs = []
        for i in range(10):
            seqs.append(a.append(MessageHeld(id=f"a{i}"), actor="x").seq)
            seqs.append(b.append(MessageHeld(id=f"b{i}"), actor="x").seq)
    finally:
        a.close()
        b.close()
    assert seqs == list(range(1, 21))
    assert_chain(disk_lines(log_dir))


def test_closed_log_refuses_appends(log_dir: Path) -> None:
    el = EventLog(log_dir, node="n")
    el.append(MessageHeld(id="m"), actor="x")
    el.close()
    with pytest.raises(LogError):
        el.append(MessageHeld(id="m2"), actor="x")
    assert len(disk_lines(log_dir)) == 1


def test_close_waits_for_pending_appends(log_dir: Path) -> None:
    el = EventLog(log_dir, node="n")
    futures = [el.submit([MessageHeld(id=f"m{i}")], actor="x") for i in range(50)]
    el.close()
    records = [f.result(timeout=5)[0] for f in futures]
    assert sorted(r.seq for r in records) == list(range(1, 51))
    assert len(disk_lines(log_dir)) == 50


# --- threads ---------------------------------------------------------------------


def test_many_threads_gap_free_and_every_record_on_disk_once(log: EventLog, log_dir: Path) -> None:
    threads_n, per_thread = 8, 500
    results: dict[int, list[Record]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        try:
            start.wait()
            results[t] = [
                log.append(MessageHeld(id=f"t{t}-{i}"), actor=f"thread-{t}") for i in range(per_thread)
            ]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    assert all(not th.is_alive() for th in threads)

    lines = disk_lines(log_dir)
    total = threads_n * per_thread
    assert len(lines) == total
    assert_chain(lines)
    returned = [r for recs in results.values() for r in recs]
    assert len(returned) == total
    assert sorted(r.seq for r in returned) == list(range(1, total + 1))
    for r in returned:
        assert lines[r.seq - 1] == encode_record(r)  # exactly what was returned is what is stored
    ids = [json.loads(line)["payload"]["id"] for line in lines]
    assert len(set(ids)) == total
    # each thread's own appends are in its own order
    for t, recs in results.items():
        assert [r.seq for r in recs] == sorted(r.seq for r in recs)
        assert all(r.actor == f"thread-{t}" for r in recs)
    assert verify(log_dir).count == total


# --- segments ---------------------------------------------------------------------


def test_segments_roll_and_chain_runs_across_them(log_dir: Path) -> None:
    segment_bytes = 4096
    with EventLog(log_dir, node="n", segment_bytes=segment_bytes) as el:
        records = [el.append(MessageHeld(id=f"message-{i:05d}"), actor="smtp") for i in range(200)]
    files = segment_files(log_dir)
    assert len(files) >= 5
    all_lines: list[bytes] = []
    for seg in files:
        data = seg.read_bytes()
        assert data.endswith(b"\n")
        assert len(data) <= segment_bytes
        lines = data.split(b"\n")[:-1]
        assert lines, f"empty segment {seg.name}"
        first_seq = json.loads(lines[0])["seq"]
        assert seg.name == f"{first_seq:016d}.jsonl"
        all_lines.extend(lines)
    assert len(all_lines) == 200
    assert_chain(all_lines)
    # the first record of each later segment chains to the last of the previous one
    for before, after in itertools.pairwise(files):
        last_of_before = before.read_bytes().split(b"\n")[-2]
        first_of_after = json.loads(after.read_bytes().split(b"\n")[0])
        assert first_of_after["prev"] == hashlib.sha256(last_of_before).hexdigest()
    assert [encode_record(r) for r in records] == all_lines
    result = verify(log_dir, workers=1)
    assert (result.count, result.head_seq, result.segments) == (200, 200, len(files))
    assert result.head_hash == hashlib.sha256(all_lines[-1]).hexdigest()
    assert verify(log_dir) == result


def test_segment_roll_after_reopen_with_smaller_segment_bytes(log_dir: Path) -> None:
    with EventLog(log_dir, node="n") as el:
        for i in range(30):
            el.append(MessageHeld(id=f"m{i}"), actor="x")
    with EventLog(log_dir, node="n", segment_bytes=1024) as el:
        r = el.append(MessageHeld(id="next"), actor="x")
    assert [f.name for f in segment_files(log_dir)] == ["0000000000000001.jsonl", "0000000000000031.jsonl"]
    assert r.seq == 31
    assert_chain(disk_lines(log_dir))


# --- group commit ------------------------------------------------------------------


def test_group_commit_batches_fdatasync(
    log: EventLog, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    calls_lock = threading.Lock()
    real = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(0.002)  # a slow-ish disk, so that appends pile up behind a sync
        real(fd)

    monkeypatch.setattr(events.log.os, "fdatasync", counting_fdatasync)
    threads_n, per_thread = 16, 40
    start = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                log.append(MessageHeld(id=f"{t}-{i}"), actor="x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    total = threads_n * per_thread
    lines = disk_lines(log_dir)
    assert len(lines) == total
    assert_chain(lines)
    assert 0 < calls < total
    # in practice it batches a lot: at least 2 events per sync on average
    assert calls <= total // 2, f"{calls} fdatasync calls for {total} events"
    # each batch shares one `at`: there are no more distinct timestamps than syncs
    assert len({json.loads(line)["at"] for line in lines}) <= calls


# --- write failures ----------------------------------------------------------------


def _failing_once(err: int) -> tuple[Callable[[int], None], list[int]]:
    real = os.fdatasync
    failed: list[int] = []

    def fdatasync(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(err, os.strerror(err))
        real(fd)

    return fdatasync, failed


@pytest.mark.parametrize(("err", "exc_type"), [(errno.ENOSPC, StorageFull), (errno.EIO, LogError)])
def test_failed_sync_fails_the_batch_and_leaves_no_partial_line(
    log: EventLog, log_dir: Path, monkeypatch: pytest.MonkeyPatch, err: int, exc_type: type[Exception]
) -> None:
    for i in range(3):
        log.append(MessageHeld(id=f"ok{i}"), actor="x")
    before = segment_files(log_dir)[0].read_bytes()
    fdatasync, failed = _failing_once(err)
    monkeypatch.setattr(events.log.os, "fdatasync", fdatasync)
    with pytest.raises(exc_type):
        log.append_many([MessageHeld(id="lost1"), MessageHeld(id="lost2")], actor="x")
    assert failed
    assert segment_files(log_dir)[0].read_bytes() == before  # truncated back
    monkeypatch.undo()
    r = log.append(MessageHeld(id="after"), actor="x")
    assert r.seq == 4
    lines = disk_lines(log_dir)
    assert len(lines) == 4
    assert_chain(lines)
    assert [rec.payload for rec in read_records(log_dir)][-1] == MessageHeld(id="after")
    assert verify(log_dir).count == 4


def test_failed_sync_keeps_a_batch_another_writer_chained_on(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is free during the sync, so another writer may have built on our batch."""
    first = EventLog(log_dir, node="a")
    other = EventLog(log_dir, node="b")
    try:
        first.append(MessageHeld(id="ok"), actor="x")
        real = os.fdatasync
        state = {"failed": False, "other_appended_during_sync": False}

        def fdatasync(fd: int) -> None:
            if threading.current_thread() is first._thread and not state["failed"]:
                state["failed"] = True
                # while our batch syncs, the other writer appends (and syncs) after it
                writer = threading.Thread(target=other.append, args=(MessageReleased(id="later"), "y"))
                writer.start()
                writer.join(15)
                state["other_appended_during_sync"] = not writer.is_alive()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        monkeypatch.setattr(events.log.os, "fdatasync", fdatasync)
        with pytest.raises(LogError):
            first.append(MessageHeld(id="unacknowledged"), actor="x")
        assert state["failed"]
        assert state["other_appended_during_sync"], "the other writer waited for our sync"
        lines = disk_lines(log_dir)
        assert_chain(lines)  # nothing cut out from under the later batch
        payloads = [rec.payload for rec in read_records(log_dir)]
        assert payloads == [
            MessageHeld(id="ok"),
            MessageHeld(id="unacknowledged"),
            MessageReleased(id="later"),
        ]
        # the failed writer goes on after the other writer's record
        assert first.append(MessageHeld(id="after"), actor="x").seq == 4
        assert verify(log_dir).count == 4
    finally:
        first.close()
        other.close()


def test_other_writers_append_while_a_batch_syncs(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock covers the write, not the fdatasync: a slow sync does not stall other processes."""
    slow = EventLog(log_dir, node="a")
    other = EventLog(log_dir, node="b")
    real = os.fdatasync
    in_sync, release = threading.Event(), threading.Event()

    def fdatasync(fd: int) -> None:
        if threading.current_thread() is slow._thread and not release.is_set():
            in_sync.set()
            release.wait(20)
        real(fd)

    monkeypatch.setattr(events.log.os, "fdatasync", fdatasync)
    try:
        ticket = slow.submit([MessageHeld(id="slow")], actor="x")
        assert in_sync.wait(10)
        # the other writer gets the lock, writes after the slow batch and returns
        fast = other.submit([MessageReleased(id="fast")], actor="y")
        assert fast.result(15)[0].seq == 2
        release.set()
        assert ticket.result(10)[0].seq == 1
        assert_chain(disk_lines(log_dir))
    finally:
        release.set()
        slow.close()
        other.close()


def test_a_new_segment_starts_only_after_the_old_one_is_synced(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch in the old segment may still be syncing in another process: whoever rolls syncs it first."""
    slow = EventLog(log_dir, node="a", segment_bytes=600)
    other = EventLog(log_dir, node="b", segment_bytes=600)
    real_sync, real_write = os.fdatasync, os.write
    in_sync, release = threading.Event(), threading.Event()
    journal: list[tuple[str, str]] = []  # the other writer's syncs and writes, in order

    def name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fdatasync(fd: int) -> None:
        if threading.current_thread() is slow._thread and not release.is_set():
            in_sync.set()
            release.wait(20)
        elif threading.current_thread() is other._thread:
            journal.append(("sync", name(fd)))
        real_sync(fd)

    def write(fd: int, data: bytes) -> int:
        if threading.current_thread() is other._thread and name(fd).endswith(".jsonl"):
            journal.append(("write", name(fd)))
        return real_write(fd, data)

    try:
        slow.append_many([MessageHeld(id=f"m{i}") for i in range(2)], actor="x")
        monkeypatch.setattr(events.log.os, "fdatasync", fdatasync)
        monkeypatch.setattr(events.log.os, "write", write)
        ticket = slow.submit([MessageHeld(id="fills-the-segment")], actor="x")
        assert in_sync.wait(10)
        old = segment_files(log_dir)[-1].name
        other.append(MessageReleased(id="rolls"), actor="y")
        release.set()
        ticket.result(10)
    finally:
        release.set()
        slow.close()
        other.close()
    monkeypatch.undo()
    new = segment_files(log_dir)[-1].name
    assert new != old, "the test needs the other writer to start a new segment"
    assert ("write", new) in journal
    assert ("sync", old) in journal[: journal.index(("write", new))], (
        f"{new} was written before {old} was synced"
    )
    assert_chain(disk_lines(log_dir))
