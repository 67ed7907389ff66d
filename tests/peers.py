"""Real peers for tests: Postfix's smtp-sink, dnsmasq and Dovecot IMAP on loopback.

Import these from any test module; nothing here is a mock. Every peer runs in
the foreground as a child process with its files in a private temporary
directory, is waited for until it really answers (bounded), and is stopped
at exit (SIGTERM, then SIGKILL after a few seconds). See shared/PEERS.md.

API:
    require(binary, package=None) -> str
        Path of `binary`; if missing, pytest.fail under CI=true, else
        pytest.skip, naming the Debian package to install.
    free_port(host="127.0.0.1") -> int
        A TCP port nobody listens on right now at `host`.
    smtp_sink(address="127.0.0.1", port=None, *, reply_4xx=(), reply_5xx=(), reply_421=(),
              disconnect=(), dump_file=None)
        Context manager -> Sink(host, port, dump_file). `reply_4xx`/`reply_5xx`
        name SMTP commands ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", ".", ...)
        answered 4xx/5xx for the whole session; `reply_421` answers 421 and
        hangs up; `disconnect` hangs up without a reply. With `dump_file`,
        every transaction is appended to that file (smtp-sink's -D format);
        Sink.messages() splits it, Sink.wait_for_messages(n) waits for n.
    dnsmasq(records) -> context manager -> (host, port)
        A DNS server answering only `records` (dnsmasq options such as those
        from mx_record, null_mx and host_record); any other name is NXDOMAIN.
    mx_record(domain, host, preference), null_mx(domain), host_record(name, *addresses)
        The dnsmasq options for those records.
    dovecot(home, user, password="secret") -> context manager -> Imap(host, port, user, password)
        Dovecot IMAP serving a COPY of `home` (which holds Maildir/) as `user`.
    imap_count(port, user, password, *, host="127.0.0.1", mailbox="INBOX") -> int
        Messages in the mailbox, read with EXAMINE (changes nothing).
    clamd(signatures) -> context manager -> Clamd(host, port, socket)
        clamd on 127.0.0.1:free-port and a unix socket, loading only the
        signature files in `signatures` (the official databases cannot be
        downloaded; tests/data/ ships an .ndb of the EICAR test string).
        Ready when it accepts connections (it loads the database before binding).
    spamd() -> context manager -> Spamd(host, port)
        spamd on 127.0.0.1:free-port with the rules its package ships, -L
        (no network tests). Ready when it answers PING with PONG (~1 s).
    eicar() -> bytes, gtube() -> bytes
        The EICAR antivirus and GTUBE anti-spam test strings, put together
        from pieces at run time so that no scanner flags this repository.
    SIGNATURES
        tests/data/: the .ndb signature of EICAR that clamd loads.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
UNPRIVILEGED_UID = 65534  # nobody/nogroup; Dovecot refuses uid 0

_PACKAGES = {
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "postfix": "postfix",
    "swaks": "swaks",
    "dnsmasq": "dnsmasq-base",
    "dovecot": "dovecot-core",
    "doveadm": "dovecot-core",
    "/usr/lib/dovecot/imap": "dovecot-imapd",
    "clamd": "clamav-daemon",
    "spamd": "spamd",
}
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _missing(what: str, package: str) -> None:
    message = f"{what} not found: install the Debian package {package!r} (apt-get install {package}; `make system-deps`)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require(binary: str, package: str | None = None) -> str:
    """The path of `binary` (a name on PATH or in an sbin directory, or an absolute path)."""
    package = package or _PACKAGES.get(binary, binary)
    if os.path.isabs(binary):
        if os.access(binary, os.X_OK):
            return binary
    else:
        path = shutil.which(binary) or shutil.which(binary, path=os.pathsep.join(_SBIN))
        if path:
            return path
    _missing(binary, package)
    raise AssertionError("unreachable")  # pytest.fail/skip raised


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (another process could take it; rare on loopback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- processes ------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        _stop(proc)


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before answering:\n{_tail(log)}")
        if ready():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer within {START_TIMEOUT} s:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def _tcp_accepts(host: str, port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    return probe


@contextlib.contextmanager
def _private_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory that unprivileged peers can traverse (0o711), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- smtp-sink ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sink:
    host: str
    port: int
    dump_file: Path | None

    def messages(self) -> list[bytes]:
        """Each captured transaction (smtp-sink's X-* lines, Received, then the message, LF endings)."""
        if self.dump_file is None or not self.dump_file.exists():
            return []
        dump = self.dump_file.read_bytes()
        return [m for m in re.split(rb"(?m)^(?=X-Client-Addr: )", dump) if m]

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """The captured transactions once there are at least `count` (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"smtp-sink captured {len(found)} messages, expected {count}")
            time.sleep(0.02)
        return found


@contextlib.contextmanager
def smtp_sink(
    address: str = "127.0.0.1",
    port: int | None = None,
    *,
    reply_4xx: Iterable[str] = (),
    reply_5xx: Iterable[str] = (),
    reply_421: Iterable[str] = (),
    disconnect: Iterable[str] = (),
    dump_file: Path | None = None,
) -> Iterator[Sink]:
    """Postfix's smtp-sink on address:port (a free port if None), until the block ends.

    As root it runs `-u nobody`, which can write only where nobody may: the
    capture is then written in a private directory, `dump_file` is a symlink
    to it while the sink runs and becomes a plain copy when it stops.
    """
    binary = require("smtp-sink")
    port = port or free_port(address)
    with _private_dir("spoolfs-sink-") as work:
        argv = [binary]
        capture: Path | None = None
        if dump_file is not None:
            dump_file = Path(dump_file)
            if os.geteuid() == 0:
                spool = work / "dump"
                spool.mkdir()
                os.chown(spool, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
                capture = spool / "sink.dump"
                dump_file.unlink(missing_ok=True)
                dump_file.symlink_to(capture)
            else:
                capture = dump_file
            argv += ["-D", str(capture)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        if reply_4xx := ",".join(reply_4xx):
            argv += ["-r", reply_4xx]
        if reply_5xx := ",".join(reply_5xx):
            argv += ["-f", reply_5xx]
        if reply_421 := ",".join(reply_421):
            argv += ["-Q", reply_421]
        if disconnect := ",".join(disconnect):
            argv += ["-q", disconnect]
        host = f"[{address}]" if ":" in address else address
        argv += [f"{host}:{port}", "64"]
        log = work / "smtp-sink.log"
        try:
            with _process(argv, log) as proc:
                _wait_until(_tcp_accepts(address, port), proc, f"smtp-sink on {address}:{port}", log)
                yield Sink(address, port, dump_file)
        finally:
            if dump_file is not None and capture is not None and dump_file.is_symlink():
                dump_file.unlink()
                if capture.exists():
                    shutil.copyfile(capture, dump_file)
                else:
                    dump_file.touch()


# --- dnsmasq --------------------------------------------------------------------------


def mx_record(domain: str, host: str, preference: int) -> str:
    return f"--mx-host={domain},{host},{preference}"


def null_mx(domain: str) -> str:
    """RFC 7505: a single MX of preference 0 pointing at the root ('.')."""
    return f"--mx-host={domain},.,0"


def host_record(name: str, *addresses: str) -> str:
    return f"--host-record={name},{','.join(addresses)}"


def _dns_answers(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        query = dns.message.make_query("ready.invalid.", "A")
        try:
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
            return True
        except (dns.exception.DNSException, OSError):
            return False

    return probe


@contextlib.contextmanager
def dnsmasq(records: Iterable[str]) -> Iterator[tuple[str, int]]:
    """dnsmasq on 127.0.0.1:free-port answering `records` only; yields (host, port)."""
    binary = require("dnsmasq")
    port = free_port()
    with _private_dir("spoolfs-dns-") as work:
        argv = [
            binary,
            "--keep-in-foreground",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--user=root",
            f"--pid-file={work / 'dnsmasq.pid'}",
            "--log-facility=-",
            "--local=/#/",  # everything is local: an unknown name is NXDOMAIN, not REFUSED
            *records,
        ]
        log = work / "dnsmasq.log"
        with _process(argv, log) as proc:
            _wait_until(_dns_answers(port), proc, f"dnsmasq on 127.0.0.1:{port}", log)
            yield ("127.0.0.1", port)


# --- Dovecot --------------------------------------------------------------------------


@dataclass(frozen=True)
class Imap:
    host: str
    port: int
    user: str
    password: str


_DOVECOT_CONF = """\
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
info_log_path = {work}/dovecot.log
first_valid_uid = {uid}
last_valid_uid = {uid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {work}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {work}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


def _imap_greets(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.settimeout(1.0)
                return sock.recv(64).startswith(b"* OK")
        except OSError:
            return False

    return probe


@contextlib.contextmanager
def dovecot(home: Path, user: str, password: str = "secret") -> Iterator[Imap]:
    """Dovecot IMAP on 127.0.0.1:free-port serving a copy of `home` (with Maildir/) as `user`.

    The copy belongs to uid/gid 65534 (Dovecot refuses root); the original is untouched.
    """
    binary = require("dovecot")
    require("/usr/lib/dovecot/imap")
    port = free_port()
    with _private_dir("spoolfs-dovecot-") as work:
        copy = work / "home"
        shutil.copytree(home, copy, symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            os.chown(path, UNPRIVILEGED_UID, UNPRIVILEGED_UID, follow_symlinks=False)
        uid = UNPRIVILEGED_UID
        (work / "passwd").write_text(f"{user}:{{PLAIN}}{password}:{uid}:{uid}::{copy}::\n")
        config = work / "dovecot.conf"
        config.write_text(_DOVECOT_CONF.format(work=work, uid=uid, port=port))
        log = work / "dovecot.log"
        with _process([binary, "-F", "-c", str(config)], log) as proc:
            _wait_until(_imap_greets(port), proc, f"dovecot on 127.0.0.1:{port}", log)
            yield Imap("127.0.0.1", port, user, password)


def imap_count(
    port: int, user: str, password: str, *, host: str = "127.0.0.1", mailbox: str = "INBOX"
) -> int:
    """Messages in `mailbox`, opened read-only (EXAMINE): the Maildir is left as it was."""
    with imaplib.IMAP4(host, port, timeout=10.0) as imap:
        imap.login(user, password)
        status, data = imap.select(mailbox, readonly=True)
        if status != "OK":
            raise AssertionError(f"EXAMINE {mailbox} failed: {data!r}")
        return int(data[0] or b"0")


# --- clamd ----------------------------------------------------------------------------

SIGNATURES = Path(__file__).resolve().parent / "data"


def eicar() -> bytes:
    """The EICAR test string (68 bytes); harmless, every antivirus knows it."""
    return b"".join([b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$", b"EICAR-STANDARD-ANTIVIRUS", b"-TEST-FILE!$H+H*"])


def gtube() -> bytes:
    """The GTUBE test string: SpamAssassin scores it 1000."""
    return b"".join([b"XJS*C4JDBQADN1.NSBN3*2IDNEN*", b"GTUBE-STANDARD-ANTI-UBE", b"-TEST-EMAIL*C.34X"])


@dataclass(frozen=True)
class Clamd:
    host: str
    port: int
    socket: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


_SIGNATURE_SUFFIXES = {".ndb", ".hdb", ".hsb", ".ldb", ".mdb", ".cdb", ".fp", ".ign2"}
_CLAMD_CONF = """\
Foreground true
TCPSocket {port}
TCPAddr 127.0.0.1
LocalSocket {work}/clamd.sock
DatabaseDirectory {work}/db
TemporaryDirectory {work}/tmp
ScanMail true
SelfCheck 0
Bytecode false
MaxThreads 8
"""


@contextlib.contextmanager
def clamd(signatures: Path) -> Iterator[Clamd]:
    """clamd on 127.0.0.1:free-port (and a unix socket) with the signature files in
    `signatures` (a file, or a directory whose .ndb/.hdb/... files are taken)."""
    binary = require("clamd")
    port = free_port()
    with _private_dir("spoolfs-clamd-") as work:
        db = work / "db"
        db.mkdir()
        files = [signatures] if signatures.is_file() else sorted(signatures.iterdir())
        for f in files:
            if f.suffix in _SIGNATURE_SUFFIXES:
                shutil.copy(f, db / f.name)
        (work / "tmp").mkdir()
        config = work / "clamd.conf"
        config.write_text(_CLAMD_CONF.format(work=work, port=port))
        log = work / "clamd.log"
        with _process([binary, "--config-file", str(config)], log) as proc:
            _wait_until(_tcp_accepts("127.0.0.1", port), proc, f"clamd on 127.0.0.1:{port}", log)
            yield Clamd("127.0.0.1", port, work / "clamd.sock")


# --- spamd ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spamd:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _spamd_pongs(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.settimeout(1.0)
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return b"PONG" in sock.recv(64)
        except OSError:
            return False

    return probe


@contextlib.contextmanager
def spamd(children: int = 2) -> Iterator[Spamd]:
    """spamd on 127.0.0.1:free-port, local tests only (-L), the package's own rules."""
    binary = require("spamd")
    port = free_port()
    with _private_dir("spoolfs-spamd-") as work:
        home = work / "home"
        home.mkdir()
        os.chown(home, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        argv = [binary, "-i", "127.0.0.1", "-p", str(port), "-A", "127.0.0.1", "-L", "-x"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody", "-g", "nogroup"]
        argv += [
            f"--helper-home-dir={home}",
            f"--max-children={children}",
            "--min-children=1",
            "--syslog=stderr",
            f"--pidfile={work / 'spamd.pid'}",
        ]
        log = work / "spamd.log"
        with _process(argv, log) as proc:
            _wait_until(_spamd_pongs(port), proc, f"spamd on 127.0.0.1:{port}", log)
            yield Spamd("127.0.0.1", port)
