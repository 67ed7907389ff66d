"""The replay checkpoint: the recovery at start replays only the log after it, with the same result."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import events.reader
from events import line_hash, read_records
from spoolfs import checkpoint, durable
from spoolfs.config import Config, load_config
from spoolfs.fsck import check, fsck, replay_log
from spoolfs.serve.worker import recover
from spoolfs.spool import Spool


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(data_dir=str(tmp_path / "data"))


@pytest.fixture
def spool(config: Config) -> Iterator[Spool]:
    s = Spool.open(config, actor="cli:test")
    yield s
    s.close()


def put(spool: Spool, n: int = 1) -> list[str]:
    return [
        spool.enqueue(f"Subject: {i}\r\n\r\nbody\r\n".encode(), "a@example.com", ["b@example.net"]).id
        for i in range(n)
    ]


def head(spool: Spool) -> int:
    return events.reader.head_seq(spool.layout.events)


def first_seq_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the from_seq of every read of the log through read_records."""
    seen: list[int] = []
    real = events.reader.read_records

    def spy(directory: Path, **kw: object) -> Iterator[object]:
        seen.append(int(kw.get("from_seq", 1)))  # type: ignore[call-overload]
        return real(directory, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("spoolfs.fsck.read_records", spy)
    monkeypatch.setattr("spoolfs.checkpoint.read_records", spy)
    return seen


def test_line_hash_names_what_the_next_record_chains_on(spool: Spool) -> None:
    put(spool, 3)
    records = list(read_records(spool.layout.events))
    assert line_hash(spool.layout.events, 1) == records[1].prev
    assert line_hash(spool.layout.events, 2) == records[2].prev
    (segment,) = sorted(spool.layout.events.glob("*.jsonl"))
    last = segment.read_bytes().splitlines()[-1]
    assert line_hash(spool.layout.events, 3) == hashlib.sha256(last).hexdigest()
    assert line_hash(spool.layout.events, 4) is None
    assert line_hash(spool.layout.events, 0) is None


def test_recovery_leaves_a_checkpoint_and_the_next_replays_only_after_it(
    config: Config, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = put(spool, 3)
    spool.hold([a])
    spool.delete([b])
    recover(config)
    cp = msgspec.json.decode(checkpoint.path_of(spool.layout).read_bytes())
    assert cp["seq"] == head(spool)
    assert sorted(cp["states"]) == sorted([a, c])
    assert cp["gone"] == []  # b's files went with its deletion
    at = head(spool)

    (d,) = put(spool)
    spool.force([c])
    seen = first_seq_read(monkeypatch)
    recover(config)
    assert seen and seen[0] == at + 1, f"the recovery read the log from seq {seen[:1]}, not {at + 1}"
    monkeypatch.undo()
    start, why = checkpoint.load(spool.layout)
    assert start is not None and start.last_seq == head(spool), why
    assert start.states == replay_log(spool).states
    assert sorted(start.states) == sorted([a, c, d])


def test_damage_after_the_checkpoint_is_found_and_mended_as_without_it(config: Config, spool: Spool) -> None:
    a, b = put(spool, 2)
    recover(config)
    spool.hold([a])
    os.unlink(spool.layout.sidecar(a))  # a crash before the sidecar write
    spool.delete([b])
    recover(config)
    assert fsck(spool, tmp_age=0).problems == []
    assert spool.get(a).status == "held"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "hold", "release", "force", "delete", "low", "checkpoint"]),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_replay_from_any_checkpoint_equals_the_full_replay(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    data = tmp_path_factory.mktemp("cp") / "data"
    with Spool.open(load_config(data_dir=str(data)), actor="cli:test") as spool:
        for op, k in ops:
            ids = spool.ids()
            target = [ids[k % len(ids)]] if ids else []
            if op == "put":
                put(spool)
            elif op == "checkpoint":
                checkpoint.save(spool.layout, replay_log(spool))
            elif target:
                {
                    "hold": spool.hold,
                    "release": spool.release,
                    "force": spool.force,
                    "delete": spool.delete,
                    "low": lambda t: spool.set_priority(t, "low"),
                }[op](target)
        start, why = checkpoint.load(spool.layout)
        full = replay_log(spool)
        if start is None:
            assert why == "no checkpoint" or head(spool) == 0
            return
        resumed = replay_log(spool, start)
        assert resumed.last_seq == full.last_seq
        assert resumed.states == full.states
        # what fsck makes of the files is the same from either
        assert check(spool, resumed)[0] == check(spool, replay_log(spool))[0]


def test_a_checkpoint_that_does_not_decode_goes_to_corrupt_and_the_whole_log_is_replayed(
    config: Config, spool: Spool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (a,) = put(spool)
    checkpoint.path_of(spool.layout).write_bytes(b'{"seq": 1, "hash": "trunc')
    seen = first_seq_read(monkeypatch)
    recover(config)
    assert seen[0] == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "checkpoint does not decode" in out and "corrupt" in out
    kept = [p for p in spool.layout.corrupt.iterdir() if p.name.startswith(checkpoint.NAME)]
    assert len(kept) == 1 and kept[0].read_bytes() == b'{"seq": 1, "hash": "trunc'
    start, _ = checkpoint.load(spool.layout)  # the recovery wrote a good one
    assert start is not None and a in start.states


def test_a_checkpoint_of_another_log_is_ignored(config: Config, spool: Spool, tmp_path: Path) -> None:
    (a,) = put(spool)
    with Spool.open(load_config(data_dir=str(tmp_path / "other")), actor="cli:test") as other:
        (x,) = put(other)
        checkpoint.save(other.layout, replay_log(other))
        foreign = checkpoint.path_of(other.layout).read_bytes()
    checkpoint.path_of(spool.layout).write_bytes(foreign)
    start, why = checkpoint.load(spool.layout)
    assert start is None and "does not match the log" in why
    recover(config)  # replays from 1: a is known, x is not
    start, _ = checkpoint.load(spool.layout)
    assert start is not None and set(start.states) == {a}
    assert fsck(spool, tmp_age=0).problems == []


def test_a_checkpoint_beyond_the_head_is_ignored(spool: Spool) -> None:
    put(spool, 2)
    checkpoint.save(spool.layout, replay_log(spool))
    cp = msgspec.json.decode(checkpoint.path_of(spool.layout).read_bytes())
    cp["seq"] += 5
    checkpoint.path_of(spool.layout).write_bytes(msgspec.json.encode(cp))
    start, why = checkpoint.load(spool.layout)
    assert start is None and "does not match" in why


def test_the_spool_directories_are_synced_before_the_checkpoint_is_written(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlinks of finished messages are not dir-synced; the checkpoint must not outlive them."""
    put(spool, 2)
    journal: list[str] = []
    real_sync, real_write = durable.fsync_dir, durable.write_durably

    def fsync_dir(path: Path) -> None:
        journal.append(f"sync {path.name}")
        real_sync(path)

    def write_durably(tmp: Path, final: Path, data: bytes) -> None:
        journal.append(f"write {final.name}")
        real_write(tmp, final, data)

    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    monkeypatch.setattr(durable, "write_durably", write_durably)
    assert checkpoint.save(spool.layout, replay_log(spool))
    written = journal.index(f"write {checkpoint.NAME}")
    synced = {entry.removeprefix("sync ") for entry in journal[:written]}
    assert set(spool.layout.subspool_names()) | {"tmp", "corrupt"} <= synced


def test_files_of_a_message_gone_before_the_checkpoint_are_kept_not_deleted(
    config: Config, spool: Spool
) -> None:
    """If a power cut did bring such files back, they would go to corrupt/, never be deleted."""
    (a,) = put(spool)
    body, sidecar = spool.layout.eml(a).read_bytes(), spool.layout.sidecar(a).read_bytes()
    spool.delete([a])
    recover(config)
    spool.layout.eml(a).write_bytes(body)
    spool.layout.sidecar(a).write_bytes(sidecar)
    recover(config)
    assert (spool.layout.corrupt / f"{a}.eml").read_bytes() == body
    assert not spool.layout.eml(a).exists()


def test_gone_keeps_the_messages_whose_files_are_still_there(spool: Spool) -> None:
    a, b = put(spool, 2)
    body = spool.layout.eml(a).read_bytes()
    spool.delete([a, b])
    spool.layout.eml(a).write_bytes(body)  # as if the unlink had not happened yet
    checkpoint.save(spool.layout, replay_log(spool))
    start, _ = checkpoint.load(spool.layout)
    assert start is not None and start.gone == {a}
    assert [(p.kind, p.id) for p in check(spool, start, tmp_age=0)[0].problems] == [("gone-but-present", a)]


def test_a_save_killed_half_way_leaves_the_old_checkpoint_usable(config: Config, spool: Spool) -> None:
    put(spool)
    recover(config)
    tmp = checkpoint.path_of(spool.layout).with_name(checkpoint.NAME + ".tmp")
    tmp.write_bytes(b'{"seq": 99')  # what a kill during the write leaves
    start, why = checkpoint.load(spool.layout)
    assert start is not None, why
    put(spool)
    recover(config)
    assert not tmp.exists()
    start, why = checkpoint.load(spool.layout)
    assert start is not None and len(start.states) == 2


def test_advance_moves_the_checkpoint_to_the_head_reading_only_after_the_old_one(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = put(spool, 2)
    seq, why = checkpoint.advance(spool.layout)
    assert (seq, why) == (head(spool), "no checkpoint")
    spool.hold([a])
    spool.delete([b])
    seen = first_seq_read(monkeypatch)
    new_seq, why = checkpoint.advance(spool.layout)
    assert seen == [seq + 1] and why == f"checkpoint at seq {seq}"
    assert new_seq == head(spool)
    monkeypatch.undo()
    start, _ = checkpoint.load(spool.layout)
    assert start is not None and start.states == replay_log(spool).states
    assert set(start.states) == {a} and start.states[a].status == "held"


def test_the_running_server_moves_the_checkpoint_up(tmp_path: Path) -> None:
    from peers import free_port
    from serve_fixture import cli, serve

    data = tmp_path / "data"
    layout = Spool.open(load_config(data_dir=str(data)), actor="cli:test").layout
    raw = tmp_path / "m.eml"
    raw.write_bytes(b"Subject: x\r\n\r\nbody\r\n")

    def checkpointed() -> set[str]:
        start, _ = checkpoint.load(layout)
        return set(start.states) if start is not None else set()

    def run(*args: str) -> str:
        done = cli(data, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with serve(data, free_port(), "--mynetworks", "127.0.0.0/8", config="[events]\ncheckpoint_every = 5\n"):
        run("services", "stop", "delivery")
        ids = {
            run("enqueue", str(raw), "--from", "a@example.com", "--to", "b@remote.test").split()[-1]
            for _ in range(6)
        }
        # A checkpoint comes every 5 events, up to the head of that moment; more
        # events (hold, release) until one has come after the last enqueue.
        for _ in range(40):
            if ids <= checkpointed():
                break
            run("hold", sorted(ids)[0])
            run("release", sorted(ids)[0])
            time.sleep(0.2)
        assert ids <= checkpointed(), "no checkpoint after the enqueues"
    start, _ = checkpoint.load(layout)
    assert start is not None
    assert start.states == replay_log_at(data, start.last_seq)


def replay_log_at(data: Path, seq: int) -> dict[str, object]:
    from spoolfs.state import replay

    return dict(replay(read_records(data / "events", to_seq=seq)).states)


def test_no_checkpoint_is_made_while_the_spool_is_too_large(
    config: Config, spool: Spool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Making one takes memory in proportion to the spool; during a backlog it waits."""
    from spoolfs.serve import worker

    put(spool, 3)
    monkeypatch.setattr(worker, "CHECKPOINT_MAX_SPOOL", 2)
    worker.advance_checkpoint(config)
    assert not checkpoint.path_of(spool.layout).exists()
    assert "skipped, 3 messages queued" in capsys.readouterr().out
    monkeypatch.setattr(worker, "CHECKPOINT_MAX_SPOOL", 3)
    worker.advance_checkpoint(config)
    start, _ = checkpoint.load(spool.layout)
    assert start is not None and len(start.states) == 3
