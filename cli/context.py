"""What every command shares: the loaded config, the open spool, error handling.

Failure rules: a SpoolError raised by a command becomes `spool: MESSAGE` on
stderr and its exit code (1, or 2 for configuration); no traceback. An
OSError that escaped translation is reported the same way, never as a trace.
"""

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer

from events.errors import SpoolError
from spoolfs.config import Config, load_config
from spoolfs.spool import Spool

F = TypeVar("F", bound=Callable[..., Any])


class State:
    def __init__(self, config_path: str | None, data_dir: str | None) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path, data_dir=self.data_dir)
        return self._config


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State(None, None)
    return root.obj


@contextmanager
def open_spool(ctx: typer.Context) -> Iterator[Spool]:
    spool = Spool.open(state(ctx).config)
    try:
        yield spool
    finally:
        spool.close()


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"spool: {message}", err=True)
    return typer.Exit(code)


def errors_to_exit(func: F) -> F:
    """Turn our errors into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpoolError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:  # should have been translated; still no traceback
            raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except BrokenPipeError:  # `spool list | head`
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]
