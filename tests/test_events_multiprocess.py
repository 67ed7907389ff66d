"""Several processes append to one log at once (the daemon's workers and CLI commands do)."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from events import read_records, verify

ROOT = Path(__file__).resolve().parents[1]

# Each process: its own EventLog on the shared directory, a few threads appending
# (single events and small batches) until a deadline or a count limit, whichever
# comes first; prints how many events it was acknowledged, then the ids.
WORKER = r"""
import sys, threading, time
from pathlib import Path
from events import EventLog
from events.schema import MessageHeld

directory, node = Path(sys.argv[1]), sys.argv[2]
start_at, duration, limit = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
segment_bytes = int(sys.argv[6])
log = EventLog(directory, node=node, segment_bytes=segment_bytes)
acked = []
lock = threading.Lock()
while time.time() < start_at:
    time.sleep(0.002)
deadline = time.monotonic() + duration

def work(t):
    i = 0
    while i < limit and time.monotonic() < deadline:
        if i % 7 == 6:
            batch = [MessageHeld(id=f"{node}-{t}-{i}-{k}") for k in range(3)]
            recs = log.append_many(batch, actor=node)
        else:
            recs = [log.append(MessageHeld(id=f"{node}-{t}-{i}"), actor=node)]
        with lock:
            acked.extend((r.seq, r.payload.id) for r in recs)
        i += 1

threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
for th in threads:
    th.start()
for th in threads:
    th.join()
log.close()
print(len(acked))
for seq, ident in acked:
    print(seq, ident)
"""


def _run_writers(
    directory: Path, nodes: list[str], duration: float, limit: int, segment_bytes: int
) -> dict[str, list[tuple[int, str]]]:
    start_at = time.time() + 1.0  # let every interpreter start before any appends
    procs = {
        node: subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(directory),
                node,
                str(start_at),
                str(duration),
                str(limit),
                str(segment_bytes),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in nodes
    }
    acked: dict[str, list[tuple[int, str]]] = {}
    try:
        for node, proc in procs.items():
            out, err = proc.communicate(timeout=duration + 30)
            assert proc.returncode == 0, f"{node} failed:\n{err}"
            lines = out.splitlines()
            count = int(lines[0])
            pairs = [(int(s), ident) for s, ident in (line.split() for line in lines[1:])]
            assert len(pairs) == count
            acked[node] = pairs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return acked


@pytest.mark.slow
@pytest.mark.parametrize("segment_bytes", [64 << 20, 32 << 10])
def test_processes_append_concurrently(tmp_path: Path, segment_bytes: int) -> None:
    directory = tmp_path / "events"
    nodes = ["p1", "p2", "p3"]
    acked = _run_writers(directory, nodes, duration=2.0, limit=3000, segment_bytes=segment_bytes)
    total = sum(len(pairs) for pairs in acked.values())
    assert all(len(pairs) > 0 for pairs in acked.values())

    # read the segment files ourselves
    segs = sorted(directory.glob("*.jsonl"))
    if segment_bytes < (1 << 20):
        assert len(segs) > 1, "expected the small segment size to roll"
    lines: list[bytes] = []
    for seg in segs:
        data = seg.read_bytes()
        assert data.endswith(b"\n")
        seg_lines = data.split(b"\n")[:-1]
        assert seg.name == f"{json.loads(seg_lines[0])['seq']:016d}.jsonl"
        lines.extend(seg_lines)
    assert len(lines) == total

    prev = "0" * 64
    by_seq: dict[int, tuple[str, str]] = {}
    for expected_seq, line in enumerate(lines, start=1):
        obj = json.loads(line)
        assert obj["seq"] == expected_seq
        assert obj["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()
        by_seq[expected_seq] = (obj["node"], obj["payload"]["id"])

    # every acknowledged event is on disk, once, at the seq its writer was told
    for node, pairs in acked.items():
        for seq, ident in pairs:
            assert by_seq[seq] == (node, ident)
    per_node = collections.Counter(node for node, _ in by_seq.values())
    assert per_node == {node: len(pairs) for node, pairs in acked.items()}
    assert len({ident for _, ident in by_seq.values()}) == total

    # the appends really interleaved: no process wrote all its records in one run
    runs = sum(1 for a, b in itertools.pairwise(lines) if json.loads(a)["node"] != json.loads(b)["node"])
    assert runs >= len(nodes)

    result = verify(directory)
    assert (result.count, result.head_seq, result.torn_tail_bytes) == (total, total, 0)
    assert verify(directory, workers=1) == result
    assert sum(1 for _ in read_records(directory)) == total
    assert not list(directory.glob("*.torn"))
