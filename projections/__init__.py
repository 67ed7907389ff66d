"""projections: DuckDB over the event log (issue 3). Imports events/ only.

`Projections.open(data_dir, event_dirs)` is the one entry point; see
`projections.core` for the rules and docs/SQL.md for the tables and views.
"""

from projections.core import CatchUpResult, Projections, Status
from projections.errors import LogBroken, ProjectionBusy, ProjectionError, QueryRefused
from projections.report import LIST_COLUMNS, Sort
from projections.sources import Watermark

__all__ = [
    "LIST_COLUMNS",
    "CatchUpResult",
    "LogBroken",
    "ProjectionBusy",
    "ProjectionError",
    "Projections",
    "QueryRefused",
    "Sort",
    "Status",
    "Watermark",
]
