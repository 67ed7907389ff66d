"""cli: the `spool` command, thin over spoolfs/, projections/ and events/.

The modules here do not use `from __future__ import annotations`: typer
reads the annotations of every command at each start, and evaluating them
from strings costs every `spool` command 11 ms of its ~260.
"""
