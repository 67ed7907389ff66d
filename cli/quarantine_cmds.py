"""`spool quarantine ...`: list, read, resend (spam only), delete and purge
the messages the scanners kept. Reads the quarantine sidecars directly."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import msgspec
import typer

from cli import output
from cli.context import errors_to_exit, fail, open_spool, state
from cli.report_cmds import opened
from events import clock
from events.schema import Verdict
from spoolfs.addresses import normalize_sender
from spoolfs.quarantine import KINDS, Quarantine, QuarantineEntry, check_kind
from spoolfs.spool import Spool

app = typer.Typer(
    help="Quarantined mail (spam, virus): list, read, resend spam, delete, purge.", no_args_is_help=True
)

Kind = Annotated[str, typer.Argument(metavar="KIND", help="spam or virus.")]
Id = Annotated[str, typer.Argument(metavar="ID")]
Json = Annotated[bool, typer.Option("--json", help="JSON Lines for scripts.")]


@contextmanager
def open_quarantine(ctx: typer.Context) -> Iterator[tuple[Spool, Quarantine]]:
    with open_spool(ctx) as spool:
        yield spool, Quarantine.for_spool(spool, state(ctx).config)


def row(e: QuarantineEntry) -> dict[str, object]:
    """The --json keys of `list`."""
    return {
        "id": e.id,
        "kind": e.kind,
        "quarantined_at": e.quarantined_at,
        "sender": e.sender,
        "recipients": e.recipients,
        "size": e.size,
        "remove_at": e.expires_at,
        "verdict": msgspec.to_builtins(e.verdict),
    }


def _why(e: QuarantineEntry) -> str:
    v = e.verdict
    if e.kind == "virus":
        return v.virus or "-"
    return f"{v.score:g}/{v.threshold:g}"


@app.command("list")
@errors_to_exit
def list_(
    ctx: typer.Context,
    kind: Kind,
    sender: Annotated[str | None, typer.Option("--sender", help="Only this envelope sender.")] = None,
    json: Json = False,
) -> None:
    """The messages in one quarantine, oldest first (the `quarantine` view of the projections)."""
    kind = check_kind(kind)
    wanted = normalize_sender(sender) if sender is not None else None
    now = clock.now()
    sql = "SELECT id, kind, quarantined_at, sender, recipients, size, remove_at, verdict FROM quarantine WHERE kind = ?"
    params: list[object] = [kind]
    if wanted is not None:
        sql += " AND sender = ?"
        params.append(wanted)
    with opened(ctx) as proj:
        columns, found = proj.query(sql + " ORDER BY quarantined_at, id", params, now=now)
    entries = []
    for values in found:
        r = dict(zip(columns, values, strict=True))
        entries.append(
            QuarantineEntry(
                id=r["id"],
                kind=r["kind"],
                node="",
                sender=r["sender"],
                recipients=list(r["recipients"]),
                size=r["size"],
                quarantined_at=r["quarantined_at"],
                remove_at=r["remove_at"],
                verdict=msgspec.json.decode(r["verdict"], type=Verdict),
            )
        )
    if json:
        for e in entries:
            output.json_line(row(e))
        return
    output.table(
        [
            "FILE",
            "DATE",
            "SENDER",
            "RCPT",
            "SIZE",
            "IN QUARANTINE",
            "REMOVAL",
            "VIRUS" if kind == "virus" else "SCORE",
        ],
        [
            (
                f"{e.id}.eml",
                output.when(e.quarantined_at),
                e.sender or "<>",
                str(len(e.recipients)),
                str(e.size),
                output.age(now - e.quarantined_at),
                output.when(e.expires_at),
                _why(e),
            )
            for e in entries
        ],
        right={3, 4, 5},
    )


@app.command()
@errors_to_exit
def show(ctx: typer.Context, kind: Kind, message_id: Id, json: Json = False) -> None:
    """One quarantined message's envelope and verdict."""
    with open_quarantine(ctx) as (_, quarantine):
        e = quarantine.get(kind, message_id)
    if json:
        output.json_line(e)
        return
    v = e.verdict
    rows = [
        ("id", e.id),
        ("file", f"quarantine/{e.kind}/{e.id}.eml"),
        ("sender", e.sender or "<>"),
        ("recipients", str(len(e.recipients))),
        ("size", f"{e.size} bytes"),
        ("quarantined", output.when(e.quarantined_at)),
        ("removal", output.when(e.expires_at)),
        ("virus", v.virus or "-"),
        ("spam score", f"{v.score:g} (threshold {v.threshold:g})" if "spamd" in v.checked else "not checked"),
        ("rules", ", ".join(v.rules) or "-"),
        ("client", f"{e.client_ip} ({e.helo})" if e.client_ip else "-"),
        ("session", e.session_id or "-"),
    ]
    for key, value in rows:
        typer.echo(f"{key + ':':13}{value}")


@app.command()
@errors_to_exit
def message(ctx: typer.Context, kind: Kind, message_id: Id) -> None:
    """The raw quarantined message, exactly as received."""
    with open_quarantine(ctx) as (_, quarantine):
        data = quarantine.message_bytes(kind, message_id)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command()
@errors_to_exit
def recipients(ctx: typer.Context, kind: Kind, message_id: Id, json: Json = False) -> None:
    """The envelope recipients of a quarantined message, one a line."""
    with open_quarantine(ctx) as (_, quarantine):
        e = quarantine.get(kind, message_id)
    for r in e.recipients:
        if json:
            output.json_line({"address": r})
        else:
            typer.echo(r)


@app.command()
@errors_to_exit
def delete(
    ctx: typer.Context,
    kind: Kind,
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...", help="Message IDs.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every message in that quarantine.")] = False,
) -> None:
    """Remove quarantined messages for good (an event each)."""
    kind = check_kind(kind)
    if bool(ids) == all_:
        raise fail("give message IDs or --all (exactly one)")
    with open_quarantine(ctx) as (_, quarantine):
        done = quarantine.delete_all(kind) if all_ else quarantine.delete(kind, ids or [])
    typer.echo(
        f"deleted: {len(done)} {'message' if len(done) == 1 else 'messages'} from the {kind} quarantine"
    )


@app.command()
@errors_to_exit
def resend(
    ctx: typer.Context,
    ids: Annotated[
        list[str], typer.Argument(metavar="[spam] ID...", help="Message IDs in the spam quarantine.")
    ],
    json: Json = False,
) -> None:
    """Put spam back in the spool for delivery to its recipients, unscanned.

    Virus mail is never resent: asking is refused and nothing moves.
    """
    if ids and ids[0] in KINDS:
        kind, ids = ids[0], ids[1:]
        if kind == "virus":
            raise fail(
                "virus mail is never resent (`spool quarantine delete virus ID` removes it); nothing was resent"
            )
    if not ids:
        raise fail("give the IDs of messages in the spam quarantine")
    with open_quarantine(ctx) as (spool, quarantine):
        done = quarantine.resend(spool, ids)
    for old, new in done:
        if json:
            output.json_line({"id": old, "new_id": new})
        else:
            typer.echo(f"resent {old} as {new}")


@app.command()
@errors_to_exit
def purge(ctx: typer.Context, json: Json = False) -> None:
    """Remove what is past its removal time now (the purge service does it every 10 minutes)."""
    with open_quarantine(ctx) as (_, quarantine):
        for mid, action in quarantine.recover():
            typer.echo(f"spool: quarantine {mid}: {action}", err=True)
        done = quarantine.purge()
    if json:
        for e in done:
            output.json_line({"id": e.id, "kind": e.kind, "remove_at": e.expires_at})
        return
    typer.echo(f"purged: {len(done)} {'message' if len(done) == 1 else 'messages'}")
