"""Who may send what to whom: the relay policy. No open relay.

- Mail to a local domain is accepted from anyone, for existing users only
  (550 5.1.1 otherwise, at RCPT time, never a bounce later).
- Mail to any other domain is accepted only from trusted networks
  (`smtp.mynetworks`); everyone else gets 554 5.7.1 Relay access denied.
- Address tricks never slip through: a source route, a `%` hack, a `!`
  path or a quoted local part hiding an `@` is refused as a relay attempt
  (554 5.7.1) whoever the client is, since none of them names a local
  mailbox and a downstream server might route on them; syntax errors
  (trailing dots, unbalanced brackets, two `@`) are 501 5.1.3.

Failure rules: pure decisions, no I/O except the users directory (a stat);
every refusal is an SMTP reply string.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from spoolfs.addresses import normalize_sender, parse_mailbox
from spoolfs.errors import InvalidAddress
from spoolfs.users import Users

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TRUSTED_CACHE = 4096  # client addresses remembered; then forgotten all at once


class RelayPolicy:
    def __init__(self, local_domains: Iterable[str], mynetworks: Iterable[str], users: Users) -> None:
        self.local_domains = {d.lower() for d in local_domains}
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in mynetworks]
        self.users = users
        self._trusted: dict[str, bool] = {}  # a reload makes a new policy, so never stale

    def trusted(self, client_ip: str) -> bool:
        # asked for every recipient; parsing the address was 1% of ingest
        known = self._trusted.get(client_ip)
        if known is None:
            known = self._in_mynetworks(client_ip)
            if len(self._trusted) >= TRUSTED_CACHE:
                self._trusted.clear()
            self._trusted[client_ip] = known
        return known

    def _in_mynetworks(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def check_sender(self, address: str) -> tuple[str | None, str]:
        """(refusal or None, normalised sender)."""
        try:
            return None, normalize_sender(address)
        except InvalidAddress:
            return "501 5.1.7 Bad sender address syntax", ""

    def check_recipient(self, client_ip: str, address: str) -> tuple[str | None, str]:
        """(refusal or None, normalised recipient)."""
        if address.startswith("@") or ":" in address.split("@", 1)[0]:
            return f"554 5.7.1 <{address}>: Relay access denied", ""
        try:
            local, domain = parse_mailbox(address)
        except InvalidAddress:
            return "501 5.1.3 Bad recipient address syntax", ""
        rcpt = f"{local}@{domain}"
        if any(c in local for c in "%!@") or local.startswith('"'):
            return f"554 5.7.1 <{rcpt}>: Relay access denied", ""
        if domain in self.local_domains:
            if not self.users.exists(rcpt):
                return (
                    f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in local recipient table",
                    "",
                )
            return None, rcpt
        if self.trusted(client_ip):
            return None, rcpt
        return f"554 5.7.1 <{rcpt}>: Relay access denied", ""

    def is_local(self, address: str) -> bool:
        return address.rpartition("@")[2].lower() in self.local_domains
