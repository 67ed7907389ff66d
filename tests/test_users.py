"""Local users: events, the users.json snapshot, and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from events import read_records
from spoolfs.config import load_config
from spoolfs.spool import Spool
from spoolfs.users import UserError, Users


@pytest.fixture
def spool(tmp_path: Path):
    with Spool.open(load_config(data_dir=str(tmp_path / "data")), actor="cli:test") as s:
        yield s


def test_add_list_delete_with_events(spool: Spool) -> None:
    users = Users(spool.layout.data, ["example.test"])
    assert users.add(spool.log, "Alice@Example.TEST", "cli:test") == "alice@example.test"
    users.add(spool.log, "bob@example.test", "cli:test")
    assert users.list() == ["alice@example.test", "bob@example.test"]
    assert users.exists("ALICE@example.test")
    users.delete(spool.log, "alice@example.test", "cli:test")
    assert users.list() == ["bob@example.test"]
    assert not users.exists("alice@example.test")
    kinds = [(r.type, r.payload.address) for r in read_records(spool.layout.events)]  # type: ignore[union-attr]
    assert kinds == [
        ("user_created", "alice@example.test"),
        ("user_created", "bob@example.test"),
        ("user_deleted", "alice@example.test"),
    ]
    # another process sees the change through users.json
    assert Users(spool.layout.data, []).list() == ["bob@example.test"]


@pytest.mark.parametrize(
    "bad", ["nobody", "a@b@c", "x%y@example.test", "x!y@example.test", ".x@example.test"]
)
def test_bad_addresses_change_nothing(spool: Spool, bad: str) -> None:
    users = Users(spool.layout.data, ["example.test"])
    with pytest.raises((UserError, Exception)):
        users.add(spool.log, bad, "cli:test")
    assert users.list() == []
    assert list(read_records(spool.layout.events)) == []


def test_twice_and_unknown_are_errors(spool: Spool) -> None:
    users = Users(spool.layout.data, ["example.test"])
    users.add(spool.log, "a@example.test", "cli:test")
    with pytest.raises(UserError, match="exists already"):
        users.add(spool.log, "a@example.test", "cli:test")
    with pytest.raises(UserError, match="no user"):
        users.delete(spool.log, "zz@example.test", "cli:test")
    assert len(list(read_records(spool.layout.events))) == 1


def test_corrupt_snapshot_is_rebuilt_from_the_log(spool: Spool) -> None:
    users = Users(spool.layout.data, ["example.test"])
    users.add(spool.log, "a@example.test", "cli:test")
    users.path.write_bytes(b"{garbage")
    assert Users(spool.layout.data, []).list() == ["a@example.test"]


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(tmp_path / "data")
    result = runner.invoke(app, ["--data-dir", data, "users", "add", "carol@example.test"])
    assert result.exit_code == 0 and "added carol@example.test" in result.stdout
    result = runner.invoke(app, ["--data-dir", data, "users", "list", "--json"])
    assert result.stdout.strip() == '{"address":"carol@example.test"}'
    result = runner.invoke(app, ["--data-dir", data, "users", "add", "carol@example.test"])
    assert result.exit_code == 1 and "exists already" in result.output
    result = runner.invoke(app, ["--data-dir", data, "users", "delete", "carol@example.test"])
    assert result.exit_code == 0
    result = runner.invoke(app, ["--data-dir", data, "users", "list"])
    assert result.stdout == ""
