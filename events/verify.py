"""Checking the hash chain and seq order of the whole log.

Each line's `prev` must be the SHA-256 of the line before it (across
segments) and each seq one more than the last. The hot loop reads `prev`
and `seq` at fixed offsets of the canonical encoding and only decodes a line
fully to explain a failure, so it runs at hashing speed.

What the chain cannot see: a change to the very last record, or records cut
off cleanly at the end. `verify` decodes the last record and reports the
head (seq and hash) so an auditor can anchor it elsewhere.

Failure rules: the first break raises ChainBroken naming the seq and the
segment; a torn tail (incomplete last line) is not a break: it is reported
in the result and repaired by the next append.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from events.errors import ChainBroken
from events.schema import GENESIS, decode_record
from events.segments import PREV_END, PREV_START, SEQ_START, list_segments


class VerifyResult(msgspec.Struct, frozen=True):
    count: int
    head_seq: int
    head_hash: str
    segments: int
    torn_tail_bytes: int = 0


class _SegmentResult(msgspec.Struct, frozen=True):
    """What one segment says about itself, checked without its neighbours."""

    count: int
    first_seq: int = 0
    first_prev: bytes = b""
    last_seq: int = 0
    last_hash: bytes = b""
    last_line: bytes = b""
    torn: int = 0
    error: str = ""
    error_seq: int = 0


def _check_file(path: Path) -> _SegmentResult:
    data = path.read_bytes()
    lines = data.split(b"\n")
    rest = lines.pop()
    if not lines:
        return _SegmentResult(count=0, torn=len(rest))
    first = lines[0]
    first_prev = first[PREV_START:PREV_END]
    try:
        first_seq = int(first[SEQ_START : first.find(b",", SEQ_START)])
    except ValueError:
        try:
            rec = decode_record(first)
            first_seq, first_prev = rec.seq, rec.prev.encode()
        except msgspec.DecodeError:
            first_seq, first_prev = 0, b""  # _join explains the first line
    try:
        last_seq, last_hash = _check_segment(lines, first_seq - 1, first_prev, path)
    except ChainBroken as exc:
        return _SegmentResult(
            count=0, first_seq=first_seq, first_prev=first_prev, error=str(exc), error_seq=exc.seq
        )
    return _SegmentResult(
        count=len(lines),
        first_seq=first_seq,
        first_prev=first_prev,
        last_seq=last_seq,
        last_hash=last_hash,
        last_line=lines[-1],
        torn=len(rest),
    )


def verify(
    directory: Path,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> VerifyResult:
    """Verify every segment; segments are hashed in parallel, joined in order."""
    segments = list_segments(Path(directory))
    workers = workers or min(len(segments), os.cpu_count() or 1)
    if workers > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            results = pool.imap(_check_file, segments)
            return _join(segments, results, progress)
    return _join(segments, map(_check_file, segments), progress)


def _join(
    segments: list[Path],
    results: Iterable[_SegmentResult],
    progress: Callable[[int], None] | None,
) -> VerifyResult:
    seq, prev = 0, GENESIS.encode()
    last_line, last_path, torn = b"", None, 0
    for index, (path, res) in enumerate(zip(segments, results, strict=True)):
        if (res.first_seq or res.error) and (res.first_seq != seq + 1 or res.first_prev != prev):
            # the segment's first line does not continue the chain: explain it
            _explain(_first_line(path), seq + 1, prev, path, previous=last_path)
        if res.error:
            raise ChainBroken(res.error, seq=res.error_seq, segment=path.name)
        if res.torn and index != len(segments) - 1:
            raise ChainBroken(
                f"seq {seq + 1} in segment {path.name}: incomplete line in the middle of the log",
                seq=seq + 1,
                segment=path.name,
            )
        torn = res.torn
        if res.count:
            seq, prev = res.last_seq, res.last_hash
            last_line, last_path = res.last_line, path
        if progress is not None:
            progress(res.count)
    if last_line and last_path is not None:
        try:
            decode_record(last_line)
        except msgspec.DecodeError as exc:
            _break(last_line, seq, last_path, f"last record does not decode ({exc})")
    return VerifyResult(
        count=seq,
        head_seq=seq,
        head_hash=prev.decode(),
        segments=len(segments),
        torn_tail_bytes=torn,
    )


def _first_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\n")


def _check_segment(lines: list[bytes], seq: int, prev: bytes, path: Path) -> tuple[int, bytes]:
    """Check a segment's lines in bulk (list operations run in C); explain the first failure."""
    sha256 = hashlib.sha256
    hashes = [sha256(line).hexdigest().encode() for line in lines]
    prevs = [line[PREV_START:PREV_END] for line in lines]
    expected_prevs = [prev, *hashes[:-1]]
    seqs: list[int | None]
    try:
        seqs = [int(line[SEQ_START : line.find(b",", SEQ_START)]) for line in lines]
    except ValueError:  # some line is damaged: find it line by line
        seqs = [_seq_or_none(line) for line in lines]
    expected_seqs = list(range(seq + 1, seq + 1 + len(lines)))
    if prevs != expected_prevs or seqs != expected_seqs:
        for i, line in enumerate(lines):
            ok_seq = seqs[i] == expected_seqs[i]
            if prevs[i] != expected_prevs[i] or not ok_seq:
                _explain(line, expected_seqs[i], expected_prevs[i], path)
    return expected_seqs[-1], hashes[-1]


def _seq_or_none(line: bytes) -> int | None:
    try:
        return int(line[SEQ_START : line.find(b",", SEQ_START)])
    except ValueError:
        return None


def _break(line: bytes, seq: int, path: Path, why: str) -> None:
    raise ChainBroken(f"seq {seq} in segment {path.name}: {why}", seq=seq, segment=path.name)


def _explain(line: bytes, expected_seq: int, prev: bytes, path: Path, previous: Path | None = None) -> None:
    """Say precisely what is wrong with `line`, which failed the fast checks."""
    try:
        record = decode_record(line)
    except msgspec.DecodeError as exc:
        raise ChainBroken(
            f"seq {expected_seq} in segment {path.name}: record does not decode ({exc})",
            seq=expected_seq,
            segment=path.name,
        ) from exc
    if record.seq != expected_seq:
        if record.seq > expected_seq:
            why = f"expected seq {expected_seq}, found seq {record.seq}: records are missing or reordered"
        else:
            why = f"expected seq {expected_seq}, found seq {record.seq}: records are repeated or reordered"
        _break(line, expected_seq, path, why)
    if record.prev.encode() != prev:
        # The line before this one is not the one this record was chained to:
        # that earlier record was edited (or this link was).
        _break(
            line,
            expected_seq - 1,
            previous or path,
            f"record was altered: its hash does not match the prev of seq {expected_seq}",
        )
    _break(line, expected_seq, path, "record is not in canonical form")
