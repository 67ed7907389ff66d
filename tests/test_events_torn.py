"""A torn tail (crash mid-write) is invisible to readers, reported by verify, and repaired by the writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from events import EventLog, head_seq, last_records, read_records, verify
from events.schema import LogRepaired, MessageHeld, Record, decode_record, encode_record

NODE = "node-t"


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def disk_lines(directory: Path) -> list[bytes]:
    out: list[bytes] = []
    for seg in segment_files(directory):
        data = seg.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{seg.name} does not end with a newline"
        out.extend(data.split(b"\n")[:-1])
    return out


def assert_chain(lines: list[bytes]) -> None:
    prev = "0" * 64
    for expected_seq, line in enumerate(lines, start=1):
        obj = json.loads(line)
        assert obj["seq"] == expected_seq
        assert obj["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()


def build(directory: Path, count: int, segment_bytes: int = 64 << 20) -> list[Record]:
    with EventLog(directory, node=NODE, segment_bytes=segment_bytes) as el:
        return [el.append(MessageHeld(id=f"msg-{i:04d}"), actor="smtp") for i in range(count)]


def next_line(records: list[Record], ident: str = "crashed") -> bytes:
    """The line the writer would have written next (what a crash cut in half)."""
    last = records[-1]
    record = Record(
        prev=hashlib.sha256(encode_record(last)).hexdigest(),
        seq=last.seq + 1,
        at=last.at,
        actor="smtp",
        node=NODE,
        payload=MessageHeld(id=ident),
    )
    return encode_record(record) + b"\n"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "events"


# --- before repair: readers and verify ---------------------------------------------


@pytest.mark.parametrize("workers", [1, None])
def test_torn_tail_invisible_to_readers_and_reported_by_verify(log_dir: Path, workers: int | None) -> None:
    records = build(log_dir, 10)
    seg = segment_files(log_dir)[-1]
    torn = next_line(records)[:50]
    with open(seg, "ab") as f:
        f.write(torn)

    assert [r.seq for r in read_records(log_dir)] == list(range(1, 11))
    assert list(read_records(log_dir, from_seq=10)) == [records[-1]]
    assert last_records(log_dir, 3) == records[-3:]
    assert head_seq(log_dir) == 10

    result = verify(log_dir, workers=workers)
    assert result.torn_tail_bytes == len(torn)
    assert (result.count, result.head_seq) == (10, 10)
    assert result.head_hash == hashlib.sha256(encode_record(records[-1])).hexdigest()
    # nothing was touched by reading or verifying
    assert seg.read_bytes().endswith(torn)
    assert not list(log_dir.glob("*.torn"))


# --- repair --------------------------------------------------------------------------


@pytest.mark.parametrize("segment_bytes", [64 << 20, 1024])
def test_repair_cuts_keeps_and_records(log_dir: Path, segment_bytes: int) -> None:
    records = build(log_dir, 20, segment_bytes)
    seg = segment_files(log_dir)[-1]
    intact = seg.read_bytes()
    earlier = {p: p.read_bytes() for p in segment_files(log_dir)[:-1]}
    full = next_line(records)
    torn = full[: len(full) // 2]
    with open(seg, "ab") as f:
        f.write(torn)

    with EventLog(log_dir, node="node-r", segment_bytes=segment_bytes) as el:
        repaired = el.repair()
        assert el.repair() is None  # nothing left to repair

    assert repaired is not None
    assert repaired.seq == 21
    assert repaired.actor == "system"
    assert repaired.node == "node-r"
    assert repaired.payload == LogRepaired(
        segment=seg.name, torn_bytes=len(torn), kept_in=f"{seg.name}.20.torn", after_seq=20
    )
    # the torn bytes are kept next to the segment, byte for byte
    kept = log_dir / f"{seg.name}.20.torn"
    assert kept.read_bytes() == torn
    assert sorted(p.name for p in log_dir.glob("*.torn")) == [kept.name]
    assert not list(log_dir.glob("*.tmp"))
    # the segment: everything before the tear untouched, then the log_repaired record
    # (in a new segment if it does not fit in this one)
    repair_line = encode_record(repaired) + b"\n"
    if len(intact) + len(repair_line) <= segment_bytes:
        assert seg.read_bytes() == intact + repair_line
    else:
        assert seg.read_bytes() == intact
        assert (log_dir / "0000000000000021.jsonl").read_bytes() == repair_line
    for path, data in earlier.items():
        assert path.read_bytes() == data
    lines = disk_lines(log_dir)
    assert len(lines) == 21
    assert_chain(lines)
    on_disk = decode_record(lines[-1])
    assert on_disk == repaired
    assert on_disk.type == "log_repaired"

    result = verify(log_dir)
    assert (result.count, result.torn_tail_bytes) == (21, 0)
    assert verify(log_dir, workers=1) == result


def test_first_append_after_open_repairs_first(log_dir: Path) -> None:
    records = build(log_dir, 10)
    seg = segment_files(log_dir)[-1]
    torn = next_line(records)[:-1]  # everything but the newline: still torn
    with open(seg, "ab") as f:
        f.write(torn)

    with EventLog(log_dir, node=NODE) as el:
        appended = el.append(MessageHeld(id="after-crash"), actor="smtp")

    assert appended.seq == 12
    lines = disk_lines(log_dir)
    assert len(lines) == 12
    assert_chain(lines)
    repair = decode_record(lines[10])
    assert repair.seq == 11
    assert repair.payload == LogRepaired(
        segment=seg.name, torn_bytes=len(torn), kept_in=f"{seg.name}.10.torn", after_seq=10
    )
    assert lines[11] == encode_record(appended)
    assert (log_dir / f"{seg.name}.10.torn").read_bytes() == torn
    assert verify(log_dir).count == 12


def test_repair_without_torn_tail_does_nothing(log_dir: Path) -> None:
    build(log_dir, 5)
    before = {p.name: p.read_bytes() for p in log_dir.iterdir()}
    with EventLog(log_dir, node=NODE) as el:
        assert el.repair() is None
    after = {p.name: p.read_bytes() for p in log_dir.iterdir()}
    assert after == before


def test_nul_last_line_ending_in_newline_is_torn(log_dir: Path) -> None:
    records = build(log_dir, 10)
    seg = segment_files(log_dir)[-1]
    intact = seg.read_bytes()
    garbage = b"\x00" * 100 + b"\n"
    with open(seg, "ab") as f:
        f.write(garbage)

    with EventLog(log_dir, node=NODE) as el:
        repaired = el.repair()
    assert repaired is not None
    assert repaired.payload == LogRepaired(
        segment=seg.name, torn_bytes=len(garbage), kept_in=f"{seg.name}.10.torn", after_seq=10
    )
    assert (log_dir / f"{seg.name}.10.torn").read_bytes() == garbage
    assert seg.read_bytes() == intact + encode_record(repaired) + b"\n"
    assert [r.seq for r in read_records(log_dir)] == list(range(1, 12))
    assert list(read_records(log_dir, to_seq=10)) == records
    assert verify(log_dir).count == 11


def test_nul_line_plus_torn_bytes_is_torn(log_dir: Path) -> None:
    records = build(log_dir, 8)
    seg = segment_files(log_dir)[-1]
    garbage = b"\x00" * 64 + b"\n" + b"\x00" * 30
    with open(seg, "ab") as f:
        f.write(garbage)
    with EventLog(log_dir, node=NODE) as el:
        repaired = el.repair()
    assert repaired is not None
    assert isinstance(repaired.payload, LogRepaired)
    assert (repaired.payload.torn_bytes, repaired.payload.after_seq) == (len(garbage), 8)
    assert list(read_records(log_dir, to_seq=8)) == records
    assert verify(log_dir).count == 9


def test_writer_already_open_repairs_a_tear_left_by_another_process(log_dir: Path) -> None:
    """A long-running writer must notice a tail torn by a crashed peer before its next write."""
    with EventLog(log_dir, node="daemon") as daemon:
        records = [daemon.append(MessageHeld(id=f"d{i}"), actor="smtp") for i in range(5)]
        seg = segment_files(log_dir)[-1]
        torn = next_line(records, "peer")[:40]
        with open(seg, "ab") as f:  # the CLI process died mid-write
            f.write(torn)
        appended = daemon.append(MessageHeld(id="d5"), actor="smtp")
    assert appended.seq == 7
    lines = disk_lines(log_dir)
    assert_chain(lines)
    repair = decode_record(lines[5])
    assert isinstance(repair.payload, LogRepaired)
    assert (repair.payload.torn_bytes, repair.payload.after_seq) == (len(torn), 5)
    assert (log_dir / f"{seg.name}.5.torn").read_bytes() == torn
    assert verify(log_dir).count == 7


def test_segment_that_is_only_torn_bytes_is_emptied(log_dir: Path) -> None:
    """The very first write of a log torn: nothing valid at all."""
    log_dir.mkdir()
    seg = log_dir / "0000000000000001.jsonl"
    seg.write_bytes(b'{"prev":"0000')
    assert list(read_records(log_dir)) == []
    assert verify(log_dir).torn_tail_bytes == 13
    with EventLog(log_dir, node=NODE) as el:
        r = el.append(MessageHeld(id="first"), actor="smtp")
    assert r.seq == 2
    lines = disk_lines(log_dir)
    assert_chain(lines)
    repair = decode_record(lines[0])
    assert isinstance(repair.payload, LogRepaired)
    assert (repair.payload.torn_bytes, repair.payload.after_seq) == (13, 0)
    assert (log_dir / f"{seg.name}.0.torn").read_bytes() == b'{"prev":"0000'


# --- bugs ------------------------------------------------------------------------------


def test_long_nul_last_line_does_not_cut_valid_records(log_dir: Path) -> None:
    records = build(log_dir, 40)
    seg = segment_files(log_dir)[-1]
    intact = seg.read_bytes()
    garbage = b"\x00" * 8000 + b"\n"  # two pages of zeros ending in a newline
    with open(seg, "ab") as f:
        f.write(garbage)
    with EventLog(log_dir, node=NODE) as el:
        repaired = el.repair()
    assert repaired is not None
    assert isinstance(repaired.payload, LogRepaired)
    assert (repaired.payload.torn_bytes, repaired.payload.after_seq) == (len(garbage), 40)
    assert seg.read_bytes().startswith(intact)
    assert list(read_records(log_dir, to_seq=40)) == records
    assert verify(log_dir).count == 41


def test_torn_first_line_of_a_new_segment_names_the_seq_before_it(log_dir: Path) -> None:
    records = build(log_dir, 12, segment_bytes=1000)
    assert len(segment_files(log_dir)) >= 2
    new_seg = log_dir / f"{records[-1].seq + 1:016d}.jsonl"  # the roll happened, the write tore
    torn = next_line(records)[:30]
    new_seg.write_bytes(torn)
    with EventLog(log_dir, node=NODE, segment_bytes=1000) as el:
        repaired = el.repair()
    assert repaired is not None
    assert repaired.seq == 13
    assert repaired.payload == LogRepaired(
        segment=new_seg.name, torn_bytes=len(torn), kept_in=f"{new_seg.name}.12.torn", after_seq=12
    )
    assert (log_dir / f"{new_seg.name}.12.torn").read_bytes() == torn
