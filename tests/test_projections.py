"""Projections: after any workload, the DuckDB reports say what the sidecars on
disk say; catching up in steps equals a rebuild; the file is derived data."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.spool_cmds import list_row
from events import EventLog
from events import schema as ev
from projections import LIST_COLUMNS, ProjectionError, Projections, QueryRefused
from projections import schema as pschema
from spoolfs.config import load_config
from spoolfs.errors import SpoolError
from spoolfs.ids import new_id
from spoolfs.spool import Spool
from spoolfs.state import RecipientState, Sidecar, decode_sidecar

NOW = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOOL_CONFIG", raising=False)
    monkeypatch.delenv("SPOOL_DATA_DIR", raising=False)


def open_spool(data: Path, node: str = "n1") -> Spool:
    config = msgspec.structs.replace(load_config(data_dir=str(data)), node=node)
    return Spool.open(config, actor="cli:test")


# --- workloads -------------------------------------------------------------------------

OPS = [
    "enqueue",
    "hold",
    "release",
    "force",
    "reset",
    "priority",
    "delete",
    "attempt",
    "stray_attempt",
    "defer",
    "finish",
    "warn",
    "forget",
    "repair_other",
    "stray",
    "corrupt",
]
if hasattr(ev, "ScannerUnavailable"):  # scanning may not be in this tree yet
    OPS.append("unscanned")

operations = st.lists(
    st.tuples(
        st.sampled_from(OPS),
        st.integers(min_value=0, max_value=50),
        st.sampled_from(["high", "normal", "low"]),
        st.sampled_from(["delivered", "deferred", "failed"]),
    ),
    min_size=1,
    max_size=30,
)


def run(spool: Spool, ops: list[tuple[str, int, str, str]]) -> None:
    for name, pick, prio, result in ops:
        ids = spool.ids()
        if name == "enqueue" or not ids:
            rcpts = [f"u{pick % 3}@example.net", f"v{pick % 2}@Example.ORG"][: 1 + pick % 2]
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
        elif name in ("attempt", "stray_attempt"):
            spool.change(
                [mid],
                lambda s: ev.DeliveryAttempted(
                    id=s.id,
                    recipient=(
                        s.recipients[pick % len(s.recipients)].address
                        if name == "attempt"
                        else "nobody@example.invalid"
                    ),
                    result=result,  # type: ignore[arg-type]
                    code={"delivered": 250, "deferred": 451, "failed": 550}[result],
                    response=f"{result} by test {pick}",
                    host=f"mx{pick % 2}.example.net",
                ),
            )
        elif name == "defer":
            later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=pick)
            spool.change([mid], lambda s: ev.MessageDeferred(id=s.id, next_attempt_at=later, reason="test"))
        elif name == "finish":
            spool.change([mid], lambda s: ev.MessageFinished(id=s.id, outcome="delivered"))
        elif name == "warn":
            spool.change([mid], lambda s: ev.DelayWarned(id=s.id, dsn_id=new_id()))
        elif name == "forget":
            spool.change([mid], lambda s: ev.SpoolRepaired(id=s.id, problem="test", action="forgotten"))
        elif name == "repair_other":
            spool.log.append(ev.SpoolRepaired(id=mid, problem="test", action="restored"), "cli:test")
        elif name == "unscanned":
            event = ev.ScannerUnavailable(scanners=["clamd"], reason="test", action="accept", id=mid)  # type: ignore[attr-defined]
            spool.change([mid], lambda s: event)
        elif name == "stray":
            spool.log.append(ev.MessageHeld(id=new_id()), "cli:test")
        elif name == "corrupt":
            spool.layout.sidecar(mid).write_bytes(b"{not json")
            try:
                spool.get(mid)
            except SpoolError:
                pass


# --- what the disk says, what the projections say ---------------------------------------


def sidecars(spool: Spool) -> list[Sidecar]:
    return [decode_sidecar(spool.layout.sidecar(mid).read_bytes()) for mid in spool.ids()]


def sidecar_view(s: Sidecar) -> dict[str, Any]:
    """Every field of a sidecar, in the shape the projections give it."""
    d = msgspec.to_builtins(s, builtin_types=(dt.datetime,))
    d["recipients"] = [
        msgspec.to_builtins(r, builtin_types=(dt.datetime,)) | {"position": i}
        for i, r in enumerate(s.recipients, start=1)
    ]
    return d


def projected(p: Projections) -> list[dict[str, Any]]:
    """The spool and recipients views, with the columns named like the sidecar's fields.

    Every field of the sidecar must have its column: a new field in
    `spoolfs.state` that the projections do not know fails here.
    """
    fields = [f for f in Sidecar.__struct_fields__ if f != "recipients"]
    cols, rows = p.query(f"SELECT {', '.join(fields)} FROM spool ORDER BY id")
    rfields = ["id", *RecipientState.__struct_fields__, "position"]
    rcols, rrows = p.query(f"SELECT {', '.join(rfields)} FROM recipients ORDER BY id, position")
    out = {row[0]: dict(zip(cols, row, strict=True)) | {"recipients": []} for row in rows}
    for row in rrows:
        out[row[0]]["recipients"].append(dict(zip(rcols[1:], row[1:], strict=True)))
    return list(out.values())


def dump(p: Projections) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("events_raw", "message_state", "attempt_log", "logs")
    return {t: p.query(f"SELECT * FROM {t} ORDER BY ALL")[1] for t in tables}


def reports(p: Projections) -> dict[str, Any]:
    out: dict[str, Any] = {v: p.query(f"SELECT * FROM {v} ORDER BY ALL", now=NOW)[1] for v in pschema.VIEWS}
    out["list"] = p.list_spool(now=NOW)
    out["summary"] = (p.summary("domain", now=NOW), p.summary("sender", now=NOW))
    return out


def assert_matches_disk(p: Projections, spool: Spool) -> None:
    on_disk = sidecars(spool)
    assert p.list_spool() == [list_row(s, delivering=False) for s in on_disk]
    assert projected(p) == [sidecar_view(s) for s in on_disk]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, operations)
def test_projection_equals_sidecars_and_rebuild(
    first: list[tuple[str, int, str, str]], then: list[tuple[str, int, str, str]]
) -> None:
    data = Path(tempfile.mkdtemp(prefix="spool-proj-"))
    try:
        with open_spool(data) as spool:
            run(spool, first)
            with Projections.open(data) as p:
                p.catch_up()
                assert_matches_disk(p, spool)
            run(spool, then)
            with Projections.open(data) as p:
                result = p.catch_up()
                assert result.rebuilt == ""
                assert_matches_disk(p, spool)
                stepwise = dump(p)
            with Projections.open(data) as p:
                p.rebuild()
                assert_matches_disk(p, spool)
                assert dump(p) == stepwise
    finally:
        shutil.rmtree(data, ignore_errors=True)


# --- the file is derived data --------------------------------------------------------------


@pytest.fixture
def busy_spool(tmp_path: Path) -> Iterator[tuple[Path, Spool]]:
    data = tmp_path / "data"
    with open_spool(data) as spool:
        ops = [("enqueue", i, "normal", "delivered") for i in range(6)]
        ops += [("attempt", 1, "low", "deferred"), ("defer", 2, "low", "x"), ("hold", 3, "low", "x")]
        ops += [("attempt", 4, "low", "delivered"), ("finish", 5, "low", "x"), ("priority", 0, "high", "x")]
        run(spool, ops)
        yield data, spool


def test_deleting_the_file_changes_no_report(busy_spool: tuple[Path, Spool]) -> None:
    data, _ = busy_spool
    with Projections.open(data) as p:
        p.catch_up()
        before = reports(p)
    for path in data.glob("projections.duckdb*"):
        path.unlink()
    with Projections.open(data) as p:
        assert p.catch_up().rebuilt == "there was no file"
        assert reports(p) == before


def test_a_garbage_file_is_rebuilt(busy_spool: tuple[Path, Spool]) -> None:
    data, spool = busy_spool
    (data / "projections.duckdb").write_bytes(b"not a database" * 100)
    with Projections.open(data) as p:
        assert p.catch_up().rebuilt == "the file was unreadable"
        assert_matches_disk(p, spool)


def test_a_schema_change_rebuilds(busy_spool: tuple[Path, Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    data, spool = busy_spool
    with Projections.open(data) as p:
        p.catch_up()
    monkeypatch.setattr(pschema, "SCHEMA_VERSION", "test-next")
    with Projections.open(data) as p:
        result = p.catch_up()
        assert result.rebuilt.startswith("schema 2 is not test-next")
        assert result.events > 0
        assert_matches_disk(p, spool)


def test_tables_of_another_layout_are_rebuilt(busy_spool: tuple[Path, Spool]) -> None:
    import duckdb

    data, spool = busy_spool
    with Projections.open(data) as p:
        p.catch_up()
    con = duckdb.connect(str(data / "projections.duckdb"))
    con.execute("DROP VIEW sender_shape; DROP VIEW spool_shape; DROP VIEW recipients")
    con.execute("ALTER TABLE message_state RENAME COLUMN recipients TO r")
    con.execute("UPDATE meta SET value = 'older' WHERE key = 'views'")
    con.close()
    with Projections.open(data) as p:
        assert p.catch_up().rebuilt.startswith("the views do not fit its tables")
        assert_matches_disk(p, spool)


def test_catch_up_reads_only_what_is_new(busy_spool: tuple[Path, Spool]) -> None:
    data, spool = busy_spool
    with Projections.open(data) as p:
        first = p.catch_up()
        assert first.events == p.status().watermarks[0].seq
        assert p.catch_up().events == 0
        mid = spool.enqueue(b"Subject: new\r\n\r\nx\r\n", "late@example.com", ["z@example.net"]).id
        spool.hold([mid])
        again = p.catch_up()
        assert again.events == 2
        assert again.bytes == sum(len(line) + 1 for line in _last_lines(data, 2))
        assert p.status().lag_events == 0
        assert_matches_disk(p, spool)


def _last_lines(data: Path, n: int) -> list[bytes]:
    lines: list[bytes] = []
    for seg in sorted((data / "events").glob("*.jsonl")):
        lines += seg.read_bytes().splitlines()
    return lines[-n:]


def test_status_reports_lag_and_size(busy_spool: tuple[Path, Spool]) -> None:
    data, spool = busy_spool
    with Projections.open(data) as p:
        assert p.status().lag_events > 0
        p.catch_up()
        spool.hold(spool.ids()[:1])
        status = p.status()
        assert status.lag_events == 1
        assert status.file_size > 0
        assert status.watermarks[0].node == "n1"


# --- reports -----------------------------------------------------------------------------------


def built_log(data: Path, node: str = "n1") -> None:
    """Three messages received at known times, one of them held, one partly delivered."""
    t = [NOW - dt.timedelta(minutes=m) for m in (2000, 30, 3)]
    clock = iter(t + [NOW] * 20)
    with EventLog(data / "events", node=node, now=lambda: next(clock)) as log:
        for i, rcpts in enumerate(
            [["a@one.example", "b@two.example"], ["c@one.example"], ["d@one.example", "e@one.example"]]
        ):
            log.append(
                ev.MessageEnqueued(
                    id=f"M{i}",
                    sender=f"s{i}@from{i % 2}.example",
                    recipients=rcpts,
                    size=100 * (i + 1),
                    subspool="00",
                ),
                "smtp",
            )
        log.append(ev.MessageHeld(id="M1"), "cli:test")
        log.append(
            ev.DeliveryAttempted(id="M2", recipient="d@one.example", result="delivered", code=250), "delivery"
        )
        log.append(ev.PrioritySet(id="M0", priority="high"), "cli:test")


def test_list_spool_filters_and_sorts(tmp_path: Path) -> None:
    built_log(tmp_path)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        ids = lambda **kw: [r["id"] for r in p.list_spool(now=NOW, **kw)]  # noqa: E731
        assert ids() == ["M0", "M1", "M2"]
        assert set(p.list_spool()[0]) == set(LIST_COLUMNS)
        assert ids(held=True) == ["M1"]
        assert ids(waiting=True) == ["M0", "M2"]
        assert ids(sender="s2@from0.example") == ["M2"]
        assert ids(domain="TWO.example") == ["M0"]
        assert ids(older_than=600) == ["M0", "M1"]
        assert ids(sort="size") == ["M2", "M1", "M0"]
        assert ids(sort="priority") == ["M0", "M1", "M2"]
        assert ids(sort="age", limit=2) == ["M0", "M1"]
        assert ids(sort="next-attempt") == ["M0", "M1", "M2"]
        with pytest.raises(ProjectionError, match="sort must be one of"):
            p.list_spool(sort="colour")  # type: ignore[arg-type]


def test_list_lines_are_the_rows_as_the_cli_encodes_them(tmp_path: Path) -> None:
    """`spool list --json` comes straight from DuckDB: byte for byte what msgspec writes."""
    from events.schema import enc_hook

    built_log(tmp_path)
    odd = NOW + dt.timedelta(microseconds=123_450)  # a time between whole seconds
    with EventLog(tmp_path / "events", node="n1", now=lambda: odd) as log:
        log.append(
            ev.MessageEnqueued(id="M3", sender="", recipients=["x@one.example"], size=1, subspool="00"),
            "smtp",
        )
    encoder = msgspec.json.Encoder(enc_hook=enc_hook)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        for kw in (
            {},
            {"held": True},
            {"waiting": True},
            {"sort": "size", "limit": 2},
            {"claimed": {"M0", "M1"}},
        ):
            rows = p.list_spool(now=NOW, **kw)  # type: ignore[arg-type]
            assert p.list_spool_lines(now=NOW, **kw) == encoder.encode_lines(rows).decode()  # type: ignore[arg-type]
        assert p.list_spool_lines(now=NOW, sender="nobody@nowhere.example") == ""
        status = {r["id"]: r["status"] for r in p.list_spool(now=NOW, claimed={"M0", "M1"})}
        assert (status["M0"], status["M1"]) == ("delivering", "held")  # held stays held
        # the fixture's times fall on whole seconds and between them: both forms are covered
        micros = {r["received_at"].microsecond for r in p.list_spool(now=NOW)}  # type: ignore[attr-defined]
        assert 0 in micros and len(micros) > 1


def test_summary_is_qshape(tmp_path: Path) -> None:
    built_log(tmp_path)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        rows = {r["domain"]: r for r in p.summary("domain", now=NOW)}
        # one.example: a (2000 min), c (30 min), e (3 min); d is delivered
        assert rows["one.example"]["total"] == 3
        assert (rows["one.example"]["m5"], rows["one.example"]["m40"], rows["one.example"]["over_1280"]) == (
            1,
            1,
            1,
        )
        assert rows["two.example"]["total"] == rows["two.example"]["over_1280"] == 1
        senders = {r["sender_domain"]: r["total"] for r in p.summary("sender", now=NOW)}
        assert senders == {"from0.example": 2, "from1.example": 1}
        # the report time is a parameter: an hour later everything has aged
        later = {r["domain"]: r for r in p.summary("domain", now=NOW + dt.timedelta(hours=1))}
        assert later["one.example"]["m5"] == 0
        with pytest.raises(ProjectionError):
            p.summary("colour")


def test_query_refuses_writes(tmp_path: Path) -> None:
    built_log(tmp_path)
    with Projections.open(tmp_path) as p:
        p.catch_up()
        cols, rows = p.query("SELECT count(*) AS n FROM events WHERE type = ?", ["message_enqueued"])
        assert (cols, rows) == (["n"], [(3,)])
        assert p.query("EXPLAIN SELECT * FROM spool")[1]
        for sql in [
            "INSERT INTO events_raw SELECT * FROM events_raw",
            "DELETE FROM message_state",
            "UPDATE message_state SET size = 0",
            "DROP VIEW spool",
            "CREATE TABLE x AS SELECT 1",
            f"COPY events_raw TO '{tmp_path / 'x.csv'}'",
            f"ATTACH '{tmp_path / 'other.duckdb'}'",
            "EXPLAIN ANALYZE DELETE FROM message_state",
            "SELECT 1; DELETE FROM message_state",
            "PRAGMA force_checkpoint",
            "SET threads = 1",
        ]:
            with pytest.raises(QueryRefused) as info:
                p.query(sql)
            assert "\n" not in str(info.value)
        assert p.query("SELECT count(*) FROM message_state")[1] == [(3,)]
        with pytest.raises(ProjectionError) as bad:
            p.query("SELECT nope FROM spool")
        assert "\n" not in str(bad.value)


def test_read_only_reads_and_refuses_updates(tmp_path: Path) -> None:
    built_log(tmp_path)
    with pytest.raises(ProjectionError, match="no projections"):
        Projections.open(tmp_path, read_only=True)
    with Projections.open(tmp_path) as p:
        p.catch_up()
    with Projections.open(tmp_path, read_only=True) as p:
        assert [r["id"] for r in p.list_spool()] == ["M0", "M1", "M2"]
        with pytest.raises(ProjectionError, match="read-only"):
            p.catch_up()
        with pytest.raises(ProjectionError, match="read-only"):
            p.rebuild()


def test_export_parquet_by_day_and_node(tmp_path: Path) -> None:
    import duckdb

    built_log(tmp_path)
    out = tmp_path / "lake"
    with Projections.open(tmp_path) as p:
        p.catch_up()
        counts = p.export_parquet(out)
        again = p.export_parquet(out)  # the same days again: replaced, not doubled
    assert counts == again == {"events": 6, "attempts": 1}
    days = sorted(d.name for d in (out / "events").iterdir())
    assert days == ["day=2030-12-30", "day=2030-12-31", "day=2031-01-01"]
    assert all((d / "node=n1").is_dir() for d in (out / "events").iterdir())
    con = duckdb.connect()
    n = con.execute(
        f"SELECT count(*) FROM read_parquet('{out}/events/*/*/*.parquet', hive_partitioning = true)"
    ).fetchone()
    assert n == (6,)
    with Projections.open(tmp_path) as p:
        assert p.export_parquet(tmp_path / "lake2", since=NOW, until=NOW) == {"events": 3, "attempts": 1}


def test_every_example_query_in_the_docs_runs(busy_spool: tuple[Path, Spool]) -> None:
    data, _ = busy_spool
    text = (Path(__file__).resolve().parent.parent / "docs" / "SQL.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 3
    with Projections.open(data) as p:
        p.catch_up()
        for sql in blocks:
            cols, _ = p.query(sql, now=NOW)
            assert cols
    for view in pschema.VIEWS:  # every view is documented
        assert f"### `{view}`" in text


def test_awkward_addresses_survive(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_spool(data) as spool:
        rcpts = ['"a,b"@example.com', '"q\\" w"@example.org', "ü@bücher.example", "o'neil@x.example"]
        s = spool.enqueue(b"Subject: x\r\n\r\nx\r\n", '"odd,sender"@example.com', rcpts)
        spool.change(
            [s.id],
            lambda s: ev.DeliveryAttempted(
                id=s.id,
                recipient=s.recipients[1].address,
                result="failed",
                code=550,
                response='no "such" user',
            ),
        )
        with Projections.open(data) as p:
            p.catch_up()
            assert_matches_disk(p, spool)
            assert [r["domain"] for r in p.summary("domain")] == [
                "bücher.example",
                "example.com",
                "x.example",
            ]
