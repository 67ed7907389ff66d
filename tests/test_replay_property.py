"""Property: whatever sequence of operations runs on a spool, replaying the
log from zero gives exactly the state the sidecars on disk hold."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import read_records
from events import schema as ev
from spoolfs.config import load_config
from spoolfs.errors import SpoolError
from spoolfs.spool import Spool
from spoolfs.state import decode_sidecar, replay

OPS = [
    "enqueue",
    "hold",
    "release",
    "force",
    "reset",
    "priority",
    "delete",
    "attempt",
    "defer",
    "finish",
    "corrupt",
]

operations = st.lists(
    st.tuples(
        st.sampled_from(OPS),
        st.integers(min_value=0, max_value=50),
        st.sampled_from(["high", "normal", "low"]),
        st.sampled_from(["delivered", "deferred", "failed"]),
    ),
    min_size=1,
    max_size=25,
)


def run(spool: Spool, ops: list[tuple[str, int, str, str]]) -> None:
    for name, pick, prio, result in ops:
        ids = spool.ids()
        if name == "enqueue" or not ids:
            rcpts = [f"u{pick % 3}@example.net", f"v{pick % 2}@example.org"]
            spool.enqueue(f"Subject: {pick}\r\n\r\nx\r\n".encode(), "s@example.com", rcpts, priority=prio)  # type: ignore[arg-type]
            continue
        mid = ids[pick % len(ids)]
        if name == "hold":
            spool.hold([mid])
        elif name == "release":
            spool.release([mid])
        elif name == "force":
            spool.force([mid])
        elif name == "reset":
            spool.reset_retries([mid])
        elif name == "priority":
            spool.set_priority([mid], prio)  # type: ignore[arg-type]
        elif name == "delete":
            spool.delete([mid])
        elif name == "attempt":
            spool.change(
                [mid],
                lambda s: ev.DeliveryAttempted(
                    id=s.id,
                    recipient=s.recipients[pick % len(s.recipients)].address,
                    result=result,  # type: ignore[arg-type]
                    code={"delivered": 250, "deferred": 451, "failed": 550}[result],
                    response=f"{result} by test",
                    host="mx.example.net",
                ),
            )
        elif name == "defer":
            later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=pick)
            spool.change([mid], lambda s: ev.MessageDeferred(id=s.id, next_attempt_at=later, reason="test"))
        elif name == "finish":
            spool.change([mid], lambda s: ev.MessageFinished(id=s.id, outcome="delivered"))
        elif name == "corrupt":
            spool.layout.sidecar(mid).write_bytes(b"{not json")
            try:
                spool.get(mid)
            except SpoolError:
                pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_replay_equals_sidecars(ops: list[tuple[str, int, str, str]]) -> None:
    data = Path(tempfile.mkdtemp(prefix="spool-prop-"))
    try:
        with Spool.open(load_config(data_dir=str(data)), actor="cli:test") as spool:
            run(spool, ops)
            replayed = replay(read_records(spool.layout.events)).states
            on_disk = {mid: decode_sidecar(spool.layout.sidecar(mid).read_bytes()) for mid in spool.ids()}
            assert on_disk == replayed
            # every body the sidecars point at is there
            for mid in on_disk:
                assert spool.layout.eml(mid).exists()
    finally:
        shutil.rmtree(data, ignore_errors=True)
