"""Shared helpers of the benchmark scripts: timing, medians, result lines, temp dirs.

Benchmarks print figures and assert nothing about time. Each script runs its
variants interleaved, run by run (A, B, A, B, ...), so the noise of the
machine falls on all of them alike, and reports the median of each variant,
the per-run range and the ratios of the medians. Every loop is bounded in
count and in time; every file lives in a temporary directory that is
removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE = "/tmp"
START_TIMEOUT = 60.0  # seconds the worker threads may take to reach the start line

clock = time.perf_counter


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def fmt(value: float) -> str:
    """A rate or count with thousands separators."""
    return f"{value:,.0f}"


def out(line: str = "") -> None:
    print(line, flush=True)


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def positive_int(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def parser(
    description: str,
    *,
    runs: int = 5,
    max_seconds: float = 20.0,
    max_seconds_help: str = "time bound of one run of one variant",
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=positive_int, default=runs, help=f"runs of each variant (default {runs})")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object")
    p.add_argument(
        "--dir",
        default=None,
        help=f"where the temporary directories go; must be a local disk (default {DEFAULT_BASE})",
    )
    p.add_argument(
        "--max-seconds",
        type=positive_float,
        default=max_seconds,
        help=f"{max_seconds_help} (default {max_seconds:g}); a run cut short says so",
    )
    return p


@contextlib.contextmanager
def temp_dir(base: str | None, prefix: str) -> Iterator[Path]:
    """A fresh directory under `base` (default /tmp), removed with everything in it afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base or DEFAULT_BASE))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_threads(count: int, work: Callable[[int, float], int], max_seconds: float) -> tuple[float, int]:
    """Run `work(index, deadline)` in `count` threads started together.

    Each call returns how many operations it completed and must stop starting
    new ones once `clock()` passes `deadline`. Returns (elapsed seconds from
    the common start to the last thread's end, total operations completed).
    The first exception of any thread is raised after all have ended.
    """
    barrier = threading.Barrier(count + 1)
    done = [0] * count
    errors: list[BaseException] = []
    deadline = [0.0]

    def body(index: int) -> None:
        try:
            barrier.wait(timeout=START_TIMEOUT)
            done[index] = work(index, deadline[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"bench-{i}", daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline[0] = clock() + max_seconds
    barrier.wait(timeout=START_TIMEOUT)
    start = clock()
    for t in threads:
        # work stops starting operations at the deadline; allow for those in flight
        t.join(timeout=max_seconds + START_TIMEOUT)
    elapsed = clock() - start
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a benchmark thread did not finish in time")
    if errors:
        raise errors[0]
    return elapsed, sum(done)


@dataclass
class Variant:
    key: str
    label: str
    rates: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    cut_short: int = 0

    @property
    def median(self) -> float:
        return median(self.rates)


@dataclass
class Bench:
    """Collects the runs of each variant, prints them, then the medians, ratios and a summary."""

    name: str
    unit: str
    params: dict[str, Any]
    variants: dict[str, Variant] = field(default_factory=dict)

    def variant(self, key: str, label: str) -> None:
        self.variants[key] = Variant(key, label)

    def header(self, text: str) -> None:
        out(f"{self.name}: {text}")
        out("parameters: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        out()

    def record(
        self,
        key: str,
        run: int,
        runs: int,
        count: int,
        seconds: float,
        detail: str = "",
        cut_short: bool = False,
    ) -> float:
        """Record one run of one variant and print its line; return its rate."""
        v = self.variants[key]
        r = rate(count, seconds)
        v.rates.append(r)
        v.details.append(detail)
        v.cut_short += cut_short
        note = f", {detail}" if detail else ""
        bound = "  [cut short by --max-seconds]" if cut_short else ""
        out(
            f"run {run}/{runs}  {key}  {v.label:<34} {fmt(r):>12} {self.unit}"
            f"  ({fmt(count)} in {seconds:.3f} s{note}){bound}"
        )
        return r

    def table(self) -> None:
        out()
        out(f"{'variant':<38} {'median':>12} {'min':>12} {'max':>12}  runs   ({self.unit})")
        for v in self.variants.values():
            if not v.rates:
                continue
            cut = f"  ({v.cut_short} cut short)" if v.cut_short else ""
            out(
                f"{v.key}  {v.label:<35} {fmt(v.median):>12} {fmt(min(v.rates)):>12}"
                f" {fmt(max(v.rates)):>12}  {len(v.rates):>4}{cut}"
            )

    def ratio(self, num: str, den: str) -> float:
        a, b = self.variants[num].median, self.variants[den].median
        return a / b if b else float("nan")

    def finish(
        self,
        *,
        ratios: list[tuple[str, str]],
        target_key: str,
        target: float,
        as_json: bool,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Print the table, the ratios, the target verdict, the JSON object if asked, the summary."""
        self.table()
        ratio_values = {f"{a}/{b}": self.ratio(a, b) for a, b in ratios}
        if ratio_values:
            out("ratios of medians: " + ", ".join(f"{k} = {v:.2f}x" for k, v in ratio_values.items()))
        got = self.variants[target_key].median
        met = got >= target
        verdict = "MET" if met else f"NOT MET ({got / target:.2f}x of target)"
        out(f"target: {target_key} >= {fmt(target)} {self.unit}: median {fmt(got)}: {verdict}")
        if as_json:
            obj = {
                "benchmark": self.name,
                "unit": self.unit,
                "params": self.params,
                "variants": {
                    v.key: {
                        "label": v.label,
                        "runs": [round(r, 1) for r in v.rates],
                        "details": v.details,
                        "median": round(v.median, 1),
                        "min": round(min(v.rates), 1) if v.rates else None,
                        "max": round(max(v.rates), 1) if v.rates else None,
                        "cut_short": v.cut_short,
                    }
                    for v in self.variants.values()
                },
                "ratios": {k: round(v, 3) for k, v in ratio_values.items()},
                "target": {"variant": target_key, "min": target, "met": met},
                **(extra or {}),
            }
            out(json.dumps(obj, sort_keys=False))
        parts = [f"{v.key} {v.label} {fmt(v.median)}" for v in self.variants.values() if v.rates]
        ratio_text = "".join(f"; {k} {v:.2f}x" for k, v in ratio_values.items())
        out(
            f"SUMMARY {self.name}: "
            + "; ".join(parts)
            + f" {self.unit} (medians of {max(len(v.rates) for v in self.variants.values())} runs)"
            + ratio_text
            + f"; target {target_key} >= {fmt(target)}: {'met' if met else 'NOT met'}"
        )
