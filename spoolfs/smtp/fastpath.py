"""aiosmtpd's per-connection and per-command costs, without its behaviour changing.

aiosmtpd 1.4.6 builds its dispatch tables in `SMTP.__init__` by introspection
(`inspect.getmembers` of the protocol and of the handler, `dir()` of both,
`inspect.signature` of the EHLO hook), and it does so for every connection,
although they depend only on the protocol class and the handler object. And
`SMTP._getaddr` defines a class and runs the RFC 5322 header parser for every
MAIL and RCPT. Together that was a quarter of an SMTP worker's CPU time
(BENCHMARKS.md 4.5).

- `init_smtp` is `SMTP.__init__` of aiosmtpd 1.4.6, line for line, except
  that the tables come from a cache: names per protocol class, bound hooks
  per handler object (so a handler's hooks are read when it first serves a
  connection; a new handler, as after a reload, is read afresh).
- `fast_getaddr` answers for the plain `<local@domain> [params]` form, and
  only where the header parser is known to give the very same answer;
  anything else (quoted strings, comments, routes, literals, non-ASCII,
  encoded words) goes to aiosmtpd's parser.

Failure rules: with any other aiosmtpd version `INIT_MATCHES` is false and
the protocol calls aiosmtpd's own `__init__` (slower, never different).
`fast_getaddr` returns None when it is not sure, never a guess.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from warnings import warn

import aiosmtpd
from aiosmtpd import smtp as lib
from aiosmtpd.smtp import SMTP, _AuthMechAttr

# The copy below follows this release; another one keeps aiosmtpd's code.
INIT_MATCHES = aiosmtpd.__version__ == "1.4.6"


@dataclass(frozen=True)
class _ClassTables:
    smtp: tuple[tuple[str, str], ...]  # (command, attribute name)
    auth: tuple[tuple[str, str], ...]  # (mechanism, attribute name)


@dataclass(frozen=True)
class _HandlerTables:
    handler: Any
    hooks: dict[str, Callable[..., Any]]
    auth: dict[str, _AuthMechAttr]
    ehlo_hook_ver: str | None  # "old", "new", None, or "bad" (aiosmtpd raises)


_class_tables: dict[type, _ClassTables] = {}
# One entry: a server has one handler at a time, replaced only on reload.
_last_handler: list[_HandlerTables] = []


def _mechanism(mname: str, mfunc: Any) -> str:
    return getattr(mfunc, "__auth_mechanism_name__", mname.replace("auth_", "").replace("__", "-"))


def _tables_for_class(cls: type) -> _ClassTables:
    tables = _class_tables.get(cls)
    if tables is None:
        names = dir(cls)
        tables = _ClassTables(
            smtp=tuple((m.replace("smtp_", ""), m) for m in names if m.startswith("smtp_")),
            auth=tuple((_mechanism(m, getattr(cls, m)), m) for m in names if m.startswith("auth_")),
        )
        _class_tables[cls] = tables
    return tables


def _ehlo_version(hook: Callable[..., Any] | None) -> str | None:
    if hook is None:
        return None
    count = len(inspect.signature(hook).parameters)
    return {4: "old", 5: "new"}.get(count, "bad")


def _tables_for_handler(handler: Any) -> _HandlerTables:
    if _last_handler and _last_handler[0].handler is handler:
        return _last_handler[0]
    hooks = {m.replace("handle_", ""): getattr(handler, m) for m in dir(handler) if m.startswith("handle_")}
    tables = _HandlerTables(
        handler=handler,
        hooks=hooks,
        auth={
            _mechanism(mname, mfunc): _AuthMechAttr(mfunc, False)
            for mname, mfunc in inspect.getmembers(handler)
            if mname.startswith("auth_")
        },
        ehlo_hook_ver=_ehlo_version(hooks.get("EHLO")),
    )
    _last_handler[:] = [tables]
    return tables


def init_smtp(
    self: SMTP,
    handler: Any,
    *,
    data_size_limit: int | None = lib.DATA_SIZE_DEFAULT,
    enable_SMTPUTF8: bool = False,
    decode_data: bool = False,
    hostname: str | None = None,
    ident: str | None = None,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    timeout: float = 300,
    auth_required: bool = False,
    auth_require_tls: bool = True,
    auth_exclude_mechanism: Iterable[str] | None = None,
    auth_callback: lib.AuthCallbackType | None = None,
    command_call_limit: int | dict[str, int] | None = None,
    authenticator: lib.AuthenticatorType | None = None,
    proxy_protocol_timeout: float | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """aiosmtpd 1.4.6 `SMTP.__init__`, with the introspection done once (see the module doc)."""
    s: Any = self  # aiosmtpd's attributes, assigned as its __init__ does
    s.__ident__ = ident or lib.__ident__
    s.loop = loop if loop else lib.make_loop()
    super(SMTP, self).__init__(
        asyncio.StreamReader(loop=s.loop, limit=s.line_length_limit),
        client_connected_cb=s._cb_client_connected,
        loop=s.loop,
    )
    s.event_handler = handler
    assert data_size_limit is None or isinstance(data_size_limit, int)
    s.data_size_limit = data_size_limit
    s.enable_SMTPUTF8 = enable_SMTPUTF8
    s._decode_data = decode_data
    s.command_size_limits.clear()
    s.hostname = hostname if hostname else socket.getfqdn()
    s.tls_context = tls_context
    if tls_context:
        if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
            lib.log.warning(
                "tls_context.verify_mode not in {CERT_NONE, "
                "CERT_OPTIONAL}; this might cause client "
                "connection problems"
            )
        elif tls_context.check_hostname:
            lib.log.warning("tls_context.check_hostname == True; this might cause client connection problems")
    s.require_starttls = tls_context and require_starttls
    s._timeout_duration = timeout
    s._timeout_handle = None
    s._tls_handshake_okay = True
    s._tls_protocol = None
    s._original_transport = None
    s.session = None
    s.envelope = None
    s.transport = None
    s._handler_coroutine = None
    if not auth_require_tls and auth_required:
        warn("Requiring AUTH while not requiring TLS can lead to security vulnerabilities!", stacklevel=2)
        lib.log.warning("auth_required == True but auth_require_tls == False")
    s._auth_require_tls = auth_require_tls

    if proxy_protocol_timeout is not None:
        if proxy_protocol_timeout <= 0:
            raise ValueError("proxy_protocol_timeout must be > 0")
        if proxy_protocol_timeout < 3.0:
            lib.log.warning("proxy_protocol_timeout < 3.0")
    s._proxy_timeout = proxy_protocol_timeout

    if authenticator is not None:
        s._authenticator = authenticator
        s._auth_callback = None
    else:
        s._auth_callback = auth_callback or lib.login_always_fail
        s._authenticator = None

    s._auth_required = auth_required

    own = _tables_for_class(type(self))
    theirs = _tables_for_handler(handler)
    # a handler's mechanism replaces a built-in one of the same name in place, as in aiosmtpd
    auth_methods: dict[str, _AuthMechAttr] = {
        name: _AuthMechAttr(getattr(self, attr), True) for name, attr in own.auth
    }
    auth_methods.update(theirs.auth)
    for m in auth_exclude_mechanism or []:
        auth_methods.pop(m, None)
    s._auth_methods = auth_methods
    if lib.log.isEnabledFor(lib.logging.INFO):
        lib.log.info(
            "Available AUTH mechanisms: "
            + " ".join(m + "(builtin)" if impl.is_builtin else m for m, impl in sorted(auth_methods.items()))
        )
    s._handle_hooks = dict(theirs.hooks)

    if theirs.ehlo_hook_ver == "bad":
        raise RuntimeError("Unsupported EHLO Hook")
    if theirs.ehlo_hook_ver == "old":
        warn(
            "Use the 5-argument handle_EHLO() hook instead of "
            "the 4-argument handle_EHLO() hook; "
            "support for the 4-argument handle_EHLO() hook will be "
            "removed in version 2.0",
            DeprecationWarning,
            stacklevel=2,
        )
    s._ehlo_hook_ver = theirs.ehlo_hook_ver

    s._smtp_methods = {name: getattr(self, attr) for name, attr in own.smtp}

    if command_call_limit is None:
        s._enforce_call_limit = False
    else:
        s._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            s._call_limit_base = {}
            s._call_limit_default = command_call_limit
        elif isinstance(command_call_limit, dict):
            if not all(map(lib.is_int, command_call_limit.values())):
                raise TypeError("All command_call_limit values must be int")
            s._call_limit_base = command_call_limit
            s._call_limit_default = command_call_limit.get("*", lib.CALL_LIMIT_DEFAULT)
        else:
            raise TypeError("command_call_limit must be int or Dict[str, int]")


# RFC 5322 atext, ASCII only: the header parser takes such a dot-atom
# verbatim as local part and as domain (non-ASCII, quoted strings and
# literals it rewrites or flags, so they go to it).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN = re.compile(rf"<({_DOT_ATOM})@({_DOT_ATOM})>(.*)", re.DOTALL)


def fast_getaddr(arg: str) -> tuple[str, str] | None:
    """(address, rest) exactly as aiosmtpd's `_getaddr` gives them, or None to ask it.

    `arg` is what follows `FROM:` or `TO:`, already stripped by aiosmtpd.
    """
    if arg[:2] == "<>":
        # aiosmtpd returns the null path with the rest untouched
        return "<>", arg[2:]
    m = _PLAIN.fullmatch(arg)
    if m is None:
        return None
    local, domain, rest = m.groups()
    if local[:2] == "=?" or domain[:2] == "=?":
        return None  # the parser decodes an RFC 2047 encoded word here
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()  # the parser's folding white space is str.lstrip()
    if rest[:1] == "(":
        return None  # a comment, which the parser skips
    return f"{local}@{domain}", rest
