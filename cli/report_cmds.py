"""Reports from the DuckDB projections: `spool list`, `summary`, `sql`,
`events export`, `projections rebuild|status`.

Each command first brings the projections up to date with the log (a
progress bar when that is long), unless another process is doing it right
now: then it reads what is there (read-only) rather than wait.
"""

import csv
import datetime as dt
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import output
from cli.context import errors_to_exit, fail, state
from events import clock
from events.errors import SpoolError
from spoolfs.addresses import normalize_sender
from spoolfs.claim import claimed_in, is_claimed
from spoolfs.layout import Layout

if TYPE_CHECKING:
    # DuckDB takes 20 MB and a tenth of a second to import: only the commands
    # that read the projections pay for it (not `spool serve`, not `spool force`).
    from projections import Projections


def _claimed(layout: Layout) -> set[str]:
    claimed = claimed_in(layout.spool / nn for nn in layout.subspool_names())
    if claimed is not None:
        return claimed
    ids = (p.stem for nn in layout.subspool_names() for p in (layout.spool / nn).glob("*.eml"))
    return {mid for mid in ids if is_claimed(layout.eml(mid))}


projections_app = typer.Typer(
    help="The DuckDB projections of the log: rebuild, status.", no_args_is_help=True
)
SORTS = ("id", "age", "next-attempt", "size", "priority")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

EventsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--events", help="A node's event log directory or a glob (repeatable); default DATA/events."
    ),
]


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise SpoolError(f"not a duration: {text!r} (like 90s, 10m, 2h, 3d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _log_bytes(dirs: list[Path]) -> int:
    return sum(p.stat().st_size for d in dirs for p in d.glob("*.jsonl"))


@contextmanager
def opened(
    ctx: typer.Context, events: list[str] | None = None, *, rebuild: bool = False
) -> "Iterator[Projections]":
    """The projections, caught up with the log (or read as they are if another process is updating)."""
    from projections import ProjectionBusy, Projections

    config = state(ctx).config
    data = config.data_path
    Layout(data, config.subspools).create()  # the same checks as every spool command
    try:
        proj = Projections.open(data, events, wait=0.5)
    except ProjectionBusy:
        proj = Projections.open(data, events, read_only=True, wait=10.0)
    try:
        if not proj.read_only:
            total = _log_bytes(proj.logs)
            work = proj.rebuild if rebuild else proj.catch_up
            if sys.stderr.isatty() and total > 50 << 20:
                with typer.progressbar(length=total, label="reading the log", file=sys.stderr) as bar:
                    work(bar.update)
            else:
                work()
        yield proj
    finally:
        proj.close()


@errors_to_exit
def list_(
    ctx: typer.Context,
    waiting: Annotated[bool, typer.Option("--waiting", help="Only messages waiting for delivery.")] = False,
    held: Annotated[bool, typer.Option("--held", help="Only held messages.")] = False,
    sender: Annotated[str | None, typer.Option("--sender", help="Only this envelope sender.")] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="Only messages with a recipient in this domain.")
    ] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Only messages older than this (10m, 2h, 3d).")
    ] = None,
    sort: Annotated[str, typer.Option("--sort", help="id, age, next-attempt, size or priority.")] = "id",
    limit: Annotated[int, typer.Option("--limit", min=0, help="At most this many (0: all).")] = 0,
    json: Annotated[bool, typer.Option("--json", help="JSON Lines, full values.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header line.")] = False,
    events: EventsOpt = None,
) -> None:
    """The messages in the spool (from the projections of the log)."""
    if sort not in SORTS:
        raise fail(f"--sort must be one of {', '.join(SORTS)}")
    now = clock.now()
    config = state(ctx).config
    query = {
        "waiting": waiting,
        "held": held,
        "sender": normalize_sender(sender) if sender is not None else None,
        "domain": domain.lower() if domain else None,
        "older_than": parse_duration(older_than) if older_than else None,
        "sort": sort,
        "limit": limit,
        "now": now,
    }
    with opened(ctx, events) as proj:
        # "delivering" is a live fact (a claim), not in the log
        claimed = _claimed(Layout(config.data_path, config.subspools))
        if json:  # JSON Lines made by DuckDB, written as they come
            sys.stdout.write(proj.list_spool_lines(**query, claimed=claimed))  # type: ignore[arg-type]
            return
        rows = proj.list_spool(**query, claimed=claimed)  # type: ignore[arg-type]
    if as_csv:
        writer = csv.writer(sys.stdout)
        if rows:
            writer.writerow(rows[0].keys())
        for row in rows:
            writer.writerow([v.isoformat() if isinstance(v, dt.datetime) else v for v in row.values()])
        return
    output.table(
        ["ID", "NN", "SENDER", "RCPT", "KB", "TRIES", "AGE", "PRIO", "STATUS", "NEXT"],
        [
            (
                str(r["id"]),
                str(r["subspool"]),
                output.short(str(r["sender"]) or "<>", 24),
                f"{r['recipients_delivered']}/{r['recipients_total']}",
                str((int(r["size"]) + 1023) // 1024),  # type: ignore[call-overload]
                str(r["attempts"]),
                output.age(now - r["received_at"]),  # type: ignore[operator]
                str(r["priority"]),
                str(r["status"]),
                output.age(r["next_attempt_at"] - now) if r["next_attempt_at"] > now else "now",  # type: ignore[operator]
            )
            for r in rows
        ],
        right={3, 4, 5, 6},
    )


@errors_to_exit
def summary(
    ctx: typer.Context,
    by: Annotated[str, typer.Option("--by", help="domain (recipient) or sender.")] = "domain",
    json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
    events: EventsOpt = None,
) -> None:
    """Messages by domain and age (minutes), like Postfix's qshape."""
    with opened(ctx, events) as proj:
        rows = proj.summary(by, now=clock.now())
    if json:
        for row in rows:
            output.json_line(row)
        return
    if not rows:
        typer.echo("the spool is empty")
        return
    headers = list(rows[0].keys())
    output.table(headers, [[str(v) for v in r.values()] for r in rows], right=set(range(1, len(headers))))


@errors_to_exit
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One read-only SQL statement over the tables and views.")],
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    events: EventsOpt = None,
) -> None:
    """Run any read-only query over the projections (see docs/SQL.md)."""
    if fmt not in ("table", "csv", "json"):
        raise fail("--format must be table, csv or json")
    with opened(ctx, events) as proj:
        columns, rows = proj.query(query)
    if fmt == "json":
        for row in rows:
            output.json_line(dict(zip(columns, row, strict=True)))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        output.table(columns, [["" if v is None else str(v) for v in row] for row in rows])


@errors_to_exit
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Directory to write Parquet files into.")],
    fmt: Annotated[str, typer.Option("--format", help="parquet (the only one).")] = "parquet",
    since: Annotated[dt.datetime | None, typer.Option("--since", help="From this time (UTC).")] = None,
    until: Annotated[dt.datetime | None, typer.Option("--until", help="Before this time (UTC).")] = None,
    events: EventsOpt = None,
) -> None:
    """Write the log as Parquet, partitioned by day and node."""
    if fmt != "parquet":
        raise fail("--format: only parquet is supported")
    with opened(ctx, events) as proj:
        counts = proj.export_parquet(
            out, clock.utc(since) if since else None, clock.utc(until) if until else None
        )
    for name, count in counts.items():
        typer.echo(f"{name}: {count} rows")


@projections_app.command()
@errors_to_exit
def rebuild(ctx: typer.Context, events: EventsOpt = None) -> None:
    """Rebuild the projections from the whole log."""
    with opened(ctx, events, rebuild=True) as proj:
        st = proj.status()
    typer.echo(f"rebuilt: {sum(w.seq for w in st.watermarks)} events, {st.file_size} bytes")


@projections_app.command()
@errors_to_exit
def status(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
    events: EventsOpt = None,
) -> None:
    """Watermark, lag in events, and file size of the projections."""
    from projections import Projections

    data = state(ctx).config.data_path
    try:
        proj = Projections.open(data, events, read_only=True)
    except SpoolError as exc:
        raise fail(str(exc)) from None
    try:
        st = proj.status()
    finally:
        proj.close()
    if json:
        output.json_line(
            {"lag_events": st.lag_events, "file_size": st.file_size, "watermarks": st.watermarks}
        )
        return
    for w in st.watermarks:
        typer.echo(f"{w.path}: node {w.node}, seq {w.seq}, segment {w.segment} offset {w.offset}")
    typer.echo(f"lag: {st.lag_events} events; file: {st.file_size} bytes")
