"""The `quarantine` view of the projections tells what the quarantine holds."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from freezegun import freeze_time

from cli.quarantine_cmds import row
from events.schema import Verdict
from projections import Projections
from spoolfs.config import load_config
from spoolfs.quarantine import Quarantine
from spoolfs.spool import Spool

T0 = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC)


def test_view_equals_the_quarantine_sidecars(tmp_path: Path) -> None:
    config = load_config(data_dir=str(tmp_path / "data"))
    with freeze_time(T0) as clock, Spool.open(config, actor="cli:test") as spool:
        q = Quarantine.for_spool(spool, config)
        spam = Verdict(score=1000.0, threshold=5.0, rules=["GTUBE"], checked=["spamd"])
        virus = Verdict(virus="Eicar-Test-Signature.UNOFFICIAL", checked=["clamd"])
        kept = [
            q.add(b"Subject: s1\r\n\r\nx\r\n", "a@sender.test", ["x@remote.test"], "spam", spam),
            q.add(
                b"Subject: s2\r\n\r\nxx\r\n",
                "b@sender.test",
                ["y@remote.test", "z@remote.test"],
                "spam",
                spam,
            ),
            q.add(b"Subject: v1\r\n\r\nxxx\r\n", "c@sender.test", ["x@remote.test"], "virus", virus),
        ]
        clock.tick(60)
        gone = q.add(b"Subject: s3\r\n\r\nx\r\n", "d@sender.test", ["x@remote.test"], "spam", spam)
        q.delete("spam", [gone.id])
        resent = q.add(b"Subject: s4\r\n\r\nx\r\n", "e@sender.test", ["x@remote.test"], "spam", spam)
        q.resend(spool, [resent.id], actor="cli:test")
        expected = sorted(
            (row(e) for kind in ("spam", "virus") for e in q.entries(kind)), key=lambda r: str(r["id"])
        )
        with Projections.open(spool.layout.data) as proj:
            proj.catch_up()
            columns, rows = proj.query(
                "SELECT id, kind, quarantined_at, sender, recipients, size, remove_at, verdict "
                "FROM quarantine ORDER BY id"
            )
    got = [dict(zip(columns, r, strict=True)) for r in rows]
    for g in got:
        g["verdict"] = json.loads(g["verdict"])
        g["recipients"] = list(g["recipients"])
    assert [e["id"] for e in expected] == [k.id for k in sorted(kept, key=lambda e: e.id)]
    assert got == expected
