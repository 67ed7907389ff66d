"""Printing: tables for people, JSON Lines for scripts."""

import datetime as dt
import sys
from collections.abc import Iterable, Sequence

import msgspec
import typer

from events.schema import enc_hook

_encoder = msgspec.json.Encoder(enc_hook=enc_hook)


def json_line(obj: object) -> None:
    sys.stdout.buffer.write(_encoder.encode(obj) + b"\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    typer.echo(fmt(headers))
    for r in rows:
        typer.echo(fmt(r))


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(delta: dt.timedelta) -> str:
    """Compact like `ls`/`qshape` readers expect: 45s, 12m, 3h, 2d."""
    secs = int(delta.total_seconds())
    if secs < 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"
