"""`spool serve`, `spool services ...` and `spool users ...`."""

from typing import Annotated

import typer

from cli import output
from cli.context import errors_to_exit, open_spool, state
from spoolfs.config import Overrides
from spoolfs.serve.control import list_services, set_service
from spoolfs.users import Users

services_app = typer.Typer(help="The server's services: list, start, stop.", no_args_is_help=True)
users_app = typer.Typer(help="Local users (mailboxes in local domains).", no_args_is_help=True)


@errors_to_exit
def serve(
    ctx: typer.Context,
    smtp: Annotated[str | None, typer.Option("--smtp", help="Listen on HOST:PORT.")] = None,
    local_domain: Annotated[
        list[str] | None, typer.Option("--local-domain", help="A local domain (repeatable).")
    ] = None,
    mynetworks: Annotated[
        list[str] | None, typer.Option("--mynetworks", help="A trusted network, CIDR (repeatable).")
    ] = None,
    relayhost: Annotated[str | None, typer.Option("--relayhost", help="Send all mail to HOST:PORT.")] = None,
    dns: Annotated[str | None, typer.Option("--dns", help="DNS resolver HOST:PORT for MX lookups.")] = None,
) -> None:
    """Run the mail server: SMTP in, delivery out (until SIGTERM or Ctrl-C)."""
    from spoolfs.serve.supervisor import Supervisor

    st = state(ctx)
    overrides = Overrides(
        smtp=smtp,
        local_domains=local_domain or [],
        mynetworks=mynetworks or [],
        relayhost=relayhost,
        dns=dns,
    )
    code = Supervisor(st.config_path, st.data_dir, overrides).run()
    raise typer.Exit(code)


@services_app.command("list")
@errors_to_exit
def services_list(
    ctx: typer.Context, json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False
) -> None:
    """Each service, Active or Inactive, and what it does."""
    rows = list_services(state(ctx).config.data_path)
    if json:
        for r in rows:
            output.json_line(r)
        return
    output.table(
        ["SERVICE", "STATE", "DESCRIPTION"],
        [(r.name, "Active" if r.active else "Inactive", r.description) for r in rows],
    )


def _set(ctx: typer.Context, name: str, active: bool) -> None:
    with open_spool(ctx) as spool:
        set_service(spool.layout.data, spool.log, name, active=active, actor=spool.actor)
    typer.echo(f"{name}: {'start' if active else 'stop'} requested")


@services_app.command("start")
@errors_to_exit
def services_start(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Service name.")]) -> None:
    """Start a service (a running `spool serve` acts within a second)."""
    _set(ctx, name, True)


@services_app.command("stop")
@errors_to_exit
def services_stop(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Service name.")]) -> None:
    """Stop a service (a running `spool serve` acts within a second)."""
    _set(ctx, name, False)


def _users(ctx: typer.Context) -> Users:
    config = state(ctx).config
    return Users(config.data_path, config.smtp.local_domains)


@users_app.command("add")
@errors_to_exit
def users_add(ctx: typer.Context, address: Annotated[str, typer.Argument(metavar="USER@DOMAIN")]) -> None:
    """Create a local user (mail to it is delivered here if its domain is local)."""
    users = _users(ctx)
    with open_spool(ctx) as spool:
        done = users.add(spool.log, address, spool.actor)
    typer.echo(f"added {done}")
    if not users.is_local(done):
        domain = done.split("@", 1)[1]
        typer.echo(
            f"note: {domain} is not in smtp.local_domains of this config; mail to it is delivered "
            f"locally only by a server run with --local-domain {domain}",
            err=True,
        )


@users_app.command("delete")
@errors_to_exit
def users_delete(ctx: typer.Context, address: Annotated[str, typer.Argument(metavar="USER@DOMAIN")]) -> None:
    """Delete a local user (the Maildir stays on disk)."""
    with open_spool(ctx) as spool:
        done = _users(ctx).delete(spool.log, address, spool.actor)
    typer.echo(f"deleted {done}")


@users_app.command("list")
@errors_to_exit
def users_list(
    ctx: typer.Context, json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False
) -> None:
    """Every local user."""
    for address in _users(ctx).list():
        if json:
            output.json_line({"address": address})
        else:
            typer.echo(address)
