"""`spool events ...`: read, verify and replay the log."""

import sys
import time
from typing import Annotated

import msgspec
import typer

from cli import output
from cli.context import errors_to_exit, state
from events import EVENT_TYPES, EventLog, follow, last_records, read_records, verify
from events.errors import ChainBroken
from events.schema import Record, encode_record
from spoolfs.layout import Layout
from spoolfs.state import replay

app = typer.Typer(help="The event log: tail, verify, replay.", no_args_is_help=True)


def _events_dir(ctx: typer.Context) -> Layout:
    config = state(ctx).config
    return Layout(config.data_path, config.subspools)


def _text(record: Record) -> str:
    fields = msgspec.to_builtins(record.payload)
    fields.pop("type", None)
    detail = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", [], None))
    return f"{record.seq:>8}  {output.when(record.at)}  {record.actor:<14} {record.type:<18} {detail}"


@app.command()
@errors_to_exit
def tail(
    ctx: typer.Context,
    n: Annotated[int, typer.Option("-n", min=0, help="How many of the last events.")] = 20,
    follow_: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new events.")] = False,
    type_: Annotated[
        list[str] | None, typer.Option("--type", help="Only this event type (repeatable).")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="The records as JSON Lines.")] = False,
) -> None:
    """The last events of the log."""
    for t in type_ or []:
        if t not in EVENT_TYPES:
            raise typer.BadParameter(f"unknown event type {t!r}; known: {', '.join(EVENT_TYPES)}")
    wanted = set(type_ or [])
    directory = _events_dir(ctx).events

    def show(record: Record) -> None:
        if wanted and record.type not in wanted:
            return
        if json:
            sys.stdout.buffer.write(encode_record(record) + b"\n")
            sys.stdout.flush()
        else:
            typer.echo(_text(record))

    if wanted:
        matching = [r for r in read_records(directory, types=wanted)][-n:] if n else []
    else:
        matching = last_records(directory, n) if n else []
    for record in matching:
        show(record)
    if follow_:
        last = last_records(directory, 1)
        try:
            for record in follow(directory, from_seq=last[0].seq + 1 if last else 1):
                show(record)
        except KeyboardInterrupt:
            return


@app.command("verify")
@errors_to_exit
def verify_(ctx: typer.Context) -> None:
    """Check the hash chain and seq order; exit 1 naming the first bad record."""
    lay = _events_dir(ctx)
    started = time.perf_counter()
    try:
        result = verify(lay.events)
        if result.torn_tail_bytes:
            config = state(ctx).config
            with EventLog(lay.events, node=config.node) as log:
                repaired = log.repair()
            if repaired is not None:
                payload = repaired.payload
                typer.echo(
                    f"repaired: torn tail of {payload.torn_bytes} bytes after seq {payload.after_seq} "  # type: ignore[union-attr]
                    f"kept in {payload.kept_in}"  # type: ignore[union-attr]
                )
            result = verify(lay.events)
    except ChainBroken as exc:
        typer.echo(f"spool: chain broken: {exc}", err=True)
        raise typer.Exit(1) from None
    took = time.perf_counter() - started
    typer.echo(
        f"ok: {result.count} events in {result.segments} segments, head seq {result.head_seq}, "
        f"head sha256 {result.head_hash} ({took:.2f} s)"
    )


@app.command("replay")
@errors_to_exit
def replay_(
    ctx: typer.Context,
    until: Annotated[int | None, typer.Option("--until", min=0, help="Stop after this seq.")] = None,
) -> None:
    """The spool as the log tells it (one JSON object a message)."""
    lay = _events_dir(ctx)
    result = replay(read_records(lay.events, to_seq=until))
    for mid in sorted(result.states):
        output.json_line(result.states[mid])
