"""A throwaway Postfix instance on loopback, the reference the server benchmarks compare with.

`postfix_instance(port=..., relayhost=..., hold=...)` copies Debian's
/etc/postfix/main.cf and master.cf into a fresh temporary directory, points
config_directory, queue_directory and data_directory there, applies the
settings of /work/shared/PEERS.md ("Postfix as a benchmark reference") and
starts it with `postfix -c DIR start`; on leaving, `postfix -c DIR stop`
(the master is killed if it is still there after a bounded wait) and the
directory is removed. The system instance (/etc/postfix, /var/spool/postfix)
is never touched.

Settings over Debian's defaults, nothing else:
  inet_interfaces = loopback-only, inet_protocols = ipv4,
  mynetworks = 127.0.0.0/8, smtpd_relay_restrictions = permit_mynetworks, reject,
  mydestination = (empty: every recipient is relayed), alias_maps = (empty),
  relayhost = [127.0.0.1]:SINKPORT (or none),
  smtpd_data_restrictions = check_client_access static:HOLD (hold=True only),
  maillog_file = DIR/maillog (there is no syslog here);
  master.cf: the `smtp inet` service listens on 127.0.0.1:PORT only, and
  chroot is off for every service (a chroot under a temporary queue directory
  has no /etc/hosts or resolv.conf; Debian's init script, not used here, is
  what copies them in).

Helpers: queue counts by scanning the queue directories (cheaper than
`postqueue -p`), release held mail (`postsuper -H ALL`), flush
(`postqueue -f`), delete everything (`postsuper -d ALL`), the command lines
of `postqueue -j` and `qshape` for this instance, the pids and RSS of the
instance's processes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import clock, temp_dir

SYSTEM_CONFIG = Path("/etc/postfix")
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
COMMAND_TIMEOUT = 300.0


def _run(args: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _count_files(path: Path) -> int:
    """Files under `path`, any depth (deferred/ and hold/ may be hashed into subdirectories)."""
    n = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    n += _count_files(Path(entry.path))
                else:
                    n += 1
    except FileNotFoundError:
        pass
    return n


def proc_children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc (no pgrep needed)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the second field (comm) may hold spaces; the ppid is the second field after the ')'
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process plus the children it has reaped (cutime, cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # after the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / CLOCK_TICKS, (stime + cstime) / CLOCK_TICKS


def proc_name(pid: int) -> str:
    """`worker smtp`, `worker delivery`, ... for spool serve's workers, else the command name."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    if b"spoolfs.serve.worker" in cmd:
        i = cmd.index(b"spoolfs.serve.worker")
        return f"worker {cmd[i + 1].decode()}" if i + 1 < len(cmd) and cmd[i + 1] else "worker"
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


class CpuMeter:
    """CPU seconds used by a process tree between start() and stop(), by process name.

    Processes that exit in between are counted through their parent's
    cutime/cstime once reaped (Postfix's master reaps smtpd, cleanup, ...).
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.before: dict[int, tuple[str, float, float]] = {}
        self.used: dict[str, float] = {}
        self.user = self.system = 0.0

    def _snapshot(self) -> dict[int, tuple[str, float, float]]:
        return {p: (proc_name(p), *cpu_seconds(p)) for p in self.pids()}

    def start(self) -> None:
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        self.user = self.system = 0.0
        for pid, (name, user, system) in self._snapshot().items():
            _, user0, system0 = self.before.get(pid, (name, 0.0, 0.0))
            du, ds = max(0.0, user - user0), max(0.0, system - system0)
            self.user += du
            self.system += ds
            used[name] = used.get(name, 0.0) + du + ds
        self.used = used
        return used

    @property
    def total(self) -> float:
        return sum(self.used.values())

    def text(self, messages: int, top: int = 4) -> str:
        """`CPU 12.3 s (user 8.0, sys 4.3) = 0.62 ms/msg (smtpd 5.1, cleanup 3.0, ...)`."""
        parts = sorted(self.used.items(), key=lambda kv: -kv[1])[:top]
        per = 1000 * self.total / messages if messages else 0.0
        names = ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05)
        return f"CPU {self.total:.1f} s (user {self.user:.1f}, sys {self.system:.1f}) = {per:.2f} ms/msg ({names})"


def rss_kb(pid: int) -> int:
    """VmRSS of one process in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Postfix:
    root: Path
    port: int
    relayhost: str | None
    hold: bool

    @property
    def config(self) -> Path:
        return self.root / "etc"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- set-up ------------------------------------------------------------------

    def _postconf(self, *args: str) -> None:
        _run(["postconf", "-c", str(self.config), *args])

    def configure(self) -> None:
        postfix_user = pwd.getpwnam("postfix")
        self.root.chmod(0o755)  # the postfix user must reach the queue
        self.config.mkdir()
        self.queue.mkdir()
        data = self.root / "data"
        data.mkdir()
        os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
        for name in ("main.cf", "master.cf", "dynamicmaps.cf"):
            if (SYSTEM_CONFIG / name).exists():
                shutil.copy2(SYSTEM_CONFIG / name, self.config / name)
        if (SYSTEM_CONFIG / "dynamicmaps.cf.d").is_dir():
            shutil.copytree(SYSTEM_CONFIG / "dynamicmaps.cf.d", self.config / "dynamicmaps.cf.d")
        settings = {
            "queue_directory": str(self.queue),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.localdomain",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": self.relayhost or "",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
        }
        if self.hold:
            settings["smtpd_data_restrictions"] = "check_client_access static:HOLD"
        self._postconf("-e", *(f"{k}={v}" for k, v in settings.items()))
        # the public SMTP service: only 127.0.0.1:PORT
        self._postconf("-X", "smtp/inet")
        self._postconf("-M", f"{self.address}/inet={self.address} inet n - n - - smtpd")
        self._postconf("-F", "*/*/chroot=n")
        _run(["postfix", "-c", str(self.config), "check"])

    def start(self) -> None:
        _run(["postfix", "-c", str(self.config), "start"], timeout=START_TIMEOUT)
        deadline = clock() + START_TIMEOUT
        while clock() < deadline:
            if self.master_pid() and _port_open(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"Postfix did not start on {self.address}; maillog:\n{self.log_tail()}")

    def stop(self) -> None:
        pid = self.master_pid()
        with contextlib.suppress(Exception):
            _run(["postfix", "-c", str(self.config), "stop"], timeout=STOP_TIMEOUT)
        if pid is None:
            return
        deadline = clock() + STOP_TIMEOUT
        while clock() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):  # the master did not go: end it and what it started
            for p in [pid, *proc_children(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    # --- the queue -----------------------------------------------------------------

    def count(self, queues: tuple[str, ...] = QUEUES) -> int:
        """Messages in the named queue directories (default: all but corrupt/saved)."""
        return sum(_count_files(self.queue / q) for q in queues)

    def held(self) -> int:
        return _count_files(self.queue / "hold")

    def release_held(self) -> None:
        _run(["postsuper", "-c", str(self.config), "-H", "ALL"])

    def flush(self) -> None:
        _run(["postqueue", "-c", str(self.config), "-f"])

    def delete_all(self) -> None:
        _run(["postsuper", "-c", str(self.config), "-d", "ALL"])

    def postqueue_json_args(self) -> list[str]:
        """`postqueue -c DIR -j`: the queue as JSON, one line a message (reads every queue file)."""
        return ["postqueue", "-c", str(self.config), "-j"]

    def qshape_args(self, *queues: str) -> list[str]:
        """`qshape -c DIR QUEUE...`: recipient domains by age, like `spool summary`."""
        return ["qshape", "-c", str(self.config), *queues]

    def sent(self) -> int:
        """Deliveries the maillog reports as `status=sent`."""
        try:
            with open(self.maillog, "rb") as f:
                return sum(1 for line in f if b" status=sent " in line)
        except OSError:
            return 0

    # --- processes -----------------------------------------------------------------

    def master_pid(self) -> int | None:
        try:
            text = (self.queue / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        pid = int(text) if text.isdigit() else None
        return pid if pid and _alive(pid) else None

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return [] if pid is None else [pid, *proc_children(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def postfix_instance(
    *, port: int, relayhost: str | None = None, hold: bool = False, base: str | None = None
) -> Iterator[Postfix]:
    """A started Postfix on 127.0.0.1:`port`; stopped and removed afterwards.

    `relayhost` is HOST:PORT, written as `[HOST]:PORT` (no MX lookup).
    """
    with temp_dir(base, "bench-postfix-") as root:
        relay = None
        if relayhost:
            host, _, rport = relayhost.rpartition(":")
            relay = f"[{host}]:{rport}"
        pf = Postfix(root, port, relay, hold)
        pf.configure()
        try:
            pf.start()
            yield pf
        finally:
            pf.stop()


# --- Postfix's test tools: smtp-sink and smtp-source ---------------------------------


@contextlib.contextmanager
def smtp_sink(port: int, backlog: int = 256) -> Iterator[subprocess.Popen[bytes]]:
    """`smtp-sink -u nobody 127.0.0.1:PORT BACKLOG`: answers 250 to everything, keeps nothing.

    No `-M N` (it exits before answering the last message) and no `-c`
    (a counter line per message); deliveries are counted on the sending side.
    """
    proc = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", str(backlog)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = clock() + START_TIMEOUT
        while not _port_open(port):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"smtp-sink exited with {proc.returncode}: {err.strip()}")
            if clock() > deadline:
                raise RuntimeError(f"smtp-sink did not listen on 127.0.0.1:{port}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


SOURCE_SENDER = "bench@example.org"
SOURCE_RECIPIENT = "rcpt@example.net"


def smtp_source_args(address: str, messages: int, sessions: int = 20, length: int = 4096) -> list[str]:
    """`smtp-source -s SESSIONS -l LENGTH -m MESSAGES -f ... -t ... ADDRESS` (one connection a message)."""
    return [
        "smtp-source",
        "-s",
        str(sessions),
        "-l",
        str(length),
        "-m",
        str(messages),
        "-f",
        SOURCE_SENDER,
        "-t",
        SOURCE_RECIPIENT,
        address,
    ]


def run_smtp_source(
    address: str, messages: int, *, sessions: int = 20, length: int = 4096, timeout: float = 3600.0
) -> float:
    """Run smtp-source to the end; return its wall-clock seconds. Raises if it fails or times out."""
    args = smtp_source_args(address, messages, sessions, length)
    start = clock()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = clock() - start
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds
