"""Set-up shared by every test module."""

import freezegun

# The CLI imports projections (and DuckDB) only in the commands that need
# them. Imported for the first time inside a test that freezes time, the
# module would build its msgspec types from freezegun's fake datetime class:
# import it now, before any test runs.
import projections  # noqa: F401

# typer compares each parameter's annotation with the `datetime` class it
# imported. While a test freezes time, freezegun would swap typer's for its
# fake class, and the real `datetime` annotations of the CLI (`--since`,
# `--until`) would no longer match it: leave typer's modules alone.
freezegun.configure(extend_ignore_list=["typer"])
