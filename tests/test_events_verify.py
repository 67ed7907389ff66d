"""verify(): any edit, removal or reordering breaks the chain at the right seq, in the right segment."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from events import ChainBroken, EventLog, LogError, verify
from events.schema import MessageEnqueued
from events.segments import list_segments

COUNT = 50
SMALL = 2048  # 5 records per segment -> 10 segments
LAYOUTS = {"one-segment": 64 << 20, "many-segments": SMALL}
WORKERS = [1, None]


def _build(directory: Path, segment_bytes: int) -> None:
    with EventLog(directory, node="node-v", segment_bytes=segment_bytes) as el:
        for i in range(COUNT):
            el.append(
                MessageEnqueued(
                    id=f"msg-{i:04d}",
                    sender="a@example.org",
                    recipients=["b@example.net"],
                    size=i,
                    subspool="00",
                ),
                actor="smtp",
            )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, segment_bytes in LAYOUTS.items():
        directory = tmp_path_factory.mktemp(name) / "events"
        _build(directory, segment_bytes)
        out[name] = directory
    return out


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def log_dir(pristine: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    directory = tmp_path / "events"
    shutil.copytree(pristine[layout], directory)
    return directory


@pytest.fixture
def many_dir(pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the many-segments log only."""
    directory = tmp_path / "events"
    shutil.copytree(pristine["many-segments"], directory)
    return directory


# --- a view of the log as (segment, lines), edited and written back ---------------


class Lines:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segments = sorted(directory.glob("*.jsonl"))
        self.lines = {seg: seg.read_bytes().split(b"\n")[:-1] for seg in self.segments}

    def locate(self, seq: int) -> tuple[Path, int]:
        index = seq - 1
        for seg in self.segments:
            if index < len(self.lines[seg]):
                return seg, index
            index -= len(self.lines[seg])
        raise IndexError(seq)

    def get(self, seq: int) -> bytes:
        seg, i = self.locate(seq)
        return self.lines[seg][i]

    def set(self, seq: int, line: bytes) -> None:
        seg, i = self.locate(seq)
        self.lines[seg][i] = line

    def delete(self, seq: int) -> Path:
        seg, i = self.locate(seq)
        del self.lines[seg][i]
        return seg

    def is_last_in_segment(self, seq: int) -> bool:
        seg, i = self.locate(seq)
        return i == len(self.lines[seg]) - 1

    def write(self) -> None:
        for seg, lines in self.lines.items():
            seg.write_bytes(b"".join(line + b"\n" for line in lines))


def _flip_in_payload(line: bytes) -> bytes:
    """Flip one bit of one byte inside the payload's id value (keeps it valid JSON)."""
    at = line.index(b'"id":"msg-') + len(b'"id":"msg-') + 2
    return line[:at] + bytes([line[at] ^ 0x01]) + line[at + 1 :]


def _broken(directory: Path, workers: int | None) -> ChainBroken:
    with pytest.raises(ChainBroken) as info:
        verify(directory, workers=workers)
    exc = info.value
    assert isinstance(exc, LogError)
    assert exc.segment in str(exc)
    assert (directory / exc.segment).is_file()
    assert f"seq {exc.seq}" in str(exc)
    return exc


def _middle_seq(view: Lines) -> int:
    """A seq near the middle that is neither first nor last in its segment."""
    for seq in range(COUNT // 2, COUNT):
        seg, i = view.locate(seq)
        if 0 < i < len(view.lines[seg]) - 2:
            return seq
    raise AssertionError("no suitable seq")


# --- the untouched log ---------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_pristine_log_verifies(log_dir: Path, layout: str, workers: int | None) -> None:
    view = Lines(log_dir)
    if layout == "many-segments":
        assert len(view.segments) >= 4
    seen: list[int] = []
    result = verify(log_dir, progress=seen.append, workers=workers)
    assert result.count == result.head_seq == COUNT
    assert result.head_hash == hashlib.sha256(view.get(COUNT)).hexdigest()
    assert result.segments == len(view.segments)
    assert result.torn_tail_bytes == 0
    assert sum(seen) == COUNT


def test_empty_and_missing_directory_verify(tmp_path: Path) -> None:
    assert verify(tmp_path / "nope").count == 0
    (tmp_path / "empty").mkdir()
    result = verify(tmp_path / "empty")
    assert (result.count, result.head_seq, result.segments) == (0, 0, 0)


# --- tampering -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_flipped_byte_in_payload(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg, _ = view.locate(n)
    view.set(n, _flip_in_payload(view.get(n)))
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n
    assert exc.segment == seg.name


@pytest.mark.parametrize("workers", WORKERS)
def test_structural_byte_flip_in_payload(log_dir: Path, workers: int | None) -> None:
    """A flip that makes the record undecodable still names that record."""
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg, _ = view.locate(n)
    line = view.get(n)
    at = line.index(b'"payload":{') + len(b'"payload":')
    view.set(n, line[:at] + b"[" + line[at + 1 :])
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n
    assert exc.segment == seg.name


def test_flip_at_every_position_names_its_seq(log_dir: Path) -> None:
    """Every record but the last (which the chain cannot see) is protected."""
    original = {p: p.read_bytes() for p in log_dir.glob("*.jsonl")}
    for n in range(1, COUNT):
        view = Lines(log_dir)
        view.set(n, _flip_in_payload(view.get(n)))
        view.write()
        with pytest.raises(ChainBroken) as info:
            verify(log_dir, workers=1)
        assert info.value.seq == n, f"flipped seq {n}, verify said {info.value.seq}"
        for path, data in original.items():
            path.write_bytes(data)
    assert verify(log_dir, workers=1).count == COUNT


@pytest.mark.parametrize("workers", WORKERS)
def test_changed_last_record_is_caught_only_if_undecodable(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    last = view.get(COUNT)
    view.set(COUNT, _flip_in_payload(last))
    view.write()
    # documented: the chain cannot see an edit of the very last record, but the head hash moves
    result = verify(log_dir, workers=workers)
    assert result.head_hash != hashlib.sha256(last).hexdigest()
    view.set(COUNT, last[:-3] + b"!}}")
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == COUNT


@pytest.mark.parametrize("workers", WORKERS)
def test_deleted_record(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg = view.delete(n)
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n
    assert exc.segment == seg.name


def test_delete_at_every_position_names_its_seq(log_dir: Path) -> None:
    original = {p: p.read_bytes() for p in log_dir.glob("*.jsonl")}
    for n in range(1, COUNT):
        view = Lines(log_dir)
        view.delete(n)
        view.write()
        with pytest.raises(ChainBroken) as info:
            verify(log_dir, workers=1)
        assert info.value.seq == n, f"deleted seq {n}, verify said {info.value.seq}"
        for path, data in original.items():
            path.write_bytes(data)


@pytest.mark.parametrize("workers", WORKERS)
def test_swapped_records(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg, _ = view.locate(n)
    a, b = view.get(n), view.get(n + 1)
    view.set(n, b)
    view.set(n + 1, a)
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n
    assert exc.segment == seg.name


def test_swap_at_every_position_names_its_seq(log_dir: Path) -> None:
    """(Swaps of a segment's first record are tested below.)"""
    original = {p: p.read_bytes() for p in log_dir.glob("*.jsonl")}
    for n in range(1, COUNT):
        view = Lines(log_dir)
        if view.locate(n)[1] == 0:
            continue
        a, b = view.get(n), view.get(n + 1)
        view.set(n, b)
        view.set(n + 1, a)
        view.write()
        with pytest.raises(ChainBroken) as info:
            verify(log_dir, workers=1)
        assert info.value.seq == n, f"swapped {n} and {n + 1}, verify said {info.value.seq}"
        for path, data in original.items():
            path.write_bytes(data)


@pytest.mark.parametrize("workers", WORKERS)
def test_duplicated_record(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg, i = view.locate(n)
    view.lines[seg].insert(i + 1, view.get(n))
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n + 1
    assert exc.segment == seg.name


@pytest.mark.parametrize("workers", WORKERS)
def test_rechained_forgery_is_caught_at_the_edit(log_dir: Path, workers: int | None) -> None:
    """Editing record N and rewriting N+1's prev to match moves the break, but still to N+1."""
    view = Lines(log_dir)
    n = _middle_seq(view)
    edited = _flip_in_payload(view.get(n))
    view.set(n, edited)
    nxt = view.get(n + 1)
    view.set(n + 1, nxt[:9] + hashlib.sha256(edited).hexdigest().encode() + nxt[73:])
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n + 1


@pytest.mark.parametrize("workers", WORKERS)
def test_truncated_last_line_is_a_torn_tail_then_repaired(log_dir: Path, workers: int | None) -> None:
    segs = sorted(log_dir.glob("*.jsonl"))
    last_seg = segs[-1]
    data = last_seg.read_bytes()
    cut = 25
    last_seg.write_bytes(data[:-cut])
    last_line_len = len(data.split(b"\n")[-2]) + 1
    result = verify(log_dir, workers=workers)
    assert result.torn_tail_bytes == last_line_len - cut
    assert result.count == result.head_seq == COUNT - 1
    view = Lines(log_dir)
    assert result.head_hash == hashlib.sha256(view.get(COUNT - 1)).hexdigest()

    with EventLog(log_dir, node="node-v", segment_bytes=SMALL) as el:
        repaired = el.repair()
    assert repaired is not None
    assert repaired.seq == COUNT
    assert repaired.type == "log_repaired"
    result = verify(log_dir, workers=workers)
    assert (result.count, result.torn_tail_bytes) == (COUNT, 0)


@pytest.mark.parametrize("workers", WORKERS)
def test_incomplete_line_in_a_middle_segment(many_dir: Path, workers: int | None) -> None:
    log_dir = many_dir
    segs = sorted(log_dir.glob("*.jsonl"))
    middle = segs[len(segs) // 2]
    data = middle.read_bytes()
    middle.write_bytes(data[:-10])
    exc = _broken(log_dir, workers)
    assert exc.segment == middle.name


@pytest.mark.parametrize("workers", WORKERS)
def test_removed_middle_segment(many_dir: Path, workers: int | None) -> None:
    log_dir = many_dir
    segs = list_segments(log_dir)
    gone = segs[2]
    first_missing = int(gone.name.split(".")[0])
    gone.unlink()
    exc = _broken(log_dir, workers)
    assert exc.seq == first_missing
    assert exc.segment == segs[3].name


# --- bugs --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKERS)
def test_flip_at_end_of_segment_names_the_segment_holding_it(many_dir: Path, workers: int | None) -> None:
    directory = many_dir
    view = Lines(directory)
    seg = view.segments[1]
    n = int(seg.name.split(".")[0]) + len(view.lines[seg]) - 1
    assert view.is_last_in_segment(n)
    view.set(n, _flip_in_payload(view.get(n)))
    view.write()
    exc = _broken(directory, workers)
    assert exc.seq == n
    assert exc.segment == seg.name


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda line: b"\x00" * len(line), id="zeroed"),
        pytest.param(lambda line: line[:81] + b"X" + line[82:], id="seq-digit"),
        pytest.param(lambda line: b"garbage", id="garbage"),
    ],
)
def test_unparsable_record_in_the_middle_is_named(log_dir: Path, corrupt: Callable[[bytes], bytes]) -> None:
    view = Lines(log_dir)
    n = _middle_seq(view)
    seg, _ = view.locate(n)
    view.set(n, corrupt(view.get(n)))
    view.write()
    exc = _broken(log_dir, 1)
    assert exc.seq == n
    assert exc.segment == seg.name


@pytest.mark.parametrize("workers", WORKERS)
def test_swap_of_first_record_of_a_segment(log_dir: Path, workers: int | None) -> None:
    view = Lines(log_dir)
    seg = view.segments[-2] if len(view.segments) > 1 else view.segments[0]
    n = int(seg.name.split(".")[0])
    assert view.locate(n) == (seg, 0)
    a, b = view.get(n), view.get(n + 1)
    view.set(n, b)
    view.set(n + 1, a)
    view.write()
    exc = _broken(log_dir, workers)
    assert exc.seq == n
    assert exc.segment == seg.name
