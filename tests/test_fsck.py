"""fsck finds each kind of damage a crash (or a person) can leave, and mends it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from events import read_records
from spoolfs.config import load_config
from spoolfs.fsck import fsck, replay_log
from spoolfs.spool import Spool
from spoolfs.state import decode_sidecar


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool.open(load_config(data_dir=str(tmp_path / "data")), actor="cli:test")
    yield s
    s.close()


def put(spool: Spool, n: int = 1) -> list[str]:
    return [
        spool.enqueue(f"Subject: {i}\r\n\r\nbody\r\n".encode(), "a@example.com", ["b@example.net"]).id
        for i in range(n)
    ]


def kinds(spool: Spool, **kw: object) -> list[tuple[str, str]]:
    return [(p.kind, p.id) for p in fsck(spool, tmp_age=0, **kw).problems]  # type: ignore[arg-type]


def assert_consistent(spool: Spool) -> None:
    assert fsck(spool, tmp_age=0).problems == []
    state = replay_log(spool).states
    on_disk = {m: decode_sidecar(spool.layout.sidecar(m).read_bytes()) for m in spool.ids()}
    assert on_disk == state


def repairs(spool: Spool) -> list[tuple[str, str]]:
    return [
        (r.payload.problem, r.payload.action)
        for r in read_records(spool.layout.events, types=["spool_repaired"])
    ]  # type: ignore[union-attr]


def test_clean_spool_has_no_problems(spool: Spool) -> None:
    put(spool, 3)
    spool.hold(spool.ids()[:1])
    assert kinds(spool) == []


def test_stale_sidecar_is_rewritten(spool: Spool) -> None:
    (mid,) = put(spool)
    old = spool.layout.sidecar(mid).read_bytes()
    spool.hold([mid])
    spool.layout.sidecar(mid).write_bytes(old)  # as if the crash came before the sidecar write
    assert kinds(spool) == [("stale-sidecar", mid)]
    assert decode_sidecar(spool.layout.sidecar(mid).read_bytes()).status == "waiting"  # not repaired yet
    fsck(spool, repair=True, tmp_age=0)
    assert decode_sidecar(spool.layout.sidecar(mid).read_bytes()).status == "held"
    assert repairs(spool) == [("stale-sidecar", "sidecar-rewritten")]
    assert_consistent(spool)


def test_missing_sidecar_and_body_in_tmp(spool: Spool) -> None:
    a, b = put(spool, 2)
    os.unlink(spool.layout.sidecar(a))
    os.rename(spool.layout.eml(b), spool.layout.tmp_eml(b))
    os.unlink(spool.layout.sidecar(b))
    assert sorted(kinds(spool)) == sorted([("missing-sidecar", a), ("body-in-tmp", b)])
    fsck(spool, repair=True, tmp_age=0)
    assert spool.layout.eml(b).exists() and not spool.layout.tmp_eml(b).exists()
    assert_consistent(spool)


def test_tmp_leftovers_are_removed_but_young_ones_left(spool: Spool) -> None:
    (spool.layout.tmp / "01ABCDEFGHJKMNPQRSTVWXYZ01.eml").write_bytes(b"half a message")
    assert fsck(spool, tmp_age=3600).problems == []  # might be an enqueue in progress
    assert [p.kind for p in fsck(spool, tmp_age=0).problems] == ["tmp-leftover"]
    fsck(spool, repair=True, tmp_age=0)
    assert os.listdir(spool.layout.tmp) == []
    assert_consistent(spool)


def test_deleted_message_with_files_left_is_removed(spool: Spool) -> None:
    (mid,) = put(spool)
    sidecar, body = spool.layout.sidecar(mid).read_bytes(), spool.layout.eml(mid).read_bytes()
    spool.delete([mid])
    spool.layout.eml(mid).write_bytes(body)
    spool.layout.sidecar(mid).write_bytes(sidecar)
    assert kinds(spool) == [("gone-but-present", mid)]
    fsck(spool, repair=True, tmp_age=0)
    assert not spool.layout.eml(mid).exists() and not spool.layout.sidecar(mid).exists()
    assert_consistent(spool)


def test_unknown_files_go_to_corrupt_never_deleted(spool: Spool) -> None:
    (mid,) = put(spool)
    foreign = "01ZZZZZZZZZZZZZZZZZZZZZZZZ"
    nn = spool.layout.sidecar(foreign).parent
    spool.layout.eml(foreign).write_bytes(b"foreign body")
    (nn / f"{foreign}.json").write_bytes(spool.layout.sidecar(mid).read_bytes())
    assert kinds(spool) == [("no-enqueue-event", foreign)]
    fsck(spool, repair=True, tmp_age=0)
    assert (spool.layout.corrupt / f"{foreign}.eml").read_bytes() == b"foreign body"
    assert (spool.layout.corrupt / f"{foreign}.json").exists()
    assert_consistent(spool)


def test_corrupt_sidecar_moves_pair_to_corrupt(spool: Spool) -> None:
    a, b = put(spool, 2)
    spool.layout.sidecar(a).write_bytes(b"\x00\x00garbage")
    assert kinds(spool) == [("corrupt-sidecar", a)]
    fsck(spool, repair=True, tmp_age=0)
    assert (spool.layout.corrupt / f"{a}.json").read_bytes() == b"\x00\x00garbage"
    assert spool.ids() == [b]
    assert_consistent(spool)


def test_vanished_body_is_forgotten_with_an_event(spool: Spool) -> None:
    a, b = put(spool, 2)
    os.unlink(spool.layout.eml(a))
    assert kinds(spool) == [("vanished", a)]
    fsck(spool, repair=True, tmp_age=0)
    assert not spool.layout.sidecar(a).exists()
    assert ("vanished", "forgotten") in repairs(spool)
    assert a not in replay_log(spool).states
    assert_consistent(spool)


def test_fsck_without_repair_changes_nothing(spool: Spool) -> None:
    a, b = put(spool, 2)
    os.unlink(spool.layout.sidecar(a))
    before = sorted(p.name for p in spool.layout.data.rglob("*"))
    log_before = b"".join(p.read_bytes() for p in sorted(spool.layout.events.glob("*.jsonl")))
    assert kinds(spool) == [("missing-sidecar", a)]
    assert sorted(p.name for p in spool.layout.data.rglob("*")) == before
    assert b"".join(p.read_bytes() for p in sorted(spool.layout.events.glob("*.jsonl"))) == log_before


def test_repairs_read_only_what_the_log_gained(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each repair catches up with the log; re-reading the segment from its start each time made
    a recovery with 13,000 problems take more than a quarter of an hour."""
    import events.reader

    ids = put(spool, 6)
    for mid in ids:
        os.unlink(spool.layout.eml(mid))
    starts: list[int] = []
    real = events.reader.read_lines

    def spy(path: Path, start: int = 0, chunk: int = 1 << 22) -> object:
        starts.append(start)
        return real(path, start, chunk)

    monkeypatch.setattr(events.reader, "read_lines", spy)
    report = fsck(spool, repair=True, tmp_age=0)
    assert [p.kind for p in report.problems] == ["vanished"] * 6
    # the first replay and the first catch-up read from the top; every later one from where it stopped
    assert starts.count(0) <= 2, starts
    monkeypatch.undo()
    assert_consistent(spool)
