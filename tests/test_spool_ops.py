"""The spool library: enqueue, the admin operations, claims and corrupt sidecars,
checked against what is on disk (bodies, sidecars, the event log)."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolfs.config import Config, load_config
from spoolfs.errors import CorruptSidecar, InvalidAddress, InvalidId, MessageBusy, MessageNotFound
from spoolfs.layout import Layout
from spoolfs.spool import Spool

RAW = b"From: a@example.org\r\nSubject: test\r\n\r\nbody with \x00 and \xff bytes\r\n.\r\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOOL_CONFIG", raising=False)
    monkeypatch.delenv("SPOOL_DATA_DIR", raising=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def config(data: Path) -> Config:
    return load_config(data_dir=str(data))


@pytest.fixture
def spool(config: Config) -> Iterator[Spool]:
    with Spool.open(config, actor="cli:tester") as sp:
        yield sp


# --- helpers ------------------------------------------------------------------------


def log_records(data: Path) -> list[dict[str, Any]]:
    out = []
    for segment in sorted((data / "events").glob("*.jsonl")):
        out.extend(json.loads(line) for line in segment.read_bytes().splitlines())
    return out


def sidecar_on_disk(data: Path, mid: str) -> dict[str, Any]:
    nn = Layout(data, 16).subspool_of(mid)
    return json.loads((data / "spool" / nn / f"{mid}.json").read_bytes())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def enqueue(spool: Spool, n: int = 1, sender: str = "sender@example.org") -> list[str]:
    return [spool.enqueue(RAW + str(i).encode(), sender, [f"rcpt{i}@example.net"]).id for i in range(n)]


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- enqueue ---------------------------------------------------------------------------


def test_enqueue_writes_body_sidecar_and_event(spool: Spool, data: Path) -> None:
    s = spool.enqueue(RAW, "Sender@Example.ORG", ["one@Example.NET", "two@example.net"], priority="high")
    nn = Layout(data, 16).subspool_of(s.id)
    eml = data / "spool" / nn / f"{s.id}.eml"
    side = data / "spool" / nn / f"{s.id}.json"
    assert eml.read_bytes() == RAW
    assert side.is_file()
    assert list((data / "spool" / "tmp").iterdir()) == []

    records = log_records(data)
    assert len(records) == 1
    rec = records[0]
    assert rec["seq"] == 1
    assert rec["prev"] == "0" * 64
    assert rec["actor"] == "cli:tester"
    assert rec["payload"]["type"] == "message_enqueued"
    assert rec["payload"]["id"] == s.id
    assert rec["payload"]["subspool"] == nn
    assert rec["payload"]["recipients"] == ["one@example.net", "two@example.net"]
    assert rec["payload"]["size"] == len(RAW)

    on_disk = json.loads(side.read_bytes())
    assert on_disk["id"] == s.id
    assert on_disk["subspool"] == nn
    assert on_disk["sender"] == "Sender@example.org"
    assert [r["address"] for r in on_disk["recipients"]] == ["one@example.net", "two@example.net"]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in on_disk["recipients"])
    assert on_disk["size"] == len(RAW)
    assert on_disk["priority"] == "high"
    assert on_disk["status"] == "waiting"
    assert on_disk["attempts"] == 0
    assert on_disk["forced"] is False
    assert on_disk["seq"] == rec["seq"]
    assert on_disk["node"] == rec["node"]
    assert parse_time(on_disk["received_at"]) == parse_time(rec["at"])
    # the returned sidecar is what is on disk
    assert spool.get(s.id) == s
    assert spool.message_bytes(s.id) == RAW


def test_sidecar_seq_matches_its_enqueue_event(spool: Spool, data: Path) -> None:
    ids = enqueue(spool, 3)
    by_id = {r["payload"]["id"]: r["seq"] for r in log_records(data)}
    assert sorted(by_id.values()) == [1, 2, 3]
    for mid in ids:
        assert sidecar_on_disk(data, mid)["seq"] == by_id[mid]


def test_enqueue_collapses_duplicate_recipients(spool: Spool, data: Path) -> None:
    s = spool.enqueue(RAW, "a@b.org", ["x@y.org", "x@Y.ORG", "z@y.org", "x@y.org"])
    assert [r["address"] for r in sidecar_on_disk(data, s.id)["recipients"]] == ["x@y.org", "z@y.org"]
    assert log_records(data)[-1]["payload"]["recipients"] == ["x@y.org", "z@y.org"]


@pytest.mark.parametrize("null", ["", "<>"])
def test_enqueue_null_sender(spool: Spool, data: Path, null: str) -> None:
    s = spool.enqueue(RAW, null, ["x@y.org"])
    assert sidecar_on_disk(data, s.id)["sender"] == ""
    assert log_records(data)[-1]["payload"]["sender"] == ""


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        ("a@b.org", []),
        ("a@b.org", ["ok@b.org", "bad@@b.org"]),
        ("a@b.org", ["@a,@b:u@c"]),
        ("not an address", ["ok@b.org"]),
        ("a@b.org", ["x@y.org\r\nDATA"]),
    ],
)
def test_bad_enqueue_writes_nothing(spool: Spool, data: Path, sender: str, recipients: list[str]) -> None:
    enqueue(spool, 1)
    before = snapshot(data)
    with pytest.raises(InvalidAddress):
        spool.enqueue(RAW, sender, recipients)
    assert snapshot(data) == before
    assert len(log_records(data)) == 1


def test_ids_are_in_time_order(spool: Spool) -> None:
    ids = enqueue(spool, 5)
    assert spool.ids() == sorted(ids)
    assert [s.id for s in spool.sidecars()] == sorted(ids)


def test_get_refuses_bad_and_unknown_ids(spool: Spool) -> None:
    enqueue(spool, 1)
    with pytest.raises(InvalidId):
        spool.get("../x")
    with pytest.raises(InvalidId):
        spool.message_bytes("a/b")
    with pytest.raises(MessageNotFound):
        spool.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    with pytest.raises(MessageNotFound):
        spool.message_bytes("01ARZ3NDEKTSV4RRFFQ69G5FAV")


# --- the admin operations ------------------------------------------------------------


def _one_change(
    spool: Spool, data: Path, mid: str, op: str, **kw: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one operation; return (the single new record, the sidecar on disk)."""
    before = len(log_records(data))
    before_seq = sidecar_on_disk(data, mid)["seq"]
    changed = getattr(spool, op)([mid], **kw)
    records = log_records(data)
    assert len(records) == before + 1, [r["payload"]["type"] for r in records[before:]]
    side = sidecar_on_disk(data, mid)
    assert side["seq"] == records[-1]["seq"] > before_seq
    assert records[-1]["payload"]["id"] == mid
    assert records[-1]["actor"] == "cli:tester"
    assert [c.id for c in changed] == [mid]
    return records[-1], side


def test_hold_and_release(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    rec, side = _one_change(spool, data, mid, "hold")
    assert rec["payload"]["type"] == "message_held"
    assert side["status"] == "held"
    assert spool.get(mid).status == "held"

    rec, side = _one_change(spool, data, mid, "release")
    assert rec["payload"]["type"] == "message_released"
    assert side["status"] == "waiting"


def test_hold_on_held_and_release_on_waiting_append_nothing(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    spool.hold([mid])
    before = snapshot(data)
    assert spool.hold([mid]) == []
    assert snapshot(data) == before
    spool.release([mid])
    before = snapshot(data)
    assert spool.release([mid]) == []
    assert snapshot(data) == before


def test_force(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    rec, side = _one_change(spool, data, mid, "force")
    assert rec["payload"]["type"] == "message_forced"
    assert side["forced"] is True
    assert parse_time(side["next_attempt_at"]) == parse_time(rec["at"])


def test_reset_retries(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    rec, side = _one_change(spool, data, mid, "reset_retries")
    assert rec["payload"]["type"] == "retries_reset"
    assert side["attempts"] == 0
    assert side["status"] == "waiting"
    assert parse_time(side["next_attempt_at"]) == parse_time(rec["at"])


def test_set_priority(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    rec, side = _one_change(spool, data, mid, "set_priority", priority="low")
    assert (rec["payload"]["type"], rec["payload"]["priority"]) == ("priority_set", "low")
    assert side["priority"] == "low"
    before = snapshot(data)
    assert spool.set_priority([mid], "low") == []  # already low: nothing to record
    assert snapshot(data) == before


def test_delete_removes_both_files_and_records_it(spool: Spool, data: Path) -> None:
    keep, gone = enqueue(spool, 2)
    eml, side = spool.layout.eml(gone), spool.layout.sidecar(gone)
    assert eml.exists() and side.exists()
    before = len(log_records(data))
    spool.delete([gone], reason="spam")
    records = log_records(data)
    assert len(records) == before + 1
    payload = records[-1]["payload"]
    assert (payload["type"], payload["id"], payload["reason"]) == ("message_deleted", gone, "spam")
    assert not eml.exists() and not side.exists()
    assert spool.ids() == [keep]
    with pytest.raises(MessageNotFound):
        spool.get(gone)
    assert spool.layout.eml(keep).exists()


def test_bulk_change_appends_one_event_per_message(spool: Spool, data: Path) -> None:
    ids = enqueue(spool, 4)
    spool.hold(ids[:2])
    before = len(log_records(data))
    changed = spool.hold(ids)
    records = log_records(data)[before:]
    assert sorted(r["payload"]["id"] for r in records) == sorted(ids[2:])
    assert {r["payload"]["type"] for r in records} == {"message_held"}
    assert sorted(c.id for c in changed) == sorted(ids[2:])
    assert all(sidecar_on_disk(data, m)["status"] == "held" for m in ids)


def test_duplicate_ids_in_a_bulk_change_count_once(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    before = len(log_records(data))
    spool.force([mid, mid, mid])
    assert len(log_records(data)) == before + 1


UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@pytest.mark.parametrize(
    ("op", "kw"),
    [
        ("hold", {}),
        ("release", {}),
        ("force", {}),
        ("reset_retries", {}),
        ("set_priority", {"priority": "high"}),
        ("delete", {}),
    ],
)
@pytest.mark.parametrize(
    ("bad", "error"),
    [(UNKNOWN, MessageNotFound), ("../x", InvalidId), ("a/b", InvalidId), ("", InvalidId)],
)
def test_bulk_with_one_bad_id_changes_nothing(
    spool: Spool, data: Path, op: str, kw: dict[str, Any], bad: str, error: type[Exception]
) -> None:
    ids = enqueue(spool, 3)
    spool.hold(ids[:1])  # so that release has something to do
    before = snapshot(data)
    with pytest.raises(error):
        getattr(spool, op)([ids[0], ids[1], bad, ids[2]], **kw)
    assert snapshot(data) == before


# --- claims ----------------------------------------------------------------------------


def test_claimed_message_is_busy_and_nothing_changes(spool: Spool, data: Path) -> None:
    free, busy = enqueue(spool, 2)
    assert not spool.is_delivering(busy)
    fd = os.open(spool.layout.eml(busy), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert spool.is_delivering(busy)
        assert not spool.is_delivering(free)
        before = snapshot(data)
        started = time.monotonic()
        with pytest.raises(MessageBusy, match=busy):
            spool.hold([free, busy])
        assert time.monotonic() - started >= 1.5  # it waited before giving up
        assert snapshot(data) == before
        assert spool.is_delivering(busy)
    finally:
        os.close(fd)
    assert not spool.is_delivering(busy)
    spool.hold([free, busy])
    assert sidecar_on_disk(data, busy)["status"] == "held"


CLAIMER = """
import sys, time
from pathlib import Path
from spoolfs.claim import claim
with claim(Path(sys.argv[1]), sys.argv[2], wait=5):
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_claim_held_by_another_process(spool: Spool, data: Path) -> None:
    (mid,) = enqueue(spool)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, str(spool.layout.eml(mid)), mid],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "claimed"
        assert spool.is_delivering(mid)
        before = snapshot(data)
        with pytest.raises(MessageBusy):
            spool.change([mid], lambda s: None, wait=0.2)
        assert snapshot(data) == before
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # a dead process releases its claim by dying
    assert not spool.is_delivering(mid)
    spool.hold([mid])
    assert sidecar_on_disk(data, mid)["status"] == "held"


# --- corrupt sidecars ----------------------------------------------------------------


def test_corrupt_sidecar_moves_the_pair_aside(spool: Spool, data: Path) -> None:
    good1, bad, good2 = enqueue(spool, 3)
    body = spool.layout.eml(bad).read_bytes()
    garbage = b'{"id": "not json at all\x00\xff'
    spool.layout.sidecar(bad).write_bytes(garbage)
    before = len(log_records(data))

    with pytest.raises(CorruptSidecar, match=bad):
        spool.get(bad)

    corrupt = data / "spool" / "corrupt"
    assert (corrupt / f"{bad}.eml").read_bytes() == body
    assert (corrupt / f"{bad}.json").read_bytes() == garbage
    assert not spool.layout.eml(bad).exists()
    assert not spool.layout.sidecar(bad).exists()
    records = log_records(data)
    assert len(records) == before + 1
    payload = records[-1]["payload"]
    assert payload["type"] == "moved_to_corrupt"
    assert payload["id"] == bad
    assert sorted(payload["files"]) == [f"spool/corrupt/{bad}.eml", f"spool/corrupt/{bad}.json"]

    assert [s.id for s in spool.sidecars()] == sorted([good1, good2])
    assert spool.ids() == sorted([good1, good2])
    with pytest.raises(MessageNotFound):
        spool.get(bad)


def test_listing_goes_on_past_a_corrupt_sidecar(spool: Spool, data: Path) -> None:
    ids = enqueue(spool, 3)
    bad = sorted(ids)[1]
    spool.layout.sidecar(bad).write_bytes(b"\x00\x00\x00")
    reported: list[tuple[str, str]] = []
    listed = [s.id for s in spool.sidecars(on_corrupt=lambda mid, why: reported.append((mid, why)))]
    assert listed == sorted(set(ids) - {bad})
    assert [mid for mid, _ in reported] == [bad]
    assert (data / "spool" / "corrupt" / f"{bad}.json").read_bytes() == b"\x00\x00\x00"
    assert log_records(data)[-1]["payload"]["type"] == "moved_to_corrupt"


def test_sidecar_naming_another_message_is_corrupt(spool: Spool, data: Path) -> None:
    a, b = enqueue(spool, 2)
    spool.layout.sidecar(b).write_bytes(spool.layout.sidecar(a).read_bytes())
    with pytest.raises(CorruptSidecar):
        spool.get(b)
    assert (data / "spool" / "corrupt" / f"{b}.json").exists()
    assert spool.get(a).id == a


def test_corrupt_sidecar_in_a_bulk_change_changes_nothing_else(spool: Spool, data: Path) -> None:
    good, bad = sorted(enqueue(spool, 2))
    spool.layout.sidecar(bad).write_bytes(b"[]")
    before = log_records(data)
    good_side = spool.layout.sidecar(good).read_bytes()
    with pytest.raises(CorruptSidecar):
        spool.hold([good, bad])
    after = log_records(data)
    assert [r["payload"]["type"] for r in after[len(before) :]] == ["moved_to_corrupt"]
    assert spool.layout.sidecar(good).read_bytes() == good_side
