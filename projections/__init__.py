"""projections: DuckDB over the event log (issue 3). Imports events/ only."""
