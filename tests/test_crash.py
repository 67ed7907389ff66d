"""SIGKILL a process working on the spool, many times; nothing acknowledged is lost.

After every kill: `fsck --repair` mends what the crash left, a second fsck
finds nothing, `events verify` passes, every operation the child reported
as done has its event in the log, every message it enqueued and did not
delete is in the spool with the exact bytes, and the sidecars equal the
state replayed from the log.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from events import read_records, verify
from spoolfs.config import load_config
from spoolfs.fsck import fsck, replay_log
from spoolfs.spool import Spool
from spoolfs.state import decode_sidecar

CHILD = Path(__file__).with_name("crash_child.py")
KILLS = int(os.environ.get("SPOOL_CRASH_KILLS", "50"))


def run_child_and_kill(data: Path, seed: int, delay: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(data), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == b"ready\n", (first, proc.stderr.read() if proc.stderr else b"")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    # the last line may be cut by the kill: it was not fully reported, so ignore it
    lines = out.decode().split("\n")
    return [line for line in lines[:-1] if line]


@pytest.mark.slow
def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = random.Random(1234)
    reported_events: dict[int, tuple[str, str]] = {}  # seq -> (kind, id)
    bodies: dict[str, str] = {}
    deleted: set[str] = set()
    total_kills = 0
    for i in range(KILLS):
        lines = run_child_and_kill(data, seed=i, delay=rng.uniform(0.05, 0.6))
        total_kills += 1
        for line in lines:
            parts = line.split()
            if parts[0] == "enq":
                _, mid, seq, sha = parts
                bodies[mid] = sha
                reported_events[int(seq)] = ("message_enqueued", mid)
            elif parts[0] == "del":
                _, mid, seq = parts
                deleted.add(mid)
                reported_events[int(seq)] = ("message_deleted", mid)
            elif parts[0] == "op":
                _, _, mid, seq = parts
                reported_events[int(seq)] = ("change", mid)

        with Spool.open(load_config(data_dir=str(data)), actor="cli:test") as spool:
            fsck(spool, repair=True, tmp_age=0)
            second = fsck(spool, repair=False, tmp_age=0)
            assert second.problems == [], f"kill {i}: fsck left {second.problems}"
            result = verify(spool.layout.events, workers=1)
            assert result.torn_tail_bytes == 0

            by_seq = {r.seq: r for r in read_records(spool.layout.events)}
            for seq, (kind, mid) in reported_events.items():
                record = by_seq.get(seq)
                assert record is not None, f"kill {i}: acknowledged event seq {seq} is missing"
                assert getattr(record.payload, "id", None) == mid
                if kind != "change":
                    assert record.type == kind

            state = replay_log(spool)
            for mid, sha in bodies.items():
                if mid in deleted:
                    assert mid not in state.states
                    continue
                if mid not in state.states:
                    # deleted by the child after all, the kill came before it said so
                    story = [r.payload for r in by_seq.values() if getattr(r.payload, "id", None) == mid]
                    types = [type(p).__name__ for p in story]
                    assert "MessageDeleted" in types, f"kill {i}: acknowledged message {mid} lost: {types}"
                    assert "MovedToCorrupt" not in types
                    assert all(getattr(p, "action", "") != "forgotten" for p in story), types
                    continue
                body = spool.layout.eml(mid).read_bytes()
                assert hashlib.sha256(body).hexdigest() == sha, f"kill {i}: body of {mid} changed"
            on_disk = {}
            for mid in spool.ids():
                on_disk[mid] = decode_sidecar(spool.layout.sidecar(mid).read_bytes())
            assert on_disk == state.states, f"kill {i}: sidecars differ from the replayed log"
    assert total_kills >= 50 or KILLS < 50
    assert len(bodies) > 0
