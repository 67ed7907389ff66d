"""SIGKILL a process adding, deleting and resending quarantined mail, many times.

After every kill, before any repair: no half file under a final name (every
sidecar decodes and its body is complete, every body has the size its event
says). After `recover`: the files are exactly what the log says, tmp/ is
empty, everything the child reported as done is so, and the log verifies.
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
from events import schema as ev
from spoolfs.config import load_config
from spoolfs.quarantine import KINDS, Quarantine, decode_entry
from spoolfs.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("SPOOL_QUARANTINE_KILLS", "12"))
pytestmark = pytest.mark.slow

# The child: prints "ready", then one line per operation once it has returned
# (acknowledged): "add ID SHA256", "del ID", "res ID NEW_ID".
CHILD = """
import hashlib, random, sys
from events.schema import Verdict
from spoolfs.config import load_config
from spoolfs.quarantine import Quarantine, QuarantineError, NotInQuarantine
from spoolfs.spool import Spool

data, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
config = load_config(data_dir=data)
spool = Spool.open(config, actor="cli:crash")
q = Quarantine.for_spool(spool, config)
mine = {"spam": [], "virus": []}
print("ready", flush=True)
while True:
    kind = rng.choice(["spam", "virus"])
    roll = rng.random()
    if roll < 0.7 or not mine[kind]:
        body = b"Subject: crash\\r\\n\\r\\n" + rng.randbytes(rng.randint(10_000, 1_500_000))
        verdict = Verdict(virus="Test.Virus" if kind == "virus" else "", score=rng.uniform(5, 1000), threshold=5.0)
        e = q.add(body, "sender@example.org", ["r@example.net"], kind, verdict)
        mine[kind].append(e.id)
        print(f"add {e.id} {hashlib.sha256(body).hexdigest()}", flush=True)
    elif roll < 0.85 or kind == "virus":
        target = mine[kind].pop(rng.randrange(len(mine[kind])))
        q.delete(kind, [target])
        print(f"del {target}", flush=True)
    else:
        target = mine["spam"].pop(rng.randrange(len(mine["spam"])))
        ((old, new),) = q.resend(spool, [target])
        print(f"res {old} {new}", flush=True)
"""


def run_child_and_kill(data: Path, seed: int, delay: float) -> list[list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == b"ready\n", (first, proc.stderr.read() if proc.stderr else b"")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    lines = out.decode().split("\n")
    return [line.split() for line in lines[:-1] if line]  # the last line may be cut: not acknowledged


def last_events(data: Path) -> dict[str, ev.Record]:
    last: dict[str, ev.Record] = {}
    for r in read_records(data / "events"):
        if isinstance(r.payload, ev.MessageQuarantined | ev.QuarantineDeleted | ev.QuarantineResent):
            last[r.payload.id] = r
    return last


def check_no_half_files(data: Path) -> None:
    """What a reader may see right after the crash, before any repair."""
    last = last_events(data)
    for kind in KINDS:
        directory = data / "quarantine" / kind
        for path in directory.iterdir():
            mid, _, ext = path.name.partition(".")
            if ext == "json":
                entry = decode_entry(path.read_bytes())  # a complete, readable sidecar
                body = directory / f"{mid}.eml"
                assert body.exists(), f"sidecar without its body: {path}"
                assert body.stat().st_size == entry.size
            else:
                assert ext == "eml", path
                record = last.get(mid)
                assert record is not None, f"a body the log never heard of: {path}"
                first = next(
                    r.payload
                    for r in read_records(data / "events")
                    if isinstance(r.payload, ev.MessageQuarantined) and r.payload.id == mid
                )
                assert path.stat().st_size == first.size, f"half-written body under its final name: {path}"


def test_sigkill_mid_write_leaves_no_half_files_and_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = load_config(data_dir=str(data))
    rng = random.Random(11)
    added: dict[str, str] = {}  # acknowledged adds -> sha256
    removed: set[str] = set()
    resent: dict[str, str] = {}
    for round_ in range(KILLS):
        for op, *args in run_child_and_kill(data, round_, rng.uniform(0.05, 0.6)):
            if op == "add":
                added[args[0]] = args[1]
            elif op == "del":
                removed.add(args[0])
            else:
                removed.add(args[0])
                resent[args[0]] = args[1]
        check_no_half_files(data)
        with Spool.open(config, actor="system") as spool:
            q = Quarantine.for_spool(spool, config)
            q.recover(tmp_age=0)
            assert list((data / "quarantine" / "tmp").iterdir()) == []
            last = last_events(data)
            present = {kind: set(q.ids(kind)) for kind in KINDS}
            for mid, record in last.items():
                p = record.payload
                if isinstance(p, ev.MessageQuarantined):
                    assert mid in present[p.kind], f"{mid}: the log has it, the quarantine does not"
                    body = q.message_bytes(p.kind, mid)
                    assert len(body) == p.size
                    if mid in added:
                        assert hashlib.sha256(body).hexdigest() == added[mid]
                else:
                    assert all(mid not in ids for ids in present.values()), f"{mid}: removed, yet present"
            on_disk = {p.name for kind in KINDS for p in (data / "quarantine" / kind).iterdir()}
            assert on_disk == {f"{m}.{x}" for ids in present.values() for m in ids for x in ("eml", "json")}
            for mid in added:  # present unless a removal's event made it (reported or cut by the kill)
                assert mid in last, f"acknowledged add {mid} has no event"
                if isinstance(last[mid].payload, ev.MessageQuarantined):
                    assert any(mid in ids for ids in present.values()), f"acknowledged add {mid} lost"
            for mid in removed:
                assert all(mid not in ids for ids in present.values()), (
                    f"acknowledged removal of {mid} undone"
                )
            for new in resent.values():
                assert new in spool.ids() or new in {s.id for s in spool.sidecars()}
    assert added and removed, "the child acknowledged too little to test anything"
    result = verify(data / "events")  # raises ChainBroken on any damage
    assert result.count == len(list(read_records(data / "events")))
