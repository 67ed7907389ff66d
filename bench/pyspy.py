"""Profile one process with py-spy during a benchmark run, and summarise the result.

`record(pid, path)` runs `py-spy record --pid PID --format raw -o PATH` in
the background. Mode "gil" (the default, `--gil`) keeps only the samples of
the thread holding the GIL, i.e. where the process spends Python CPU time
(on this VM py-spy cannot tell an idle thread from a busy one, so without
`--gil` the 64 idle executor threads swamp the profile); mode "wall"
(`--idle`) samples every thread, waiting or not. On leaving the block
py-spy gets SIGINT, which makes it write the file, with a bounded wait.

`summarize(path)` reads the raw (collapsed-stack) file and returns the top
functions by self time (the function at the top of the stack) and by total
time (anywhere on the stack), with the hottest line of each.

    .venv/bin/python -m bench.pyspy FILE [--top 25]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

PY_SPY = str(Path(sys.executable).parent / "py-spy")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*):(?P<line>\d+)\)$")


@contextlib.contextmanager
def record(pid: int, path: Path, *, mode: str = "gil", rate: int = 100) -> Iterator[subprocess.Popen[bytes]]:
    """mode "gil": only the thread holding the GIL (Python's CPU time); "wall": every thread, idle ones too."""
    args = [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "-o", str(path), "--rate", str(rate)]
    args.append("--gil" if mode == "gil" else "--idle")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _frame(text: str) -> tuple[str, str]:
    """('func (file)', 'file:line') of one collapsed frame."""
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    return f"{m['func']} ({m['file']})", f"{m['file']}:{m['line']}"


def summarize(path: Path, top: int = 25) -> str:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    lines: dict[str, Counter[str]] = {}
    samples = 0
    for raw in Path(path).read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        func, where = frames[-1]
        self_time[func] += count
        lines.setdefault(func, Counter())[where] += count
        for f in {f for f, _ in frames}:
            total_time[f] += count
    if not samples:
        return f"{path}: no samples"
    out = [f"{path}: {samples} samples"]
    out.append(f"\ntop {top} by self time (% of samples, hottest line)")
    for func, n in self_time.most_common(top):
        hot = lines[func].most_common(1)[0][0]
        out.append(f"  {100 * n / samples:5.1f}%  {func}  [{hot}]")
    out.append(f"\ntop {top} by total time (% of samples on the stack)")
    for func, n in total_time.most_common(top):
        out.append(f"  {100 * n / samples:5.1f}%  {func}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Summarise a py-spy raw (collapsed) profile.")
    p.add_argument("file")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(summarize(Path(args.file), args.top))


if __name__ == "__main__":
    main()
