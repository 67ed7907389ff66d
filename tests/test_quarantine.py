"""The quarantine store and `spool quarantine ...`: durable pairs, the
report's columns and JSON keys, read, delete, resend (spam only), removal
after the retention (injected clock), recovery of what a crash left, and
the error contract (one line, exit 1, nothing changed)."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from freezegun import freeze_time
from typer.testing import CliRunner, Result

from cli.main import app
from events import read_records
from events import schema as ev
from events.schema import Verdict
from spoolfs import quarantine as quarantine_module
from spoolfs.config import Config, ScanConfig, load_config
from spoolfs.ids import check_id, new_id
from spoolfs.quarantine import (
    NotInQuarantine,
    Quarantine,
    QuarantineEntry,
    ResendRefused,
    UnknownKind,
    decode_entry,
    encode_entry,
)
from spoolfs.serve.services import PurgeService
from spoolfs.spool import Spool, cli_actor
from spoolfs.state import decode_sidecar

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
RAW = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: cheap\r\n\r\nbinary \x00\xff ok\r\n"
SPAM = Verdict(score=1005.2, threshold=5.0, rules=["GTUBE", "NO_RELAYS"], checked=["clamd", "spamd"])
VIRUS = Verdict(virus="Spoolfs.Test.EICAR.UNOFFICIAL", score=0.5, threshold=5.0, checked=["clamd", "spamd"])
JSON_KEYS = ["id", "kind", "quarantined_at", "sender", "recipients", "size", "remove_at", "verdict"]
UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


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
    with Spool.open(config, actor="smtp") as s:
        yield s


@pytest.fixture
def q(spool: Spool, config: Config) -> Quarantine:
    return Quarantine.for_spool(spool, config)


def add(
    q: Quarantine, kind: str = "spam", sender: str = "alice@example.org", n_rcpt: int = 2
) -> QuarantineEntry:
    return q.add(
        RAW,
        sender,
        [f"r{i}@example.net" for i in range(n_rcpt)],
        kind,  # type: ignore[arg-type]
        SPAM if kind == "spam" else VIRUS,
        client_ip="192.0.2.7",
        helo="client.example",
        session_id="S1",
    )


def run(data: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--data-dir", str(data), *args])


def snapshot(data: Path) -> dict[str, bytes]:
    """Every file under the data directory except the protocol logs, with its content."""
    return {
        str(p.relative_to(data)): p.read_bytes()
        for p in sorted(data.rglob("*"))
        if p.is_file() and "log" not in p.relative_to(data).parts[:1]
    }


def events_of(data: Path, type_: str) -> list[ev.Record]:
    return [r for r in read_records(data / "events") if r.type == type_]


def one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spool: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


# --- the store -----------------------------------------------------------------------


def test_add_writes_the_pair_and_its_event(q: Quarantine, data: Path) -> None:
    with freeze_time(T0):
        entry = add(q, "virus")
    check_id(entry.id)
    virus = data / "quarantine" / "virus"
    assert sorted(p.name for p in virus.iterdir()) == [f"{entry.id}.eml", f"{entry.id}.json"]
    assert (virus / f"{entry.id}.eml").read_bytes() == RAW
    assert decode_entry((virus / f"{entry.id}.json").read_bytes()) == entry
    assert list((data / "quarantine" / "tmp").iterdir()) == []
    assert (entry.quarantined_at, entry.remove_at) == (T0, T0 + dt.timedelta(days=30))
    assert (entry.sender, entry.recipients, entry.size, entry.verdict) == (
        "alice@example.org",
        ["r0@example.net", "r1@example.net"],
        len(RAW),
        VIRUS,
    )
    (record,) = events_of(data, "message_quarantined")
    assert record.actor == "smtp" and record.seq == entry.seq
    assert record.payload == ev.MessageQuarantined(
        id=entry.id,
        kind="virus",
        verdict=VIRUS,
        sender="alice@example.org",
        recipients=["r0@example.net", "r1@example.net"],
        size=len(RAW),
        remove_at=T0 + dt.timedelta(days=30),
        client_ip="192.0.2.7",
        helo="client.example",
        session_id="S1",
    )
    assert events_of(data, "message_enqueued") == []  # it never entered the spool


def test_retention_comes_from_the_config(spool: Spool, config: Config) -> None:
    week = msgspec.structs.replace(config, scan=ScanConfig(retention_days=7))
    with freeze_time(T0):
        entry = add(Quarantine.for_spool(spool, week))
    assert entry.remove_at == T0 + dt.timedelta(days=7)


def test_refusals_before_anything_is_written(q: Quarantine, data: Path) -> None:
    add(q)
    before = snapshot(data)
    with pytest.raises(UnknownKind, match="unknown quarantine 'ham'"):
        q.add(RAW, "a@b.test", ["c@d.test"], "ham", SPAM)  # type: ignore[arg-type]
    with pytest.raises(UnknownKind):
        q.ids("../spool")
    for bad in ("../../etc/passwd", "spam/x", UNKNOWN.lower(), ""):
        with pytest.raises(Exception, match="not a message ID"):
            q.get("spam", bad)
    with pytest.raises(NotInQuarantine, match=f"no message {UNKNOWN} in the spam quarantine"):
        q.delete("spam", [UNKNOWN])
    assert snapshot(data) == before


# --- the report -----------------------------------------------------------------------


def test_list_columns(q: Quarantine, data: Path) -> None:
    with freeze_time(T0):
        first = add(q, sender="alice@example.org", n_rcpt=2)
    with freeze_time(T0 + dt.timedelta(hours=5)):
        second = add(q, sender="", n_rcpt=1)
    with freeze_time(T0 + dt.timedelta(days=2, hours=1)):
        result = run(data, "quarantine", "list", "spam")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "FILE",
        "DATE",
        "SENDER",
        "RCPT",
        "SIZE",
        "IN",
        "QUARANTINE",
        "REMOVAL",
        "SCORE",
    ]
    assert rows[0].split() == [
        f"{first.id}.eml",
        "2024-05-06",
        "07:08:09",
        "alice@example.org",
        "2",
        str(len(RAW)),
        "2d",
        "2024-06-05",
        "07:08:09",
        "1005.2/5",
    ]
    assert rows[1].split()[:7] == [
        f"{second.id}.eml",
        "2024-05-06",
        "12:08:09",
        "<>",
        "1",
        str(len(RAW)),
        "1d",
    ]
    assert run(data, "quarantine", "list", "virus").stdout.split() == [
        "FILE", "DATE", "SENDER", "RCPT", "SIZE", "IN", "QUARANTINE", "REMOVAL", "VIRUS"
    ]  # fmt: skip


def test_list_json_keys_and_sender_filter(q: Quarantine, data: Path) -> None:
    with freeze_time(T0):
        entry = add(q, "virus", sender="Mallory@Example.ORG")
        add(q, "virus", sender="bob@example.org")
        add(q, "spam", sender="Mallory@Example.ORG")
    result = run(data, "quarantine", "list", "virus", "--sender", "Mallory@example.org", "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    row = json.loads(line)
    assert list(row) == JSON_KEYS
    assert row == {
        "id": entry.id,
        "kind": "virus",
        "quarantined_at": "2024-05-06T07:08:09Z",
        "sender": "Mallory@example.org",
        "recipients": ["r0@example.net", "r1@example.net"],
        "size": len(RAW),
        "remove_at": "2024-06-05T07:08:09Z",
        "verdict": {
            "virus": "Spoolfs.Test.EICAR.UNOFFICIAL",
            "score": 0.5,
            "threshold": 5.0,
            "rules": [],
            "checked": ["clamd", "spamd"],
        },
    }


def test_message_recipients_and_show(q: Quarantine, data: Path) -> None:
    entry = add(q, n_rcpt=3)
    result = CliRunner().invoke(app, ["--data-dir", str(data), "quarantine", "message", "spam", entry.id])
    assert result.exit_code == 0 and result.stdout_bytes == RAW
    result = run(data, "quarantine", "recipients", "spam", entry.id)
    assert result.stdout.splitlines() == ["r0@example.net", "r1@example.net", "r2@example.net"]
    result = run(data, "quarantine", "show", "spam", entry.id)
    assert (
        "rules:       GTUBE, NO_RELAYS" in result.stdout
        and "spam score:  1005.2 (threshold 5)" in result.stdout
    )
    # the other quarantine does not have it
    one_line_error(
        run(data, "quarantine", "message", "virus", entry.id),
        f"no message {entry.id} in the virus quarantine",
    )


# --- delete ---------------------------------------------------------------------------


def test_delete_ids_and_all(q: Quarantine, data: Path) -> None:
    a, b, c = add(q, "virus"), add(q, "virus"), add(q, "virus")
    keep = add(q, "spam")
    result = run(data, "quarantine", "delete", "virus", a.id)
    assert result.exit_code == 0 and "deleted: 1 message from the virus quarantine" in result.stdout
    assert q.ids("virus") == [b.id, c.id]
    assert not (data / "quarantine" / "virus" / f"{a.id}.eml").exists()
    result = run(data, "quarantine", "delete", "virus", "--all")
    assert result.exit_code == 0 and "deleted: 2 messages" in result.stdout
    assert q.ids("virus") == [] and list((data / "quarantine" / "virus").iterdir()) == []
    assert q.ids("spam") == [keep.id]
    deleted = events_of(data, "quarantine_deleted")
    assert [(r.payload.id, r.payload.kind) for r in deleted] == [
        (a.id, "virus"),
        (b.id, "virus"),
        (c.id, "virus"),
    ]  # type: ignore[union-attr]
    assert {r.actor for r in deleted} == {cli_actor()}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["list", "ham"], ["unknown quarantine 'ham'", "spam and virus"]),
        (["delete", "ham", "--all"], ["unknown quarantine 'ham'"]),
        (["message", "spam", "../../etc/passwd"], ["not a message ID: '../../etc/passwd'"]),
        (["delete", "spam", "{ok}", "spam/../x"], ["not a message ID"]),
        (["delete", "spam", "{ok}", UNKNOWN], [f"no message {UNKNOWN} in the spam quarantine"]),
        (["delete", "spam", "{ok}", "--all"], ["give message IDs or --all"]),
        (["delete", "spam"], ["give message IDs or --all"]),
        (["resend", "{ok}", UNKNOWN], [f"no message {UNKNOWN} in the spam quarantine", "nothing was resent"]),
        (["resend", "{ok}", "{virus}"], ["virus quarantine", "never resent", "nothing was resent"]),
        (["resend", "virus", "{virus}"], ["virus mail is never resent", "nothing was resent"]),
        (["resend", "../{ok}"], ["not a message ID"]),
        (["recipients", "virus", "{ok}"], ["in the virus quarantine"]),
    ],
)
def test_refusals_are_one_line_and_change_nothing(
    q: Quarantine, data: Path, args: list[str], fragments: list[str]
) -> None:
    ok, virus = add(q, "spam"), add(q, "virus")
    args = [a.format(ok=ok.id, virus=virus.id) for a in args]
    before = snapshot(data)
    one_line_error(run(data, "quarantine", *args), *[f.format(ok=ok.id, virus=virus.id) for f in fragments])
    assert snapshot(data) == before


# --- resend -----------------------------------------------------------------------------


def test_resend_puts_spam_back_in_the_spool(q: Quarantine, spool: Spool, data: Path) -> None:
    entry, other = add(q, n_rcpt=2), add(q)
    result = run(data, "quarantine", "resend", "spam", entry.id, "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    new_id = json.loads(line)["new_id"]
    assert json.loads(line) == {"id": entry.id, "new_id": new_id}
    assert new_id != entry.id and spool.ids() == [new_id]
    assert spool.message_bytes(new_id) == RAW  # not rescanned, not rewritten
    sidecar = decode_sidecar(spool.layout.sidecar(new_id).read_bytes())
    assert (sidecar.sender, [r.address for r in sidecar.recipients], sidecar.source) == (
        entry.sender,
        entry.recipients,
        "resend",
    )
    assert q.ids("spam") == [other.id]
    assert not (data / "quarantine" / "spam" / f"{entry.id}.eml").exists()
    types = [(r.type, r.actor) for r in read_records(data / "events")][-2:]
    assert types == [("message_enqueued", cli_actor()), ("quarantine_resent", cli_actor())]
    (resent,) = events_of(data, "quarantine_resent")
    assert resent.payload == ev.QuarantineResent(id=entry.id, new_id=new_id, kind="spam")
    # without the kind word too
    result = run(data, "quarantine", "resend", other.id)
    assert result.exit_code == 0 and result.stdout.startswith(f"resent {other.id} as ")
    assert q.ids("spam") == [] and len(spool.ids()) == 2


def test_resend_refuses_virus_mail_in_the_library_too(q: Quarantine, spool: Spool, data: Path) -> None:
    spam, virus = add(q, "spam"), add(q, "virus")
    before = snapshot(data)
    with pytest.raises(ResendRefused, match="never resent"):
        q.resend(spool, [spam.id, virus.id])
    assert snapshot(data) == before and spool.ids() == []


# --- removal after the retention ------------------------------------------------------


def test_removal_after_30_days(q: Quarantine, spool: Spool, config: Config, data: Path) -> None:
    with freeze_time(T0):
        spam, virus = add(q, "spam"), add(q, "virus")
    with freeze_time(T0 + dt.timedelta(days=10)):
        young = add(q, "spam")
    with freeze_time(T0 + dt.timedelta(days=30, seconds=-1)):
        assert q.purge() == []
        assert run(data, "quarantine", "purge").stdout.strip() == "purged: 0 messages"
    assert events_of(data, "quarantine_purged") == []
    with freeze_time(T0 + dt.timedelta(days=30)):
        result = run(data, "quarantine", "purge", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [spam.id, virus.id]
    assert q.ids("spam") == [young.id] and q.ids("virus") == []
    assert list((data / "quarantine" / "virus").iterdir()) == []
    purged = events_of(data, "quarantine_purged")
    assert [r.payload for r in purged] == [
        ev.QuarantinePurged(id=spam.id, kind="spam", remove_at=T0 + dt.timedelta(days=30)),
        ev.QuarantinePurged(id=virus.id, kind="virus", remove_at=T0 + dt.timedelta(days=30)),
    ]
    assert all(r.at == T0 + dt.timedelta(days=30) for r in purged)
    # the purge service does the same on its rounds
    service = PurgeService(config, spool)
    with freeze_time(T0 + dt.timedelta(days=39, hours=23)):
        assert service.purge_quarantine() == 0
    with freeze_time(T0 + dt.timedelta(days=40)):
        assert service.purge_quarantine() == 1
    assert q.ids("spam") == []
    assert len(events_of(data, "quarantine_purged")) == 3


def test_never_kept_more_than_30_days_whatever_the_sidecar_says(q: Quarantine, data: Path) -> None:
    with freeze_time(T0):
        entry = add(q, "spam")
    path = data / "quarantine" / "spam" / f"{entry.id}.json"
    edited = msgspec.structs.replace(entry, remove_at=T0 + dt.timedelta(days=365))
    path.write_bytes(encode_entry(edited))
    with freeze_time(T0 + dt.timedelta(days=29)):
        assert q.purge() == []
    with freeze_time(T0 + dt.timedelta(days=30)):
        assert [e.id for e in q.purge()] == [entry.id]


def test_corrupt_sidecar_is_reported_skipped_by_purge_and_deletable(q: Quarantine, data: Path) -> None:
    with freeze_time(T0):
        good, bad = add(q), add(q)
    (data / "quarantine" / "spam" / f"{bad.id}.json").write_bytes(b"{not json")
    # the listing comes from the log, which has both; reading the bad one says why
    result = run(data, "quarantine", "list", "spam", "--json")
    assert result.exit_code == 0
    assert sorted(json.loads(line)["id"] for line in result.stdout.splitlines()) == sorted([good.id, bad.id])
    shown = run(data, "quarantine", "show", "spam", bad.id)
    assert shown.exit_code == 1 and "quarantine sidecar" in shown.stderr and bad.id in shown.stderr
    with freeze_time(T0 + dt.timedelta(days=31)):
        assert [e.id for e in q.purge()] == [good.id]
    assert q.ids("spam") == [bad.id]  # never removed by a machine
    assert run(data, "quarantine", "delete", "spam", bad.id).exit_code == 0
    assert list((data / "quarantine" / "spam").iterdir()) == []


# --- recovery -------------------------------------------------------------------------


def age(path: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_recover_removes_what_was_never_acknowledged(q: Quarantine, data: Path) -> None:
    mid = new_id()
    tmp = data / "quarantine" / "tmp" / f"{mid}.eml"
    tmp.write_bytes(RAW)
    assert q.recover() == []  # young: may be an add in progress
    age(tmp)
    with open(tmp, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert q.recover() == []  # claimed: an add in progress
    assert q.recover() == [(mid, "removed: never acknowledged")]
    assert not tmp.exists()


def test_recover_completes_what_the_log_has(q: Quarantine, data: Path) -> None:
    """A crash after the event: the body still in tmp/, or published without its sidecar."""
    entries = [add(q), add(q, "virus")]
    spam_dir, virus_dir, tmp = (data / "quarantine" / d for d in ("spam", "virus", "tmp"))
    os.rename(spam_dir / f"{entries[0].id}.eml", tmp / f"{entries[0].id}.eml")
    (spam_dir / f"{entries[0].id}.json").unlink()
    (virus_dir / f"{entries[1].id}.json").unlink()
    (tmp / f"{entries[1].id}.json").write_bytes(b'{"half')  # a sidecar write cut short
    for p in [*tmp.iterdir(), *virus_dir.iterdir()]:
        age(p)
    assert q.ids("spam") == [] and q.ids("virus") == []
    done = dict(q.recover())
    assert done == {entries[0].id: "completed in spam/", entries[1].id: "completed in virus/"}
    assert q.get("spam", entries[0].id) == entries[0]
    assert q.get("virus", entries[1].id) == entries[1]
    assert list(tmp.iterdir()) == []


def test_recover_after_a_removal_cut_short(q: Quarantine, data: Path) -> None:
    """Sidecar unlinked, then the crash: before the event nothing happened, after it the body goes."""
    kept, gone = add(q), add(q)
    spam_dir = data / "quarantine" / "spam"
    (spam_dir / f"{kept.id}.json").unlink()  # crash before the event
    (spam_dir / f"{gone.id}.json").unlink()
    q.log.append(ev.QuarantineDeleted(id=gone.id, kind="spam"), "cli:test")  # crash after it
    for p in spam_dir.iterdir():
        age(p)
    assert dict(q.recover()) == {kept.id: "completed in spam/", gone.id: "removed: quarantine_deleted"}
    assert q.ids("spam") == [kept.id] and q.get("spam", kept.id) == kept
    assert sorted(p.name for p in spam_dir.iterdir()) == [f"{kept.id}.eml", f"{kept.id}.json"]


def test_recover_leaves_files_the_log_never_heard_of(q: Quarantine, data: Path) -> None:
    stray = data / "quarantine" / "spam" / f"{new_id()}.eml"
    stray.write_bytes(RAW)
    age(stray)
    assert q.recover() == [] and stray.exists()


def test_recover_judges_a_stray_once_and_reads_the_log_only_when_there_is_something_to_judge(
    q: Quarantine, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge service calls recover() every few minutes; each judgement reads the whole log."""
    reads: list[object] = []
    real = quarantine_module.read_records

    def spy(*args: object, **kw: object) -> object:
        reads.append(kw.get("types"))
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(quarantine_module, "read_records", spy)
    young = data / "quarantine" / "tmp" / f"{new_id()}.eml"
    young.write_bytes(RAW)
    assert q.recover() == [] and reads == []  # young: nothing to judge, no read
    young.unlink()
    stray = data / "quarantine" / "spam" / f"{new_id()}.eml"
    stray.write_bytes(RAW)
    age(stray)
    assert q.recover() == [] and len(reads) == 1
    assert reads[0] and "message_quarantined" in reads[0]  # type: ignore[operator]
    assert q.recover() == [] and len(reads) == 1  # judged before, unchanged
    age(stray, 7200)  # changed since: judged again
    assert q.recover() == [] and len(reads) == 2 and stray.exists()
