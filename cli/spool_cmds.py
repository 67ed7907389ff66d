"""The spool's own verbs: enqueue, show, message, recipients, and the
admin operations (force, reset-retries, priority, hold, release, delete)."""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from cli import output
from cli.context import errors_to_exit, fail, open_spool
from events import clock
from spoolfs.addresses import normalize_sender
from spoolfs.spool import Spool
from spoolfs.state import Sidecar

Ids = Annotated[list[str] | None, typer.Argument(help="Message IDs; `-` reads them from standard input.")]
All = Annotated[bool, typer.Option("--all", help="Every message in the spool.")]
Json = Annotated[bool, typer.Option("--json", help="JSON Lines for scripts.")]
PRIORITIES = ("high", "normal", "low")


def register(app: typer.Typer) -> None:
    app.command()(errors_to_exit(enqueue))
    app.command()(errors_to_exit(show))
    app.command()(errors_to_exit(message))
    app.command()(errors_to_exit(recipients))
    app.command()(errors_to_exit(force))
    app.command("reset-retries")(errors_to_exit(reset_retries))
    app.command()(errors_to_exit(priority))
    app.command()(errors_to_exit(hold))
    app.command()(errors_to_exit(release))
    app.command()(errors_to_exit(delete))


def enqueue(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="The message (RFC 5322), or `-` for standard input.")],
    sender: Annotated[str, typer.Option("--from", help="Envelope sender; '' is the null sender.")],
    to: Annotated[list[str], typer.Option("--to", help="Envelope recipient (repeat for more).")],
    prio: Annotated[str, typer.Option("--priority", help="high, normal or low.")] = "normal",
) -> None:
    """Put a message in the spool; prints its ID."""
    if prio not in PRIORITIES:
        raise fail(f"--priority must be one of {', '.join(PRIORITIES)}, not {prio!r}")
    if file == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            raw = Path(file).read_bytes()
        except OSError as exc:
            raise fail(f"cannot read {file}: {exc.strerror}") from None
    if not raw:
        raise fail(f"{file}: the message is empty")
    with open_spool(ctx) as spool:
        sidecar = spool.enqueue(raw, sender, to, priority=prio)  # type: ignore[arg-type]
    typer.echo(sidecar.id)


def _as_dict(spool: Spool, s: Sidecar) -> dict[str, object]:
    d = msgspec.to_builtins(s)
    d["delivering"] = spool.is_delivering(s.id)
    return d  # type: ignore[no-any-return]


def show(
    ctx: typer.Context, message_id: Annotated[str, typer.Argument(metavar="ID")], json: Json = False
) -> None:
    """A message's envelope and delivery state."""
    with open_spool(ctx) as spool:
        s = spool.get(message_id)
        if json:
            output.json_line(_as_dict(spool, s))
            return
        status = "delivering" if spool.is_delivering(s.id) else s.status
        rows = [
            ("id", s.id),
            ("file", str(spool.layout.eml(s.id).relative_to(spool.layout.data))),
            ("sender", s.sender or "<>"),
            ("recipients", f"{s.delivered}/{len(s.recipients)} delivered"),
            ("size", f"{s.size} bytes"),
            ("received", output.when(s.received_at)),
            ("age", output.age(clock.now() - s.received_at)),
            ("priority", s.priority),
            ("status", status + (" (forced)" if s.forced else "")),
            ("attempts", str(s.attempts)),
            ("next attempt", output.when(s.next_attempt_at)),
            ("source", s.source),
            ("node", s.node),
            ("seq", str(s.seq)),
        ]
        if s.client_ip:
            rows += [("client", s.client_ip), ("helo", s.helo), ("session", s.session_id)]
        for key, value in rows:
            typer.echo(f"{key + ':':14}{value}")


def message(ctx: typer.Context, message_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """The raw message, exactly as received."""
    with open_spool(ctx) as spool:
        data = spool.message_bytes(message_id)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def recipients(
    ctx: typer.Context, message_id: Annotated[str, typer.Argument(metavar="ID")], json: Json = False
) -> None:
    """Each recipient: delivered, pending, deferred or failed, and the last response."""
    with open_spool(ctx) as spool:
        s = spool.get(message_id)
    if json:
        for r in s.recipients:
            output.json_line(r)
        return
    output.table(
        ["RECIPIENT", "STATE", "ATTEMPTS", "LAST RESPONSE"],
        [(r.address, r.state, str(r.attempts), r.response or "-") for r in s.recipients],
        right={2},
    )


def list_row(s: Sidecar, delivering: bool) -> dict[str, object]:
    """A sidecar as a `spool list --json` row: the reference the projections must match."""
    return {
        "id": s.id,
        "subspool": s.subspool,
        "sender": s.sender,
        "recipients_delivered": s.delivered,
        "recipients_total": len(s.recipients),
        "size": s.size,
        "attempts": s.attempts,
        "received_at": s.received_at,
        "priority": s.priority,
        "status": "delivering" if delivering else s.status,
        "next_attempt_at": s.next_attempt_at,
    }


def _targets(spool: Spool, ids: list[str] | None, all_: bool, sender: str | None = None) -> list[str]:
    given = list(ids or [])
    if given == ["-"]:
        given = [line.strip() for line in sys.stdin if line.strip()]
    elif "-" in given:
        raise fail("`-` must be the only ID argument")
    chosen = sum([bool(given), all_, sender is not None])
    if chosen != 1:
        raise fail(
            "give message IDs, --all" + (" or --sender" if sender is not None else "") + " (exactly one)"
        )
    if all_:
        return spool.ids()
    if sender is not None:
        wanted = normalize_sender(sender)
        return [s.id for s in spool.sidecars() if s.sender == wanted]
    return spool.resolve(given)


def _bulk(
    ctx: typer.Context,
    ids: list[str] | None,
    all_: bool,
    verb: str,
    run: Callable[[Spool, list[str], Callable[[int], None]], list[Sidecar]],
    sender: str | None = None,
) -> None:
    with open_spool(ctx) as spool:
        targets = _targets(spool, ids, all_, sender)
        if sys.stderr.isatty() and len(targets) > 200:
            with typer.progressbar(length=len(targets), label=verb, file=sys.stderr) as bar:
                changed = run(spool, targets, bar.update)
        else:
            changed = run(spool, targets, lambda n: None)
    noun = "message" if len(changed) == 1 else "messages"
    typer.echo(f"{verb}: {len(changed)} {noun}")


def force(ctx: typer.Context, ids: Ids = None, all_: All = False) -> None:
    """Attempt delivery now, ahead of everything else."""
    _bulk(ctx, ids, all_, "forced", lambda sp, t, p: sp.force(t, progress=p))


def reset_retries(ctx: typer.Context, ids: Ids = None, all_: All = False) -> None:
    """Set the attempt count to zero and the next attempt to now."""
    _bulk(ctx, ids, all_, "retries reset", lambda sp, t, p: sp.reset_retries(t, progress=p))


def priority(
    ctx: typer.Context,
    ids: Ids = None,
    to: Annotated[str, typer.Option("--set", help="high, normal or low.")] = "",
    all_: All = False,
) -> None:
    """Change the delivery priority."""
    if to not in PRIORITIES:
        raise fail(f"--set must be one of {', '.join(PRIORITIES)}")
    _bulk(ctx, ids, all_, f"priority {to}", lambda sp, t, p: sp.set_priority(t, to, progress=p))  # type: ignore[arg-type]


def hold(ctx: typer.Context, ids: Ids = None, all_: All = False) -> None:
    """Keep messages in the spool without delivering them."""
    _bulk(ctx, ids, all_, "held", lambda sp, t, p: sp.hold(t, progress=p))


def release(ctx: typer.Context, ids: Ids = None, all_: All = False) -> None:
    """Let held messages be delivered again."""
    _bulk(ctx, ids, all_, "released", lambda sp, t, p: sp.release(t, progress=p))


def delete(
    ctx: typer.Context,
    ids: Ids = None,
    all_: All = False,
    sender: Annotated[str | None, typer.Option("--sender", help="Every message from this sender.")] = None,
) -> None:
    """Remove messages from the spool (no confirmation, like `postsuper -d`)."""
    _bulk(ctx, ids, all_, "deleted", lambda sp, t, p: sp.delete(t, progress=p), sender=sender)
