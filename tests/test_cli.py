"""The `spool` command: output for people and scripts, the admin verbs, the event log
commands and the error contract (one line on stderr, no traceback, nothing changed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from spoolfs.ids import check_id
from spoolfs.layout import Layout

SPOOL_BIN = Path(sys.executable).parent / "spool"
RAW = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbinary \x00\xff\xfe ok\r\n"
UNKNOWN = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
LIST_KEYS = [
    "id",
    "subspool",
    "sender",
    "recipients_delivered",
    "recipients_total",
    "size",
    "attempts",
    "received_at",
    "priority",
    "status",
    "next_attempt_at",
]
SIDECAR_KEYS = {
    "id",
    "node",
    "subspool",
    "sender",
    "recipients",
    "size",
    "received_at",
    "priority",
    "status",
    "attempts",
    "next_attempt_at",
    "forced",
    "source",
    "client_ip",
    "helo",
    "session_id",
    "seq",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOOL_CONFIG", raising=False)
    monkeypatch.delenv("SPOOL_DATA_DIR", raising=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def msg_file(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(RAW)
    return path


# --- helpers --------------------------------------------------------------------------


def run(data: Path, *args: str, input: bytes | str | None = None) -> Result:
    return CliRunner().invoke(app, ["--data-dir", str(data), *args], input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def proc(data: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("SPOOL_CONFIG", "SPOOL_DATA_DIR")}
    env["SPOOL_DATA_DIR"] = str(data)
    return subprocess.run(
        [str(SPOOL_BIN), *args], input=input, capture_output=True, env=env, timeout=60, check=False
    )


def add(
    data: Path, msg_file: Path, sender: str = "alice@example.org", *rcpts: str, prio: str = "normal"
) -> str:
    to = [x for r in (rcpts or ("bob@example.net",)) for x in ("--to", r)]
    result = ok(run(data, "enqueue", str(msg_file), "--from", sender, *to, "--priority", prio))
    return check_id(result.stdout.splitlines()[-1])


def log_records(data: Path) -> list[dict[str, Any]]:
    out = []
    for segment in sorted((data / "events").glob("*.jsonl")):
        out.extend(json.loads(line) for line in segment.read_bytes().splitlines())
    return out


def sidecar_path(data: Path, mid: str) -> Path:
    return data / "spool" / Layout(data, 16).subspool_of(mid) / f"{mid}.json"


def sidecar(data: Path, mid: str) -> dict[str, Any]:
    return json.loads(sidecar_path(data, mid).read_bytes())


def all_sidecars(data: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in (data / "spool").glob("[0-9a-f][0-9a-f]/*.json"):
        out[path.stem] = json.loads(path.read_bytes())
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def json_lines(text: str | bytes) -> list[dict[str, Any]]:
    if isinstance(text, bytes):
        text = text.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: Result | subprocess.CompletedProcess[bytes]) -> str:
    if isinstance(result, Result):
        code, err = result.exit_code, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    else:
        code, err = result.returncode, result.stderr.decode(errors="replace")
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spool: "), err
    return lines[0]


# --- enqueue and reading -------------------------------------------------------------------


def test_enqueue_from_a_file(data: Path, msg_file: Path) -> None:
    result = ok(run(data, "enqueue", str(msg_file), "--from", "alice@Example.ORG", "--to", "bob@example.net"))
    mid = result.stdout.splitlines()[-1]
    assert mid == result.stdout.strip()  # the ID alone
    check_id(mid)
    nn = Layout(data, 16).subspool_of(mid)
    assert (data / "spool" / nn / f"{mid}.eml").read_bytes() == RAW
    side = sidecar(data, mid)
    assert side["sender"] == "alice@example.org"
    assert side["size"] == len(RAW)
    assert side["status"] == "waiting"
    assert [r["address"] for r in side["recipients"]] == ["bob@example.net"]
    (rec,) = log_records(data)
    assert rec["payload"]["type"] == "message_enqueued"
    assert rec["payload"]["id"] == mid
    assert rec["actor"].startswith("cli:")


def test_enqueue_from_stdin(data: Path) -> None:
    result = ok(
        run(
            data,
            "enqueue",
            "-",
            "--from",
            "",
            "--to",
            "x@example.net",
            "--to",
            "y@example.net",
            "--priority",
            "low",
            input=RAW,
        )
    )
    mid = check_id(result.stdout.splitlines()[-1])
    assert (data / "spool" / Layout(data, 16).subspool_of(mid) / f"{mid}.eml").read_bytes() == RAW
    side = sidecar(data, mid)
    assert side["sender"] == ""
    assert side["priority"] == "low"
    assert [r["address"] for r in side["recipients"]] == ["x@example.net", "y@example.net"]


def test_show_text_and_json(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file, "alice@example.org", "b@example.net", "c@example.net", prio="high")
    text = ok(run(data, "show", mid)).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["id"] == mid
    assert fields["sender"] == "alice@example.org"
    assert fields["recipients"] == "0/2 delivered"
    assert fields["size"] == f"{len(RAW)} bytes"
    assert fields["priority"] == "high"
    assert fields["status"] == "waiting"
    assert fields["file"] == f"spool/{Layout(data, 16).subspool_of(mid)}/{mid}.eml"
    assert fields["seq"] == str(sidecar(data, mid)["seq"])

    shown = json.loads(ok(run(data, "show", mid, "--json")).stdout)
    assert set(shown) >= SIDECAR_KEYS | {"delivering"}
    assert set(shown) == set(sidecar(data, mid)) | {"delivering"}
    assert shown["delivering"] is False
    del shown["delivering"]
    assert shown == sidecar(data, mid)


def test_show_of_a_null_sender(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file, "")
    assert "sender:       <>" in ok(run(data, "show", mid)).stdout


def test_message_prints_exact_bytes(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file)
    assert ok(run(data, "message", mid)).stdout_bytes == RAW


def test_recipients_json_lines(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file, "a@example.org", "one@example.net", "two@example.net", "one@EXAMPLE.net")
    result = ok(run(data, "recipients", mid, "--json"))
    rows = json_lines(result.stdout)
    assert [r["address"] for r in rows] == ["one@example.net", "two@example.net"]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in rows)
    assert rows == sidecar(data, mid)["recipients"]
    table = ok(run(data, "recipients", mid)).stdout.splitlines()
    assert table[0].split() == ["RECIPIENT", "STATE", "ATTEMPTS", "LAST", "RESPONSE"]
    assert len(table) == 3


def test_list_json_keys_and_values(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file, f"s{i}@example.org", "a@x.org", "b@x.org") for i in range(3)]
    ok(run(data, "hold", ids[1]))
    rows = json_lines(ok(run(data, "list", "--json")).stdout)
    assert [r["id"] for r in rows] == sorted(ids)
    for row in rows:
        assert list(row) == LIST_KEYS
        side = sidecar(data, row["id"])
        assert row["subspool"] == side["subspool"] == Layout(data, 16).subspool_of(row["id"])
        assert row["sender"] == side["sender"]
        assert row["recipients_delivered"] == 0
        assert row["recipients_total"] == 2
        assert row["size"] == len(RAW)
        assert row["attempts"] == 0
        assert row["received_at"] == side["received_at"]
        assert row["next_attempt_at"] == side["next_attempt_at"]
        assert row["priority"] == "normal"
        assert row["status"] == side["status"]
    assert [r["id"] for r in json_lines(ok(run(data, "list", "--json", "--held")).stdout)] == [ids[1]]
    waiting = json_lines(ok(run(data, "list", "--json", "--waiting")).stdout)
    assert sorted(r["id"] for r in waiting) == sorted([ids[0], ids[2]])
    by_sender = json_lines(ok(run(data, "list", "--json", "--sender", "s2@example.org")).stdout)
    assert [r["id"] for r in by_sender] == [ids[2]]
    assert len(json_lines(ok(run(data, "list", "--json", "--limit", "2")).stdout)) == 2


def test_list_shows_a_claimed_message_as_delivering(data: Path, msg_file: Path) -> None:
    from spoolfs import claim

    ids = [add(data, msg_file, f"s{i}@example.org", "a@x.org") for i in range(3)]
    layout = Layout(data, 16)
    with claim.claim(layout.eml(ids[1]), ids[1]), open(data / "unrelated", "w") as f:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX)  # a lock outside the spool must not count
        rows = json_lines(ok(run(data, "list", "--json")).stdout)
        assert claim.claimed_in(layout.spool / nn for nn in layout.subspool_names()) == {ids[1]}
    assert {r["id"]: r["status"] for r in rows} == {
        ids[0]: "waiting",
        ids[1]: "delivering",
        ids[2]: "waiting",
    }
    rows = json_lines(ok(run(data, "list", "--json")).stdout)
    assert {r["status"] for r in rows} == {"waiting"}


def test_list_table(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file, "")
    lines = ok(run(data, "list")).stdout.splitlines()
    assert lines[0].split() == ["ID", "NN", "SENDER", "RCPT", "KB", "TRIES", "AGE", "PRIO", "STATUS", "NEXT"]
    assert len(lines) == 2
    assert lines[1].split()[:4] == [mid, Layout(data, 16).subspool_of(mid), "<>", "0/1"]


def test_a_corrupt_sidecar_is_moved_aside_and_listing_goes_on(data: Path, msg_file: Path) -> None:
    ids = sorted(add(data, msg_file) for _ in range(3))
    sidecar_path(data, ids[1]).write_bytes(b"garbage")
    # the listing comes from the log, which still has all three
    assert [r["id"] for r in json_lines(ok(run(data, "list", "--json")).stdout)] == ids
    # the first command that reads the sidecar moves the pair aside, with an event
    result = run(data, "show", ids[1])
    assert result.exit_code == 1 and ids[1] in result.stderr and result.stderr.startswith("spool: ")
    assert (data / "spool" / "corrupt" / f"{ids[1]}.json").read_bytes() == b"garbage"
    assert log_records(data)[-1]["payload"]["type"] == "moved_to_corrupt"
    assert [r["id"] for r in json_lines(ok(run(data, "list", "--json")).stdout)] == [ids[0], ids[2]]


# --- the admin verbs -------------------------------------------------------------------------

VERBS = [
    pytest.param(["hold"], "message_held", {"status": "held"}, id="hold"),
    pytest.param(["force"], "message_forced", {"forced": True}, id="force"),
    pytest.param(["reset-retries"], "retries_reset", {"attempts": 0}, id="reset-retries"),
    pytest.param(["priority", "--set", "low"], "priority_set", {"priority": "low"}, id="priority"),
    pytest.param(["delete"], "message_deleted", None, id="delete"),
]


def _check_changed(data: Path, before: list[dict[str, Any]], ids: list[str], etype: str, want: Any) -> None:
    new = log_records(data)[len(before) :]
    assert sorted(r["payload"]["id"] for r in new) == sorted(ids)
    assert {r["payload"]["type"] for r in new} == {etype}
    seq_of = {r["payload"]["id"]: r["seq"] for r in new}
    for mid in ids:
        if want is None:
            assert not sidecar_path(data, mid).exists()
            assert not sidecar_path(data, mid).with_suffix(".eml").exists()
        else:
            side = sidecar(data, mid)
            assert {k: side[k] for k in want} == want
            assert side["seq"] == seq_of[mid]


@pytest.mark.parametrize(("verb", "etype", "want"), VERBS)
def test_verb_with_ids(data: Path, msg_file: Path, verb: list[str], etype: str, want: Any) -> None:
    ids = [add(data, msg_file) for _ in range(3)]
    untouched = sidecar_path(data, ids[2]).read_bytes()
    before = log_records(data)
    result = ok(run(data, *verb, ids[0], ids[1]))
    assert result.stdout.strip().endswith(": 2 messages")
    _check_changed(data, before, ids[:2], etype, want)
    assert sidecar_path(data, ids[2]).read_bytes() == untouched


@pytest.mark.parametrize(("verb", "etype", "want"), VERBS)
def test_verb_with_all(data: Path, msg_file: Path, verb: list[str], etype: str, want: Any) -> None:
    ids = [add(data, msg_file) for _ in range(3)]
    before = log_records(data)
    result = ok(run(data, *verb, "--all"))
    assert result.stdout.strip().endswith(": 3 messages")
    _check_changed(data, before, ids, etype, want)


@pytest.mark.parametrize(("verb", "etype", "want"), VERBS)
def test_verb_with_ids_on_stdin(data: Path, msg_file: Path, verb: list[str], etype: str, want: Any) -> None:
    ids = [add(data, msg_file) for _ in range(3)]
    untouched = sidecar_path(data, ids[1]).read_bytes()
    before = log_records(data)
    ok(run(data, *verb, "-", input=f"{ids[0]}\n\n  {ids[2]}  \n"))
    _check_changed(data, before, [ids[0], ids[2]], etype, want)
    assert sidecar_path(data, ids[1]).read_bytes() == untouched


def test_release_with_ids_all_and_stdin(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file) for _ in range(4)]
    ok(run(data, "hold", "--all"))
    before = log_records(data)
    ok(run(data, "release", ids[0]))
    _check_changed(data, before, [ids[0]], "message_released", {"status": "waiting"})
    before = log_records(data)
    ok(run(data, "release", "-", input=ids[1] + "\n"))
    _check_changed(data, before, [ids[1]], "message_released", {"status": "waiting"})
    before = log_records(data)
    result = ok(run(data, "release", "--all"))
    assert result.stdout.strip() == "released: 2 messages"  # the two still held
    _check_changed(data, before, ids[2:], "message_released", {"status": "waiting"})


def test_hold_of_a_held_message_records_nothing(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file)
    ok(run(data, "hold", mid))
    before = snapshot(data)
    assert ok(run(data, "hold", mid)).stdout.strip() == "held: 0 messages"
    assert snapshot(data) == before


def test_delete_by_sender(data: Path, msg_file: Path) -> None:
    a1 = add(data, msg_file, "spammer@example.org")
    keep = add(data, msg_file, "friend@example.org")
    a2 = add(data, msg_file, "spammer@example.org")
    null = add(data, msg_file, "")
    before = log_records(data)
    result = ok(run(data, "delete", "--sender", "spammer@example.org"))
    assert result.stdout.strip() == "deleted: 2 messages"
    _check_changed(data, before, [a1, a2], "message_deleted", None)
    assert set(all_sidecars(data)) == {keep, null}
    # the null sender is '' on the command line too
    ok(run(data, "delete", "--sender", ""))
    assert set(all_sidecars(data)) == {keep}


def test_delete_by_sender_with_upper_case_domain(data: Path, msg_file: Path) -> None:
    add(data, msg_file, "spammer@example.org")
    ok(run(data, "delete", "--sender", "spammer@EXAMPLE.org"))
    assert all_sidecars(data) == {}


# --- the event log ------------------------------------------------------------------------------


def test_events_tail(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file) for _ in range(3)]
    ok(run(data, "hold", ids[0]))
    ok(run(data, "force", ids[1]))
    # log: 1-3 enqueued, 4 held, 5 forced
    recs = json_lines(ok(run(data, "events", "tail", "--json")).stdout)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs == log_records(data)
    for r in recs:
        assert len(r["prev"]) == 64
        assert "type" in r["payload"]
    assert [r["seq"] for r in json_lines(ok(run(data, "events", "tail", "-n", "2", "--json")).stdout)] == [
        4,
        5,
    ]
    typed = json_lines(
        ok(run(data, "events", "tail", "--type", "message_enqueued", "--json", "-n", "2")).stdout
    )
    assert [(r["seq"], r["payload"]["type"]) for r in typed] == [
        (2, "message_enqueued"),
        (3, "message_enqueued"),
    ]
    both = json_lines(
        ok(run(data, "events", "tail", "--type", "message_held", "--type", "message_forced", "--json")).stdout
    )
    assert [r["payload"]["type"] for r in both] == ["message_held", "message_forced"]
    text = ok(run(data, "events", "tail", "-n", "1")).stdout.splitlines()
    assert len(text) == 1
    assert "message_forced" in text[0] and ids[1] in text[0]


def test_events_tail_unknown_type_is_refused(data: Path, msg_file: Path) -> None:
    add(data, msg_file)
    result = run(data, "events", "tail", "--type", "no_such_event")
    assert result.exit_code == 2
    assert "no_such_event" in result.stderr
    assert "Traceback" not in result.stderr


def test_events_verify_ok_then_broken(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file) for _ in range(2)]
    ok(run(data, "hold", ids[0]))
    result = ok(run(data, "events", "verify"))
    assert result.stdout.startswith("ok: 3 events")
    assert "head seq 3" in result.stdout

    (segment,) = (data / "events").glob("*.jsonl")
    lines = segment.read_bytes().split(b"\n")
    assert b'"seq":2,' in lines[1]
    at = lines[1].index(b'"actor":"cli:') + len(b'"actor":"c')
    assert lines[1][at : at + 1] == b"l"
    lines[1] = lines[1][:at] + b"L" + lines[1][at + 1 :]  # flip one byte of record seq 2
    segment.write_bytes(b"\n".join(lines))

    result = run(data, "events", "verify")
    assert result.exit_code == 1
    line = assert_one_line_error(result)
    assert "seq 2 " in line
    assert result.stdout == ""


def test_events_replay_equals_the_sidecars(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file, "a@example.org", "x@y.org", "z@y.org") for _ in range(4)]
    ok(run(data, "hold", ids[0]))
    ok(run(data, "priority", "--set", "high", ids[1]))
    ok(run(data, "force", ids[2]))
    ok(run(data, "delete", ids[3]))
    replayed = json_lines(ok(run(data, "events", "replay")).stdout)
    assert [r["id"] for r in replayed] == sorted(ids[:3])
    on_disk = all_sidecars(data)
    assert {r["id"]: r for r in replayed} == on_disk
    assert on_disk[ids[0]]["status"] == "held"
    # --until shows the state as of a seq
    early = json_lines(ok(run(data, "events", "replay", "--until", "2")).stdout)
    assert sorted(r["id"] for r in early) == sorted(ids[:2])
    assert all(r["status"] == "waiting" for r in early)


def test_fsck_on_a_clean_spool(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file) for _ in range(3)]
    ok(run(data, "hold", ids[0]))
    ok(run(data, "delete", ids[1]))
    before = snapshot(data)
    result = ok(run(data, "fsck"))
    assert "0 problems" in result.stdout
    assert "2 messages" in result.stdout
    assert snapshot(data) == before


def test_demo_in_an_empty_data_dir(data: Path) -> None:
    result = ok(run(data, "demo"))
    assert str(data) in result.stdout
    sides = all_sidecars(data)
    assert len(sides) == 3
    assert sorted(s["priority"] for s in sides.values()) == ["high", "low", "normal"]
    assert "" in {s["sender"] for s in sides.values()}
    assert [r["payload"]["type"] for r in log_records(data)] == ["message_enqueued"] * 3
    for mid in sides:
        assert mid in result.stdout
        assert (sidecar_path(data, mid).with_suffix(".eml")).read_bytes().startswith(b"From: ")


# --- errors: one line, non-zero, nothing changed ---------------------------------------------


ERROR_CASES = [
    pytest.param(["show", UNKNOWN], "no message", id="show-unknown"),
    pytest.param(["message", UNKNOWN], "no message", id="message-unknown"),
    pytest.param(["recipients", UNKNOWN], "no message", id="recipients-unknown"),
    pytest.param(["hold", "{id}", UNKNOWN], "no message", id="hold-unknown"),
    pytest.param(["delete", "{id}", UNKNOWN], "no message", id="delete-unknown"),
    pytest.param(["force", "{id}", "a/b"], "not a message ID", id="force-slash"),
    pytest.param(["delete", "../{id}"], "not a message ID", id="delete-dotdot"),
    pytest.param(["show", "../../etc/passwd"], "not a message ID", id="show-dotdot"),
    pytest.param(["message", "{id}/../{id}"], "not a message ID", id="message-slash"),
    pytest.param(["priority", "--set", "high", "{id}", ".."], "not a message ID", id="priority-dotdot"),
    pytest.param(
        ["enqueue", "{tmp}/missing.eml", "--from", "a@b.org", "--to", "c@d.org"],
        "cannot read",
        id="enqueue-missing",
    ),
    pytest.param(
        ["enqueue", "{msg}", "--from", "a@b.org", "--to", "c@@d.org"],
        "not an RFC 5321",
        id="enqueue-bad-rcpt",
    ),
    pytest.param(
        ["enqueue", "{msg}", "--from", "a@b.org", "--to", "ok@d.org", "--to", "@a,@b:u@c"],
        "source route",
        id="enqueue-source-route",
    ),
    pytest.param(
        ["enqueue", "{msg}", "--from", "not-an-address", "--to", "c@d.org"],
        "not an RFC 5321",
        id="enqueue-bad-sender",
    ),
    pytest.param(
        ["enqueue", "{msg}", "--from", "a@b.org", "--to", "c@d.org", "--priority", "bogus"],
        "--priority",
        id="enqueue-bad-priority",
    ),
    pytest.param(
        ["enqueue", "{tmp}/empty.eml", "--from", "a@b.org", "--to", "c@d.org"], "empty", id="enqueue-empty"
    ),
    pytest.param(["hold"], "exactly one", id="hold-nothing"),
    pytest.param(["force"], "exactly one", id="force-nothing"),
    pytest.param(["delete"], "exactly one", id="delete-nothing"),
    pytest.param(["hold", "{id}", "--all"], "exactly one", id="hold-ids-and-all"),
    pytest.param(["delete", "--all", "--sender", "a@b.org"], "exactly one", id="delete-all-and-sender"),
    pytest.param(["hold", "{id}", "-"], "only ID", id="dash-with-ids"),
    pytest.param(["priority", "{id}"], "--set", id="priority-without-set"),
    pytest.param(["priority", "--set", "urgent", "{id}"], "--set", id="priority-bogus"),
]


@pytest.mark.parametrize(("args", "why"), ERROR_CASES)
def test_errors_are_one_line_and_change_nothing(
    data: Path, msg_file: Path, tmp_path: Path, args: list[str], why: str
) -> None:
    mid = add(data, msg_file)
    (tmp_path / "empty.eml").write_bytes(b"")
    before = snapshot(data)
    args = [a.format(id=mid, tmp=tmp_path, msg=msg_file) for a in args]
    result = run(data, *args)
    line = assert_one_line_error(result)
    assert why in line, line
    assert result.stdout == ""
    assert snapshot(data) == before


def test_errors_from_stdin_ids_change_nothing(data: Path, msg_file: Path) -> None:
    ids = [add(data, msg_file) for _ in range(2)]
    before = snapshot(data)
    result = run(data, "delete", "-", input=f"{ids[0]}\n../etc\n{ids[1]}\n")
    assert "not a message ID" in assert_one_line_error(result)
    result = run(data, "hold", "-", input=f"{ids[0]}\n{UNKNOWN}\n")
    assert "no message" in assert_one_line_error(result)
    assert snapshot(data) == before


def test_id_with_trailing_newline_is_refused_as_an_id(data: Path, msg_file: Path) -> None:
    mid = add(data, msg_file)
    result = run(data, "show", mid + "\n")
    assert "not a message ID" in assert_one_line_error(result)


# --- real processes ----------------------------------------------------------------------------


def test_real_process_round_trip(data: Path) -> None:
    enq = proc(data, "enqueue", "-", "--from", "a@example.org", "--to", "b@example.net", input=RAW)
    assert enq.returncode == 0, enq.stderr
    mid = check_id(enq.stdout.decode().splitlines()[-1])
    assert proc(data, "message", mid).stdout == RAW
    rows = json_lines(proc(data, "list", "--json").stdout)
    assert [list(r) for r in rows] == [LIST_KEYS]
    assert rows[0]["id"] == mid
    held = proc(data, "hold", "-", input=f"{mid}\n".encode())
    assert held.returncode == 0 and held.stdout.strip() == b"held: 1 message"
    assert sidecar(data, mid)["status"] == "held"
    verify = proc(data, "events", "verify")
    assert verify.returncode == 0
    assert verify.stdout.startswith(b"ok: 2 events")
    fsck = proc(data, "fsck")
    assert fsck.returncode == 0, fsck.stdout


def test_real_process_errors(data: Path, tmp_path: Path) -> None:
    ok(run(data, "demo"))
    before = snapshot(data)
    for args, why in [
        (["show", "../x"], b"not a message ID"),
        (["delete", UNKNOWN], b"no message"),
        (["enqueue", str(tmp_path / "nope.eml"), "--from", "a@b.org", "--to", "c@d.org"], b"cannot read"),
        (["hold"], b"exactly one"),
    ]:
        result = proc(data, *args)
        assert why in assert_one_line_error(result).encode(), args
        assert result.returncode == 1
    assert snapshot(data) == before


def test_real_process_non_utf8_address_is_a_one_line_error(data: Path, msg_file: Path) -> None:
    env_args = ["enqueue", str(msg_file), "--from", "a@b.org", "--to"]
    result = subprocess.run(
        [os.fsencode(str(SPOOL_BIN)), *(a.encode() for a in env_args), b"bad\xff@example.org"],
        capture_output=True,
        env={**{k: v for k, v in os.environ.items() if k != "SPOOL_CONFIG"}, "SPOOL_DATA_DIR": str(data)},
        timeout=60,
        check=False,
    )
    assert "not an RFC 5321" in assert_one_line_error(result)
