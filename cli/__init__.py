"""cli: the `spool` command, thin over spoolfs/, projections/ and events/."""
