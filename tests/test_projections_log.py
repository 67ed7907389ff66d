"""Projections and the log itself: torn tails, gaps, broken chains, segments, several nodes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import msgspec
import pytest

from events import EventLog, read_records
from events import schema as ev
from events.errors import SpoolError
from events.schema import GENESIS, Record, encode_record
from projections import LogBroken, ProjectionError, Projections
from spoolfs.config import load_config
from spoolfs.spool import Spool

AT = dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)


def line(prev: bytes | None, seq: int, event: ev.Event, node: str = "n1") -> bytes:
    record = Record(
        prev=hashlib.sha256(prev).hexdigest() if prev is not None else GENESIS,
        seq=seq,
        at=AT,
        actor="test",
        node=node,
        payload=event,  # type: ignore[arg-type]
    )
    return encode_record(record)


def write_log(directory: Path, lines: list[bytes], tail: bytes = b"") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "0000000000000001.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in lines) + tail)
    return path


def chain(count: int, tag: str = "M") -> list[bytes]:
    out: list[bytes] = []
    prev = None
    for i in range(count):
        seq = 1 + i
        event = ev.MessageEnqueued(
            id=f"{tag}{seq}", sender="s@x.example", recipients=["r@y.example"], size=1, subspool="00"
        )
        prev = line(prev, seq, event)
        out.append(prev)
    return out


def count(p: Projections, table: str = "events") -> int:
    return int(p.query(f"SELECT count(*) FROM {table}")[1][0][0])


def assert_verify_error(exc: BaseException) -> None:
    assert isinstance(exc, SpoolError)
    assert "spool events verify" in str(exc)
    assert "\n" not in str(exc)


# --- torn tails ------------------------------------------------------------------------------


def test_a_torn_tail_is_left_for_later(tmp_path: Path) -> None:
    lines = chain(3)
    nxt = line(lines[-1], 4, ev.MessageHeld(id="M2"))
    seg = write_log(tmp_path / "events", lines, tail=nxt[:40])
    with Projections.open(tmp_path) as p:
        result = p.catch_up()
        assert result.events == 3
        mark = p.status().watermarks[0]
        assert (mark.seq, mark.offset) == (3, sum(len(x) + 1 for x in lines))
        assert mark.hash == hashlib.sha256(lines[-1]).hexdigest()
        # the whole line, but no newline yet: still not a record
        seg.write_bytes(seg.read_bytes()[: mark.offset] + nxt)
        assert p.catch_up().events == 0
        assert [r["status"] for r in p.list_spool()] == ["waiting"] * 3
        with seg.open("ab") as f:
            f.write(b"\n")
        assert p.catch_up().events == 1
        assert [r["status"] for r in p.list_spool()] == ["waiting", "held", "waiting"]


def test_a_garbage_last_line_waits_for_the_writer_to_cut_it(tmp_path: Path) -> None:
    events = tmp_path / "events"
    with EventLog(events, node="n1") as log:
        log.append(
            ev.MessageEnqueued(id="A", sender="", recipients=["r@y.example"], size=1, subspool="00"), "t"
        )
    seg = next(events.glob("*.jsonl"))
    with seg.open("ab") as f:
        f.write(b"\0" * 50 + b"\n")  # what a crash can leave: zeros, then a newline
    with Projections.open(tmp_path) as p:
        assert p.catch_up().events == 1
        with EventLog(events, node="n1") as log:  # the writer cuts it and says so
            log.append(ev.MessageHeld(id="A"), "t")
        assert p.catch_up().events == 2
        assert p.query("SELECT type FROM events ORDER BY seq")[1] == [
            ("message_enqueued",),
            ("log_repaired",),
            ("message_held",),
        ]
        assert p.list_spool()[0]["status"] == "held"


# --- gaps and broken chains ------------------------------------------------------------------


def test_a_gap_inside_new_records_stops_catch_up(tmp_path: Path) -> None:
    lines = chain(2)
    lines.append(line(lines[-1], 4, ev.MessageHeld(id="M1")))  # seq 3 is missing
    lines.append(line(lines[-1], 5, ev.MessageHeld(id="M2")))
    write_log(tmp_path / "events", lines)
    with Projections.open(tmp_path) as p:
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert count(p) == 0 and p.status().watermarks == []


def test_a_repeated_seq_stops_catch_up_even_when_the_count_fits(tmp_path: Path) -> None:
    lines = chain(2)
    lines.append(line(lines[-1], 2, ev.MessageHeld(id="M1")))  # seq 2 again, in place of seq 3
    lines.append(line(lines[-1], 4, ev.MessageHeld(id="M2")))  # 4 records, seq 1..4
    write_log(tmp_path / "events", lines)
    with Projections.open(tmp_path) as p:
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert "more than once" in str(info.value)
        assert count(p) == 0 and p.status().watermarks == []


def test_a_broken_chain_at_the_watermark_stops_catch_up(tmp_path: Path) -> None:
    lines = chain(3)
    seg = write_log(tmp_path / "events", lines)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        bad = line(lines[0], 4, ev.MessageHeld(id="M1"))  # prev names seq 1, not seq 3
        with seg.open("ab") as f:
            f.write(bad + b"\n")
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert count(p) == 3
        assert p.status().watermarks[0].seq == 3


def test_a_seq_gap_at_the_watermark_stops_catch_up(tmp_path: Path) -> None:
    lines = chain(3)
    seg = write_log(tmp_path / "events", lines)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        with seg.open("ab") as f:
            f.write(line(lines[-1], 5, ev.MessageHeld(id="M1")) + b"\n")
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert "seq 5 does not follow seq 3" in str(info.value)


def test_a_replaced_log_is_noticed(tmp_path: Path) -> None:
    write_log(tmp_path / "events", chain(3))
    with Projections.open(tmp_path) as p:
        p.catch_up()
        other = chain(5, tag="other")
        write_log(tmp_path / "events", other)
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert "truncated or replaced" in str(info.value)
        p.rebuild()  # the way out once verify has said what happened
        assert count(p) == 5


def test_a_record_that_does_not_parse_stops_catch_up(tmp_path: Path) -> None:
    lines = chain(3)
    broken = [lines[0], lines[1][:-2] + b"??", lines[2]]  # a bad record before good ones
    write_log(tmp_path / "events", broken)
    with Projections.open(tmp_path) as p:
        with pytest.raises(SpoolError) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert count(p) == 0


def test_a_record_that_does_not_parse_is_named_by_its_segment(tmp_path: Path) -> None:
    events = tmp_path / "events"
    with EventLog(events, node="n1", segment_bytes=2000) as log:
        for i in range(60):
            log.append(ev.MessageHeld(id=f"M{i:02d}"), "t")
    segments = sorted(events.glob("*.jsonl"))
    assert len(segments) > 2
    bad = segments[1]
    data = bad.read_bytes().split(b"\n")
    data[1] = data[1][:-2] + b"??"  # same length: the seqs and the chain stay as they were
    bad.write_bytes(b"\n".join(data))
    with Projections.open(tmp_path) as p:
        with pytest.raises(LogBroken) as info:
            p.catch_up()
        assert_verify_error(info.value)
        assert f"segment {bad.name} " in str(info.value) and "does not parse" in str(info.value)
        assert count(p) == 0


# --- segments -----------------------------------------------------------------------------------


def test_many_segments_and_a_watermark_in_a_sealed_one(tmp_path: Path) -> None:
    events = tmp_path / "events"
    with EventLog(events, node="n1", segment_bytes=2000) as log:
        for i in range(20):
            log.append(
                ev.MessageEnqueued(
                    id=f"M{i:02d}", sender="", recipients=["r@y.example"], size=i, subspool="00"
                ),
                "t",
            )
        with Projections.open(tmp_path) as p:
            p.catch_up()
            for i in range(0, 20, 2):
                log.append(ev.MessageHeld(id=f"M{i:02d}"), "t")
            log.append_many([ev.MessageFinished(id=f"M{i:02d}", outcome="delivered") for i in range(5)], "t")
            assert p.catch_up().events == 15
            where = {r.seq: r for r in read_records(events)}
            segments = len(list(events.glob("*.jsonl")))
            assert segments > 3
            rows = p.query("SELECT seq, segment FROM events ORDER BY seq")[1]
            assert [s for s, _ in rows] == sorted(where)
            # each record says which segment holds it
            for seg in events.glob("*.jsonl"):
                for raw in seg.read_bytes().splitlines():
                    assert (json.loads(raw)["seq"], seg.name) in rows
            assert [r["id"] for r in p.list_spool(held=True)] == [f"M{i:02d}" for i in range(6, 20, 2)]
            assert len(p.list_spool()) == 15


# --- several nodes -------------------------------------------------------------------------------


def node_spool(root: Path, node: str) -> Spool:
    config = msgspec.structs.replace(load_config(data_dir=str(root / node)), node=node)
    return Spool.open(config, actor="cli:test")


def test_two_node_logs_read_at_once_keep_their_node(tmp_path: Path) -> None:
    ids: dict[str, list[str]] = {}
    for node in ("alpha", "beta"):
        with node_spool(tmp_path, node) as spool:
            ids[node] = [
                spool.enqueue(b"Subject: x\r\n\r\nx\r\n", f"s@{node}.example", ["r@y.example"]).id
                for _ in range(2)
            ]
            spool.hold(ids[node][:1])
    central = tmp_path / "central"
    with Projections.open(central, [tmp_path / "alpha" / "events", tmp_path / "beta" / "events"]) as p:
        p.catch_up()
        rows = p.query("SELECT node, count(*) FROM events GROUP BY node ORDER BY node")[1]
        assert rows == [("alpha", 3), ("beta", 3)]
        spool_rows = p.query("SELECT id, node, status FROM spool ORDER BY id")[1]
        assert {(i, n) for i, n, _ in spool_rows} == {(i, n) for n in ids for i in ids[n]}
        assert sorted(s for _, _, s in spool_rows) == ["held", "held", "waiting", "waiting"]
        assert {w.node for w in p.status().watermarks} == {"alpha", "beta"}
        with node_spool(tmp_path, "beta") as spool:
            spool.release(ids["beta"][:1])
        assert p.catch_up().events == 1
        assert len(p.list_spool(held=True)) == 1
    # a glob names the same logs: nothing to redo
    with Projections.open(central, [str(tmp_path / "*" / "events")]) as p:
        assert p.catch_up().events == 0
    # a log no longer given: the projections start again from the logs given
    with Projections.open(central, [tmp_path / "alpha" / "events"]) as p:
        result = p.catch_up()
        assert "no longer read" in result.rebuilt
        assert p.query("SELECT DISTINCT node FROM events")[1] == [("alpha",)]


def test_missing_event_dirs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ProjectionError, match="no event log directory"):
        Projections.open(tmp_path, [tmp_path / "nowhere"])
    with pytest.raises(ProjectionError, match="matches"):
        Projections.open(tmp_path, [str(tmp_path / "no*" / "events")])
    with Projections.open(tmp_path) as p:  # the default log may not exist yet
        assert p.catch_up().events == 0
        assert p.list_spool() == []


def test_records_of_newer_event_types_load(tmp_path: Path) -> None:
    lines = chain(2)
    future = json.loads(line(lines[-1], 3, ev.MessageHeld(id="M1")))
    future["payload"] = {"type": "teleported", "id": "M1", "to": "mars"}
    raw = json.dumps(future, separators=(",", ":")).encode()
    lines.append(raw)
    write_log(tmp_path / "events", lines)
    with Projections.open(tmp_path) as p:
        assert p.catch_up().events == 3
        assert p.query("SELECT type, payload->>'to' FROM events WHERE seq = 3")[1] == [("teleported", "mars")]
        assert [r["status"] for r in p.list_spool()] == ["waiting", "waiting"]
        assert p.status().watermarks[0].hash == hashlib.sha256(raw).hexdigest()
