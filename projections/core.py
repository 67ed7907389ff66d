"""`Projections`: the one entry point: open, catch up, rebuild, status, query.

`DATA/projections.duckdb` is derived data. Opened for writing, a missing,
unreadable or other-version file is rebuilt from the logs; a log that is no
longer among those given makes the projections start again from nothing.
Each catch-up is one transaction: the new records, the state they produce
and the new watermarks are committed together, or not at all (a crash or a
SIGKILL mid-way leaves the previous state; the next catch-up redoes it).
A small catch-up (under SMALL_CATCH_UP bytes of log) runs on one DuckDB
thread and folds record by record (`projections.small`); a larger one, and
every rebuild, folds set-based (`projections.reduce`). Both give the same rows.

Failure rules: a writer that cannot get the lock within `wait` seconds, or a
reader that cannot open the file, raises ProjectionBusy; a gap or a broken
chain raises LogBroken (run `spool events verify`) and nothing is applied;
every duckdb.Error/OSError is translated into a ProjectionError (cause
chained). Reading methods work read-only; changing ones need a writer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from events import clock
from projections import schema
from projections import small as small_fold
from projections.derived import SCRATCH_PREFIX, open_writable, remove_scratch
from projections.errors import ProjectionError, from_duckdb, from_os
from projections.load import load
from projections.reduce import fold
from projections.report import Sort, export_parquet, list_spool, run_query, shape
from projections.sources import Chunk, Watermark, expand, head_seq, plan
from projections.store import DB_NAME, WriterLock, close_quietly, connect, remove

Progress = Callable[[int], None] | None
# bytes of log: below this, a catch-up runs on one thread and folds record by record
# (projections.small); above it, planning the set-based fold (projections.reduce) pays off
SMALL_CATCH_UP = 4 << 20


@dataclass(frozen=True)
class CatchUpResult:
    events: int  # records applied
    bytes: int  # bytes of log read
    seconds: float
    watermarks: list[Watermark]
    rebuilt: str = ""  # why the file was started afresh, if it was


@dataclass(frozen=True)
class Status:
    watermarks: list[Watermark]
    lag_events: int  # records in the logs not yet applied
    file_size: int  # bytes of projections.duckdb (and its WAL)


class Projections:
    def __init__(
        self,
        data_dir: Path,
        logs: list[Path],
        con: duckdb.DuckDBPyConnection,
        lock: WriterLock | None,
        rebuilt: str,
    ) -> None:
        self.data_dir = data_dir
        self.logs = logs
        self.path = data_dir / DB_NAME
        self._con: duckdb.DuckDBPyConnection | None = con
        self._lock = lock
        self._rebuilt = rebuilt
        self._reference_fold = False  # rebuild: always the set-based fold of projections.reduce

    # --- opening and closing ----------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        event_dirs: Sequence[Path | str] | None = None,
        *,
        read_only: bool = False,
        wait: float = 5.0,
    ) -> Projections:
        """Open the projections of `data_dir` over `event_dirs` (default: DATA/events).

        `event_dirs` entries may be globs; each matching directory is one
        node's log. A writer (read_only=False) holds the writer lock until
        `close`; a reader never changes the file and waits up to `wait`
        seconds for a writer to let go of it.
        """
        data_dir = Path(data_dir)
        explicit = event_dirs is not None
        logs = expand(
            list(event_dirs) if event_dirs is not None else [data_dir / "events"], must_exist=explicit
        )
        path = data_dir / DB_NAME
        if read_only:
            if not path.exists():
                raise ProjectionError(f"no projections in {data_dir} yet: they are built on first update")
            con = connect(path, read_only=True, wait=wait)
            version = _guard(lambda: schema.stored(con, "schema_version"), "cannot read projections")
            if version != schema.SCHEMA_VERSION:
                close_quietly(con)
                raise ProjectionError(
                    f"projections in {data_dir} are from another version (schema {version}); update them first"
                )
            return cls(data_dir, logs, con, None, "")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise from_os(exc, f"cannot create {data_dir}") from exc
        lock = WriterLock(data_dir)
        lock.acquire(wait)
        try:
            remove_scratch(data_dir)
            con, rebuilt = open_writable(path, wait)
        except BaseException:
            lock.release()
            raise
        return cls(data_dir, logs, con, lock, rebuilt)

    def close(self) -> None:
        close_quietly(self._con)
        self._con = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Projections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        return self._lock is None

    # --- updating -----------------------------------------------------------------

    def catch_up(self, progress: Progress = None) -> CatchUpResult:
        """Apply what the logs hold past the watermarks; `progress(n)` gets bytes read."""
        con = self._writer()
        started = time.perf_counter()
        marks = self._marks()
        rebuilt, self._rebuilt = self._rebuilt, ""
        gone = sorted(set(marks) - {str(p) for p in self.logs})
        if gone:
            self._reset()
            con, marks = self._writer(), {}
            rebuilt = rebuilt or f"log {gone[0]} is no longer read"
        try:
            scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self.data_dir))
        except OSError as exc:
            raise from_os(exc, f"cannot create a scratch directory in {self.data_dir}") from exc
        try:
            planned: list[tuple[int, Chunk]] = []
            next_id = max((log_id for log_id, _ in marks.values()), default=0) + 1
            for log in self.logs:
                log_id, mark = marks.get(str(log), (next_id, None))
                if mark is None:
                    next_id += 1
                chunks = plan(log, mark, scratch)
                planned += [(log_id, c) for c in chunks]
            now_marks = {path: mark for path, (_, mark) in marks.items()}
            if not planned:
                return CatchUpResult(0, 0, time.perf_counter() - started, _sorted(now_marks), rebuilt)
            count = self._apply(con, planned, progress, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for _, c in planned:
            now_marks[c.log] = Watermark(c.log, c.last_node, c.last_seq, c.segment, c.end, c.last_hash)
        return CatchUpResult(
            count,
            sum(c.end - c.start for _, c in planned),
            time.perf_counter() - started,
            _sorted(now_marks),
            rebuilt,
        )

    def rebuild(self, progress: Progress = None) -> CatchUpResult:
        """Start again from nothing and read every log from its first record."""
        self._writer()
        self._reset()
        self._reference_fold = True
        try:
            result = self.catch_up(progress)
        finally:
            self._reference_fold = False
        return CatchUpResult(result.events, result.bytes, result.seconds, result.watermarks, "asked for")

    def _apply(
        self,
        con: duckdb.DuckDBPyConnection,
        planned: list[tuple[int, Chunk]],
        progress: Progress,
        scratch: Path,
    ) -> int:
        last: dict[int, Chunk] = {}
        for log_id, chunk in planned:
            last[log_id] = chunk
        small = sum(c.end - c.start for _, c in planned) < SMALL_CATCH_UP
        try:
            # rows may land in any order (seq says the order): lets DuckDB load and
            # write in parallel, straight to disk, with nothing left for the checkpoint;
            # a small catch-up is quicker on one thread (no hand-offs between workers)
            con.execute(
                "SET preserve_insertion_order = false; "
                + ("SET threads = 1; " if small else "")
                + "BEGIN TRANSACTION"
            )
            try:
                count = load(con, planned, progress)
                records = None if self._reference_fold or not small else small_fold.prepare(con)
                if records is None:
                    fold(con)
                else:
                    small_fold.fold(con, *records, scratch)
                for log_id, c in last.items():
                    con.execute("DELETE FROM logs WHERE log_id = ?", [log_id])
                    con.execute(
                        "INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [log_id, c.log, c.last_node, c.last_seq, c.segment, c.end, c.last_hash],
                    )
                con.execute("COMMIT; RESET preserve_insertion_order" + ("; RESET threads" if small else ""))
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                with contextlib.suppress(duckdb.Error):
                    con.execute("RESET preserve_insertion_order" + ("; RESET threads" if small else ""))
                raise
        except duckdb.Error as exc:
            raise from_duckdb(exc, "cannot update projections") from exc
        return count

    def _reset(self) -> None:
        close_quietly(self._con)
        self._con = None
        remove(self.path)
        self._con, _ = open_writable(self.path, 0.0)

    # --- reading ------------------------------------------------------------------

    def status(self) -> Status:
        marks = self._watermarks()
        seen = {m.path: m.seq for m in marks}
        lag = 0
        for log in self.logs:
            lag += max(0, head_seq(log) - seen.get(str(log), 0))
        size = 0
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            with contextlib.suppress(OSError):
                size += os.stat(p).st_size
        return Status(marks, lag, size)

    def query(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        now: dt.datetime | None = None,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one read-only statement (SELECT or EXPLAIN) over the tables and views."""
        return run_query(self._reader(now), sql, params)

    def list_spool(
        self,
        *,
        waiting: bool = False,
        held: bool = False,
        sender: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        sort: Sort = "id",
        limit: int = 0,
        now: dt.datetime | None = None,
        claimed: Collection[str] = (),
    ) -> list[dict[str, object]]:
        """The messages in the spool, as `spool list --json` rows (oldest first by default).

        `claimed`: the IDs being delivered now (their status reads "delivering")."""
        rows = self._list(False, waiting, held, sender, domain, older_than, sort, limit, now, claimed)
        assert isinstance(rows, list)
        return rows

    def list_spool_lines(
        self,
        *,
        waiting: bool = False,
        held: bool = False,
        sender: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        sort: Sort = "id",
        limit: int = 0,
        now: dt.datetime | None = None,
        claimed: Collection[str] = (),
    ) -> str:
        """The same rows as `list_spool`, as JSON Lines text made by DuckDB (one line a row)."""
        text = self._list(True, waiting, held, sender, domain, older_than, sort, limit, now, claimed)
        assert isinstance(text, str)
        return text

    def _list(
        self,
        lines: bool,
        waiting: bool,
        held: bool,
        sender: str | None,
        domain: str | None,
        older_than: float | None,
        sort: Sort,
        limit: int,
        now: dt.datetime | None,
        claimed: Collection[str],
    ) -> list[dict[str, object]] | str:
        when = clock.utc(now) if now is not None else clock.now()
        con = self._reader(when)
        return _guard(
            lambda: list_spool(
                con,
                waiting=waiting,
                held=held,
                sender=sender,
                domain=domain,
                older_than=older_than,
                sort=sort,
                limit=limit,
                now=when,
                claimed=claimed,
                lines=lines,
            ),
            "cannot list the spool",
        )

    def summary(self, by: str = "domain", *, now: dt.datetime | None = None) -> list[dict[str, object]]:
        """qshape: by recipient domain ("domain") or sender domain ("sender"), largest first."""
        con = self._reader(now)
        return _guard(lambda: shape(con, by), "cannot summarise the spool")

    def export_parquet(
        self, out_dir: Path, since: dt.datetime | None = None, until: dt.datetime | None = None
    ) -> dict[str, int]:
        """Write events and attempts as Parquet under out_dir, partitioned by day and node."""
        con = self._reader(None)
        return _guard(lambda: export_parquet(con, Path(out_dir), since, until), "cannot export")

    # --- helpers ------------------------------------------------------------------

    def _writer(self) -> duckdb.DuckDBPyConnection:
        if self._lock is None:
            raise ProjectionError("projections were opened read-only; they cannot be updated")
        if self._con is None:
            raise ProjectionError("projections are closed")
        return self._con

    def _reader(self, now: dt.datetime | None) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise ProjectionError("projections are closed")
        when = clock.utc(now) if now is not None else clock.now()
        con = self._con
        _guard(
            lambda: con.execute("SET VARIABLE report_time = ?::TIMESTAMPTZ", [when.isoformat()]),
            "cannot set the report time",
        )
        return con

    def _marks(self) -> dict[str, tuple[int, Watermark]]:
        con = self._con
        assert con is not None
        rows = _guard(
            lambda: con.execute(
                'SELECT log_id, path, node, seq, segment, "offset", hash FROM logs'
            ).fetchall(),
            "cannot read the watermarks",
        )
        return {r[1]: (r[0], Watermark(r[1], r[2], r[3], r[4], r[5], r[6])) for r in rows}

    def _watermarks(self) -> list[Watermark]:
        return _sorted({path: mark for path, (_, mark) in self._marks().items()})


def _sorted(marks: dict[str, Watermark]) -> list[Watermark]:
    return [marks[path] for path in sorted(marks)]


def _guard(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except duckdb.Error as exc:
        raise from_duckdb(exc, what) from exc
