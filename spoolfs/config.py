"""Configuration: one TOML file, every key optional, defaults embedded.

Where it comes from, first match wins: `--config FILE`, `$SPOOL_CONFIG`,
else the embedded defaults (data in `var/` of the checkout). `--data-dir` /
`$SPOOL_DATA_DIR` override `data_dir` whatever the source.

Failure rules: an unreadable file, bad TOML, an unknown key, a wrong type or
an impossible value raises ConfigError naming the file and the key (exit 2).
A relative `data_dir` is relative to the directory of the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Literal

import msgspec

from events.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = CHECKOUT / "var"
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class EventsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A segment is closed and a new one started past this size.
    segment_bytes: int = 64 << 20
    # While `spool serve` runs, the replay checkpoint is moved up after this
    # many events, so that a start replays at most about this many.
    checkpoint_every: int = 1_000_000


class SmtpConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Where the SMTP listener binds (HOST:PORT); loopback by default.
    listen: str = "127.0.0.1:2525"
    # Name in the greeting and the Received header; defaults to the node name.
    hostname: str = ""
    # SMTP worker processes sharing the port (SO_REUSEPORT); 0 = one per core.
    workers: int = 0
    # Largest message accepted, in bytes (552 5.3.4 beyond).
    max_message_size: int = 10 << 20
    # Recipients accepted per message (452 4.5.3 beyond).
    max_recipients: int = 100
    # Longest line accepted, in bytes without CRLF (RFC 5321: 998).
    max_line_length: int = 998
    # Simultaneous connections from one client address (421 4.7.0 beyond).
    max_connections_per_client: int = 50
    # Seconds a client may stay silent before it is disconnected.
    command_timeout: float = 300.0
    # Mail to these domains is delivered here (Maildir), from anyone.
    local_domains: list[str] = []
    # Clients in these networks may relay to any domain.
    mynetworks: list[str] = []


class DeliveryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Delivery processes, each owning a share of the subspools (0: one per core).
    workers: int = 0
    # Deliveries in flight at once (per process), and at most this many per
    # destination domain.
    concurrency: int = 20
    per_domain: int = 5
    # Connections at once to the relayhost, which is one destination, your own
    # (Postfix's default_destination_concurrency_limit).
    relayhost_concurrency: int = 20
    # Retry backoff: doubling from min to max seconds.
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    # After this many seconds in the spool, what is still pending bounces.
    lifetime: float = 5 * 86400.0
    # Send one delay warning DSN after this many seconds (0: never).
    delay_warning: float = 0.0
    # Send everything to this smarthost (HOST:PORT) instead of looking up MX.
    relayhost: str = ""
    # Port of remote SMTP servers (25 in the real world; tests use others).
    smtp_port: int = 25
    # DNS resolver for MX lookups (HOST:PORT); empty: the system's.
    dns: str = ""
    # Seconds for connecting and for each SMTP command of a delivery.
    timeout: float = 60.0


class ScanConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Scan mail during DATA, before the 250 (clamd for viruses, spamd for spam).
    enabled: bool = False
    # clamd's address: HOST:PORT, or the path of its unix socket; "" = no virus scan.
    clamd: str = "127.0.0.1:3310"
    # spamd's address: HOST:PORT, or the path of its unix socket; "" = no spam scan.
    spamd: str = "127.0.0.1:783"
    # Spam at or over this score is quarantined; unset: spamd's own threshold.
    spam_threshold: float | None = None
    # Messages larger than this (bytes) are not sent to spamd (spamc's own default).
    spam_max_size: int = 512000
    # Seconds for both scanners' round trips (they run at the same time).
    timeout: float = 30.0
    # false: only mail from trusted networks (relayed, outgoing) is scanned;
    # true: incoming mail too.
    scan_incoming: bool = False
    # A scanner down or timing out: "tempfail" answers 451 4.7.1 (the client
    # retries later); "accept" spools the message unscanned, and says so.
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    # Days a quarantined message is kept before the purge removes it (1-30).
    retention_days: int = 30


MAX_RETENTION_DAYS = 30


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Where the spool, the event log, quarantine and mailboxes live.
    data_dir: str = ""
    # This node's name in events; defaults to the host name.
    node: str = ""
    # Number of subspool directories (spool/00 .. spool/NN); fixed once a spool exists.
    subspools: int = 16
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    scan: ScanConfig = msgspec.field(default_factory=ScanConfig)

    # resolved after loading
    source: str = "(embedded defaults)"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _fail(source: str, key: str, why: str) -> ConfigError:
    where = f"{source}: {key}" if key else source
    return ConfigError(f"config error: {where}: {why}")


def _explain_decode(source: str, exc: msgspec.ValidationError | msgspec.DecodeError) -> ConfigError:
    text = str(exc)
    match = re.search(r"\s*-\s*at `\$\.?([^`]*)`", text)
    key = match.group(1) if match else ""
    why = text[: match.start()] if match else text
    unknown = re.match(r"Object contains unknown field `([^`]*)`", why)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        why = "unknown key"
    return _fail(source, key, why[:1].lower() + why[1:])


def load_config(path: str | os.PathLike[str] | None = None, *, data_dir: str | None = None) -> Config:
    """Load, validate and resolve a configuration."""
    path = path if path is not None else os.environ.get("SPOOL_CONFIG") or None
    if data_dir is None:
        data_dir = os.environ.get("SPOOL_DATA_DIR") or None
    if path is None:
        config = Config()
        base = CHECKOUT
        source = "(embedded defaults)"
    else:
        source = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise _fail(source, "", f"cannot read: {exc.strerror}") from exc
        try:
            config = msgspec.toml.decode(raw, type=Config)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _explain_decode(source, exc) from exc
        if config.source != Config().source:
            raise _fail(source, "source", "unknown key")
        base = Path(path).resolve().parent
    if data_dir is not None:
        resolved = Path(data_dir).resolve()
    elif config.data_dir:
        resolved = (base / config.data_dir).resolve()
    else:
        resolved = DEFAULT_DATA_DIR
    node = config.node or socket.gethostname().split(".")[0] or "localhost"
    _validate(source, config, resolved, node)
    return msgspec.structs.replace(config, data_dir=str(resolved), node=node, source=source)


def _validate(source: str, config: Config, data: Path, node: str) -> None:
    if data.exists() and not data.is_dir():
        raise _fail(source, "data_dir", f"{data} exists and is not a directory")
    if not _NODE_RE.fullmatch(node):
        raise _fail(source, "node", f"{node!r} is not a valid node name (letters, digits, . _ -)")
    if not 1 <= config.subspools <= 256:
        raise _fail(source, "subspools", "must be between 1 and 256")
    if config.events.segment_bytes < 4096:
        raise _fail(source, "events.segment_bytes", "must be at least 4096")
    if config.events.checkpoint_every < 1:
        raise _fail(source, "events.checkpoint_every", "must be at least 1")
    for key, value in (
        ("smtp.listen", config.smtp.listen),
        ("delivery.relayhost", config.delivery.relayhost),
        ("delivery.dns", config.delivery.dns),
    ):
        if value or key == "smtp.listen":
            try:
                parse_hostport(value)
            except ValueError as exc:
                raise _fail(source, key, str(exc)) from None
    for net in config.smtp.mynetworks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise _fail(source, "smtp.mynetworks", f"{net!r} is not a network (CIDR)") from None
    for domain in config.smtp.local_domains:
        if not domain or "@" in domain or domain.endswith("."):
            raise _fail(source, "smtp.local_domains", f"{domain!r} is not a domain name")
    positive: dict[str, float] = {
        "smtp.max_message_size": config.smtp.max_message_size,
        "smtp.max_recipients": config.smtp.max_recipients,
        "smtp.max_line_length": config.smtp.max_line_length,
        "smtp.max_connections_per_client": config.smtp.max_connections_per_client,
        "smtp.command_timeout": config.smtp.command_timeout,
        "delivery.concurrency": config.delivery.concurrency,
        "delivery.per_domain": config.delivery.per_domain,
        "delivery.relayhost_concurrency": config.delivery.relayhost_concurrency,
        "delivery.min_backoff": config.delivery.min_backoff,
        "delivery.max_backoff": config.delivery.max_backoff,
        "delivery.lifetime": config.delivery.lifetime,
        "delivery.timeout": config.delivery.timeout,
    }
    for key, number in positive.items():
        if number <= 0:
            raise _fail(source, key, "must be greater than 0")
    for key, workers in (
        ("smtp.workers", config.smtp.workers),
        ("delivery.workers", config.delivery.workers),
    ):
        if workers < 0:
            raise _fail(source, key, "must be 0 (one per core) or more")
    if config.delivery.max_backoff < config.delivery.min_backoff:
        raise _fail(source, "delivery.max_backoff", "must not be less than delivery.min_backoff")
    if not 0 < config.delivery.smtp_port < 65536:
        raise _fail(source, "delivery.smtp_port", "must be a TCP port (1-65535)")
    _validate_scan(source, config.scan)


def _validate_scan(source: str, scan: ScanConfig) -> None:
    for key, value in (("scan.clamd", scan.clamd), ("scan.spamd", scan.spamd)):
        if value:
            try:
                parse_scanner_address(value)
            except ValueError as exc:
                raise _fail(source, key, str(exc)) from None
    if scan.enabled and not (scan.clamd or scan.spamd):
        raise _fail(source, "scan.enabled", "needs scan.clamd or scan.spamd (both are empty)")
    if scan.timeout <= 0:
        raise _fail(source, "scan.timeout", "must be greater than 0")
    if scan.spam_max_size <= 0:
        raise _fail(source, "scan.spam_max_size", "must be greater than 0")
    if not 1 <= scan.retention_days <= MAX_RETENTION_DAYS:
        raise _fail(
            source, "scan.retention_days", f"must be between 1 and {MAX_RETENTION_DAYS} (days in quarantine)"
        )


def parse_scanner_address(value: str) -> tuple[str, int] | str:
    """A scanner's address: 'host:port' -> (host, port); '/path' or 'unix:/path' -> the path."""
    path = value.removeprefix("unix:")
    if path.startswith("/"):
        return path
    return parse_hostport(value)


class Overrides(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `spool serve` flags change over the config file."""

    smtp: str | None = None
    local_domains: list[str] = []
    mynetworks: list[str] = []
    relayhost: str | None = None
    dns: str | None = None


def apply_overrides(config: Config, o: Overrides) -> Config:
    """The config with the flags applied, validated again (ConfigError naming the flag)."""
    smtp = msgspec.structs.replace(
        config.smtp,
        listen=o.smtp if o.smtp is not None else config.smtp.listen,
        local_domains=sorted({*config.smtp.local_domains, *(d.lower() for d in o.local_domains)}),
        mynetworks=[*config.smtp.mynetworks, *o.mynetworks],
    )
    delivery = msgspec.structs.replace(
        config.delivery,
        relayhost=o.relayhost if o.relayhost is not None else config.delivery.relayhost,
        dns=o.dns if o.dns is not None else config.delivery.dns,
    )
    new = msgspec.structs.replace(config, smtp=smtp, delivery=delivery)
    _validate("command line", new, Path(new.data_dir), new.node)
    return new


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
