"""Readers: seq, time and type filters, the tail of the log, and following it live."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from events import EventLog, LogError, follow, head_seq, last_records, read_records
from events.schema import MessageHeld, MessageReleased, Record, decode_record

UTC = dt.UTC
T0 = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, start: dt.datetime) -> None:
        self.t = start

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += dt.timedelta(**kw)


def disk_records(directory: Path) -> list[Record]:
    out: list[Record] = []
    for seg in sorted(directory.glob("*.jsonl")):
        out.extend(decode_record(line) for line in seg.read_bytes().split(b"\n")[:-1])
    return out


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """40 records, one a minute from T0; even seqs held, odd seqs released; small segments."""
    directory = tmp_path / "events"
    clock = FakeClock(T0)
    with EventLog(directory, node="n", segment_bytes=1024, now=clock) as el:
        for i in range(40):
            seq = i + 1
            event = MessageHeld(id=f"m{seq}") if seq % 2 == 0 else MessageReleased(id=f"m{seq}")
            el.append(event, actor="cli:root")
            clock.advance(minutes=1)
    assert len(list(directory.glob("*.jsonl"))) >= 4
    return directory


def test_read_all_matches_disk(log_dir: Path) -> None:
    records = list(read_records(log_dir))
    assert [r.seq for r in records] == list(range(1, 41))
    assert records == disk_records(log_dir)
    assert records[0].at == T0
    assert records[-1].at == T0 + dt.timedelta(minutes=39)


@pytest.mark.parametrize(
    ("from_seq", "to_seq", "expected"),
    [
        (1, None, range(1, 41)),
        (5, 5, [5]),
        (7, 23, range(7, 24)),
        (38, None, range(38, 41)),
        (40, 100, [40]),
        (41, None, []),
        (1, 0, []),
        (10, 9, []),
    ],
)
def test_seq_range(log_dir: Path, from_seq: int, to_seq: int | None, expected: range | list[int]) -> None:
    assert [r.seq for r in read_records(log_dir, from_seq=from_seq, to_seq=to_seq)] == list(expected)


def test_seq_range_at_every_segment_boundary(log_dir: Path) -> None:
    firsts = [int(p.name.split(".")[0]) for p in sorted(log_dir.glob("*.jsonl"))]
    for first in firsts:
        for start in (first - 1, first, first + 1):
            if 1 <= start <= 40:
                got = [r.seq for r in read_records(log_dir, from_seq=start, to_seq=start + 2)]
                assert got == list(range(start, min(start + 2, 40) + 1)), start


def test_time_range_since_inclusive_until_exclusive(log_dir: Path) -> None:
    since = T0 + dt.timedelta(minutes=3)
    until = T0 + dt.timedelta(minutes=6)
    got = list(read_records(log_dir, since=since, until=until))
    assert [r.seq for r in got] == [4, 5, 6]
    assert all(since <= r.at < until for r in got)
    assert [r.seq for r in read_records(log_dir, since=T0 + dt.timedelta(minutes=38, seconds=30))] == [40]
    assert [r.seq for r in read_records(log_dir, until=T0 + dt.timedelta(seconds=1))] == [1]
    assert list(read_records(log_dir, until=T0)) == []


def test_types_filter(log_dir: Path) -> None:
    held = list(read_records(log_dir, types=["message_held"]))
    assert [r.seq for r in held] == list(range(2, 41, 2))
    assert all(isinstance(r.payload, MessageHeld) for r in held)
    both = list(read_records(log_dir, types={"message_held", "message_released"}))
    assert len(both) == 40
    assert list(read_records(log_dir, types=["message_enqueued"])) == []


def test_filters_combine(log_dir: Path) -> None:
    got = read_records(
        log_dir,
        from_seq=10,
        to_seq=30,
        since=T0 + dt.timedelta(minutes=14),
        until=T0 + dt.timedelta(minutes=25),
        types=["message_released"],
    )
    # seq s has at = T0 + (s-1) min: since -> seq >= 15, until -> seq <= 25; odd seqs are released
    assert [r.seq for r in got] == [15, 17, 19, 21, 23, 25]


@pytest.mark.parametrize("n", [1, 2, 5, 13, 39, 40, 100])
def test_last_records_across_segments(log_dir: Path, n: int) -> None:
    got = last_records(log_dir, n)
    expected = disk_records(log_dir)[-n:]
    assert got == expected
    assert [r.seq for r in got] == list(range(max(1, 41 - n), 41))


def test_last_records_zero(log_dir: Path) -> None:
    assert last_records(log_dir, 0) == []


def test_head_seq(log_dir: Path, tmp_path: Path) -> None:
    assert head_seq(log_dir) == 40
    assert head_seq(tmp_path / "missing") == 0
    (tmp_path / "empty").mkdir()
    assert head_seq(tmp_path / "empty") == 0
    assert last_records(tmp_path / "empty", 3) == []
    assert list(read_records(tmp_path / "missing")) == []


def test_head_seq_ignores_an_empty_last_segment(log_dir: Path) -> None:
    """A crash right after a roll leaves an empty newest segment."""
    (log_dir / f"{41:016d}.jsonl").write_bytes(b"")
    assert head_seq(log_dir) == 40
    assert [r.seq for r in last_records(log_dir, 3)] == [38, 39, 40]
    assert [r.seq for r in read_records(log_dir, from_seq=39)] == [39, 40]


def test_undecodable_line_raises_log_error_naming_the_segment(log_dir: Path) -> None:
    seg = sorted(log_dir.glob("*.jsonl"))[1]
    lines = seg.read_bytes().split(b"\n")
    lines[1] = b'{"broken": true}'
    seg.write_bytes(b"\n".join(lines))
    with pytest.raises(LogError, match=seg.name):
        list(read_records(log_dir))


def test_follow_yields_records_appended_later(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    with EventLog(directory, node="n", segment_bytes=1024) as el:
        for i in range(3):
            el.append(MessageHeld(id=f"early{i}"), actor="x")
        total = 3 + 25
        got: list[Record] = []
        deadline = time.monotonic() + 15

        def stop() -> bool:
            return len(got) >= total - 1 or time.monotonic() > deadline

        def writer() -> None:
            for i in range(25):
                el.append(MessageHeld(id=f"late{i}"), actor="x")
                time.sleep(0.005)

        th = threading.Thread(target=writer)
        th.start()
        try:
            for record in follow(directory, from_seq=2, poll=0.01, stop=stop):
                got.append(record)
        finally:
            th.join(timeout=15)
    assert time.monotonic() <= deadline, "follow did not see the records in time"
    assert [r.seq for r in got] == list(range(2, total + 1))
    assert got == disk_records(directory)[1:]
    assert [r.payload for r in got[2:]] == [MessageHeld(id=f"late{i}") for i in range(25)]


def test_follow_stops_when_told_even_if_nothing_comes(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    with EventLog(directory, node="n") as el:
        el.append(MessageHeld(id="only"), actor="x")
    stop_at = time.monotonic() + 0.3
    started = time.monotonic()
    got = list(follow(directory, from_seq=1, poll=0.01, stop=lambda: time.monotonic() > stop_at))
    elapsed = time.monotonic() - started
    assert [r.seq for r in got] == [1]
    assert 0.25 <= elapsed < 3


def test_follow_does_not_yield_a_torn_tail(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    with EventLog(directory, node="n") as el:
        el.append(MessageHeld(id="a"), actor="x")
    seg = sorted(directory.glob("*.jsonl"))[0]
    with open(seg, "ab") as f:
        f.write(b'{"prev":"12')
    deadline = time.monotonic() + 0.3
    got = list(follow(directory, poll=0.01, stop=lambda: time.monotonic() > deadline))
    assert [r.seq for r in got] == [1]


def test_poll_reads_only_what_is_new_across_segments(tmp_path: Path) -> None:
    from events import EventLog
    from events.reader import Cursor, poll
    from events.schema import MessageForced, MessageHeld

    log = EventLog(tmp_path / "ev", node="n", segment_bytes=4096)
    try:
        log.append_many([MessageForced(id=f"a{i}") for i in range(5)], "t")
        first, cursor = poll(tmp_path / "ev", Cursor())
        assert [r.seq for r in first] == [1, 2, 3, 4, 5] and cursor.next_seq == 6
        again, same = poll(tmp_path / "ev", cursor)
        assert again == [] and same == cursor
        for i in range(40):  # enough to roll into new segments
            log.append_many([MessageForced(id=f"b{i}"), MessageHeld(id=f"h{i}")], "t")
        held, cursor = poll(tmp_path / "ev", cursor, ["message_held"])
        assert [r.payload.id for r in held] == [f"h{i}" for i in range(40)]  # type: ignore[union-attr]
        assert cursor.next_seq == 86 and len(list((tmp_path / "ev").glob("*.jsonl"))) > 1
        log.append(MessageHeld(id="last"), "t")
        tail, _ = poll(tmp_path / "ev", cursor, ["message_held"])
        assert [r.seq for r in tail] == [86]
    finally:
        log.close()
