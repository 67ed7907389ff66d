"""The two folds agree with each other and with spoolfs.state: record by record
(small catch-ups, projections.small), checked against a replay of the log after
every catch-up, and set-based (a rebuild, projections.reduce), on any order of
message events, including orders the spool itself never writes."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import EventLog, read_records
from events import schema as ev
from projections import Projections
from projections import core as projections_core
from spoolfs.state import Sidecar, replay

IDS = ["M0", "M1"]
ADDRESSES = ["a@x.example", "b@y.example", "a@x.example"]  # an address twice
LATER = dt.datetime(2030, 6, 1, 12, tzinfo=dt.UTC)


def event(kind: str, mid: str, pick: int) -> ev.Event:
    match kind:
        case "enqueued":
            return ev.MessageEnqueued(
                id=mid,
                sender="" if pick % 4 == 0 else f"s{pick}@z.example",
                recipients=ADDRESSES[: 1 + pick % 3],
                size=pick,
                subspool="00",
                priority=("high", "normal", "low")[pick % 3],  # type: ignore[arg-type]
                source="" if pick % 5 == 0 else "smtp",
            )
        case "priority":
            return ev.PrioritySet(id=mid, priority=("high", "normal", "low")[pick % 3])  # type: ignore[arg-type]
        case "held":
            return ev.MessageHeld(id=mid)
        case "released":
            return ev.MessageReleased(id=mid)
        case "forced":
            return ev.MessageForced(id=mid)
        case "reset":
            return ev.RetriesReset(id=mid)
        case "attempted":
            return ev.DeliveryAttempted(
                id=mid,
                recipient=(*ADDRESSES, "nobody@w.example")[pick % 4],
                result=("delivered", "deferred", "failed")[pick % 3],  # type: ignore[arg-type]
                code=250 + pick,
                response=f"r{pick}",
                host=f"h{pick}",
            )
        case "deferred":
            return ev.MessageDeferred(id=mid, next_attempt_at=LATER + dt.timedelta(seconds=pick))
        case "warned":
            return ev.DelayWarned(id=mid, dsn_id=f"D{pick}")
        case "unscanned":
            return ev.ScannerUnavailable(scanners=["spamd"], reason="down", action="accept", id=mid)
        case "deleted":
            return ev.MessageDeleted(id=mid)
        case "corrupt":
            return ev.MovedToCorrupt(id=mid, reason="bad")
        case "finished":
            return ev.MessageFinished(id=mid, outcome="delivered")
        case "repaired":
            return ev.SpoolRepaired(id=mid, problem="p", action="forgotten" if pick % 2 else "rewritten")
        case _:
            return ev.UserCreated(address=f"u{pick}@x.example")


KINDS = [
    "enqueued",
    "priority",
    "held",
    "released",
    "forced",
    "reset",
    "attempted",
    "deferred",
    "warned",
    "unscanned",
    "deleted",
    "corrupt",
    "finished",
    "repaired",
    "other",
]
# every message is enqueued first; what removes or re-enqueues one is rarer, so that
# messages live long enough for their states to go through many changes
RARE = {"enqueued", "deleted", "corrupt", "finished", "repaired"}
WEIGHTED = [k for k in KINDS for _ in range(1 if k in RARE else 5)]
histories = st.lists(
    st.tuples(st.sampled_from(WEIGHTED), st.sampled_from(IDS), st.integers(0, 11), st.booleans()),
    min_size=1,
    max_size=40,
)


def dump(p: Projections) -> dict[str, list[tuple[Any, ...]]]:
    return {t: p.query(f"SELECT * FROM {t} ORDER BY ALL")[1] for t in ("message_state", "attempt_log")}


def assert_is_the_replay(p: Projections, events: Path) -> None:
    """message_state holds what spoolfs.state.replay of the log says, field by field."""
    fields = [f for f in Sidecar.__struct_fields__]
    cols, rows = p.query(f"SELECT {', '.join(fields)} FROM message_state ORDER BY id")
    got = [dict(zip(cols, row, strict=True)) for row in rows]
    states = replay(read_records(events)).states
    want = [msgspec.to_builtins(states[mid], builtin_types=(dt.datetime,)) for mid in sorted(states)]
    assert got == want


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories)
def test_record_by_record_and_set_based_folds_agree(history: list[tuple[str, str, int, bool]]) -> None:
    data = Path(tempfile.mkdtemp(prefix="spool-fold-"))
    try:
        with EventLog(data / "events", node="n1") as log, Projections.open(data) as p:
            for mid in IDS:
                log.append(event("enqueued", mid, len(mid)), "t")
            for kind, mid, pick, catch_up_after in history:
                log.append(event(kind, mid, pick), "t")
                if catch_up_after:
                    p.catch_up()
                    assert_is_the_replay(p, data / "events")
            p.catch_up()
            assert_is_the_replay(p, data / "events")
            stepwise = dump(p)
            p.rebuild()
            assert dump(p) == stepwise
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_small_catch_ups_fold_record_by_record(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[str] = []
    real_small, real_set = projections_core.small_fold.fold, projections_core.fold
    monkeypatch.setattr(
        projections_core.small_fold, "fold", lambda *a: calls.append("small") or real_small(*a)
    )
    monkeypatch.setattr(projections_core, "fold", lambda *a: calls.append("set") or real_set(*a))
    with EventLog(tmp_path / "events", node="n1") as log, Projections.open(tmp_path) as p:
        log.append(event("enqueued", "M0", 1), "t")
        p.catch_up()
        p.rebuild()
    assert calls == ["small", "set"]
