"""Configuration: one TOML file, every key optional, defaults embedded.

Where it comes from, first match wins: `--config FILE`, `$SPOOL_CONFIG`,
else the embedded defaults (data in `var/` of the checkout). `--data-dir` /
`$SPOOL_DATA_DIR` override `data_dir` whatever the source.

Failure rules: an unreadable file, bad TOML, an unknown key, a wrong type or
an impossible value raises ConfigError naming the file and the key (exit 2).
A relative `data_dir` is relative to the directory of the config file.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import msgspec

from events.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = CHECKOUT / "var"
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class EventsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A segment is closed and a new one started past this size.
    segment_bytes: int = 64 << 20


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Where the spool, the event log, quarantine and mailboxes live.
    data_dir: str = ""
    # This node's name in events; defaults to the host name.
    node: str = ""
    # Number of subspool directories (spool/00 .. spool/NN); fixed once a spool exists.
    subspools: int = 16
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)

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
    if not _NODE_RE.match(node):
        raise _fail(source, "node", f"{node!r} is not a valid node name (letters, digits, . _ -)")
    if not 1 <= config.subspools <= 256:
        raise _fail(source, "subspools", "must be between 1 and 256")
    if config.events.segment_bytes < 4096:
        raise _fail(source, "events.segment_bytes", "must be at least 4096")
