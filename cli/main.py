"""The `spool` command: the spool's verbs at the top, other nouns as sub-apps."""

from typing import Annotated

import typer

from cli import events_cmds, quarantine_cmds, report_cmds, serve_cmds, spool_cmds
from cli.context import State, errors_to_exit, open_spool
from cli.output import json_line
from spoolfs.fsck import fsck as run_fsck

app = typer.Typer(
    name="spool",
    help="spoolfs: a mail spool in plain files, where every action is an event.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        str | None, typer.Option("--config", envvar="SPOOL_CONFIG", help="TOML config file.")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option("--data-dir", envvar="SPOOL_DATA_DIR", help="Data directory (overrides the config)."),
    ] = None,
) -> None:
    ctx.obj = State(config, data_dir)


spool_cmds.register(app)
app.command("list")(report_cmds.list_)
app.command()(report_cmds.summary)
app.command()(report_cmds.sql)
app.add_typer(events_cmds.app, name="events")
events_cmds.app.command("export")(report_cmds.export)
app.add_typer(report_cmds.projections_app, name="projections")
app.command()(serve_cmds.serve)
app.add_typer(serve_cmds.services_app, name="services")
app.add_typer(serve_cmds.users_app, name="users")
app.add_typer(quarantine_cmds.app, name="quarantine")


@app.command()
@errors_to_exit
def fsck(
    ctx: typer.Context,
    repair: Annotated[
        bool, typer.Option("--repair", help="Mend what is found (each repair is an event).")
    ] = False,
    tmp_age: Annotated[
        float, typer.Option("--tmp-age", min=0, help="Leave spool/tmp/ files younger than this (seconds).")
    ] = 60.0,
    json: Annotated[bool, typer.Option("--json", help="Problems as JSON Lines.")] = False,
) -> None:
    """Compare the sidecars with the log; exit 1 if anything is left unrepaired."""
    with open_spool(ctx) as spool:
        report = run_fsck(spool, repair=repair, tmp_age=tmp_age)
    for p in report.problems:
        if json:
            json_line(p)
        else:
            typer.echo(f"{p.kind:18} {p.id}  {p.detail}{'  [repaired]' if p.repaired else ''}")
    left = sum(1 for p in report.problems if not p.repaired)
    if not json:
        typer.echo(
            f"fsck: {report.messages} messages, log at seq {report.last_seq}, "
            f"{len(report.problems)} problems, {len(report.problems) - left} repaired"
        )
    if left:
        raise typer.Exit(1)


@app.command()
@errors_to_exit
def demo(ctx: typer.Context) -> None:
    """Enqueue sample messages and show the spool (until `spool serve` exists)."""
    samples = [
        ("alice@example.org", ["bob@example.net"], "normal", "Lunch?"),
        ("billing@example.org", ["carol@example.com", "dave@example.com"], "high", "Invoice 42"),
        ("", ["postmaster@example.org"], "low", "Delivery report"),
    ]
    with open_spool(ctx) as spool:
        typer.echo(f"data directory: {spool.layout.data}")
        for sender, rcpts, prio, subject in samples:
            raw = f"From: {sender or 'MAILER-DAEMON'}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
            s = spool.enqueue(raw.encode(), sender, rcpts, priority=prio)  # type: ignore[arg-type]
            typer.echo(f"enqueued {s.id}  {subject}")
    typer.echo("")
    report_cmds.list_(ctx)
    typer.echo("")
    events_cmds.tail(ctx, n=5)


def main() -> None:
    app(prog_name="spool")


if __name__ == "__main__":
    main()
