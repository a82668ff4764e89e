"""DNS names in multiaddrs resolved by the operating system's resolver, not dnspython.

py-libp2p's TCP transport resolves ``/dns``, ``/dns4`` and ``/dns6`` addresses with
``multiaddr.resolvers.DNSResolver``, which queries DNS servers itself through dnspython: it
never reads ``/etc/hosts`` and cannot resolve a home network's mDNS names (``pi.local``), and
dnspython costs a node 2.4 MB of RSS and 40 ms of start-up (docs/performance.md). In a node
process :mod:`node.net.lean_imports` answers imports of ``multiaddr.resolvers.dns`` with this
module and leaves dnspython out, so every DNS name a node dials (a static peer, a relay, a
member's learned address) goes through ``getaddrinfo`` like any other program on the machine:
``/etc/hosts``, the system's DNS servers and, where nss-mdns is installed, ``.local`` names.

``/dnsaddr`` (TXT-record bootstrap lists) is not supported: the configuration and the address
exchange accept only ``dns``, ``dns4`` and ``dns6`` (``node.net.host.dialable_address``).
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from multiaddr import Multiaddr
from multiaddr.exceptions import ResolutionError
from multiaddr.protocols import P_DNS, P_DNS4, P_DNS6, P_DNSADDR
from multiaddr.resolvers.base import Resolver

DNSADDR_TXT_PREFIX = "dnsaddr="
"""As in ``multiaddr.resolvers.dns`` (re-exported by ``multiaddr.resolvers``)."""

MAX_ADDRESSES = 8
"""At most this many addresses of one name are returned (the dial tries them in turn)."""

_FAMILIES = {P_DNS: socket.AF_UNSPEC, P_DNS4: socket.AF_INET, P_DNS6: socket.AF_INET6}


class DNSResolver(Resolver):
    """``multiaddr``'s resolver interface over ``getaddrinfo`` (run in a worker thread by
    trio, so a slow resolver holds no event loop; the caller bounds it with a deadline)."""

    async def resolve(
        self, maddr: Multiaddr, options: dict[str, Any] | None = None
    ) -> list[Multiaddr]:
        """``maddr`` with its leading DNS name replaced by each address it resolves to (the
        rest of the address kept), or ``[maddr]`` if it does not start with a DNS name.
        Raises ``ResolutionError`` if the name does not resolve."""
        protocols = list(maddr.protocols())
        if not protocols:
            raise ResolutionError("empty multiaddr")
        code = protocols[0].code
        if code == P_DNSADDR:
            raise ResolutionError("/dnsaddr is not supported by a node (use /dns4 or /dns6)")
        family = _FAMILIES.get(code)
        if family is None:
            return [maddr]
        host = maddr.value_for_protocol(code)
        if not host:
            raise ResolutionError(f"no name in {maddr}")
        try:
            infos = await trio.socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ResolutionError(f"cannot resolve {host!r}: {exc}") from None
        parts = maddr.split(1)
        rest = parts[1] if len(parts) > 1 else None
        out: list[Multiaddr] = []
        seen: set[str] = set()
        for fam, _type, _proto, _name, sockaddr in infos:
            ip = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone index
            if ip in seen or fam not in (socket.AF_INET, socket.AF_INET6):
                continue
            seen.add(ip)
            head = Multiaddr(f"/{'ip4' if fam == socket.AF_INET else 'ip6'}/{ip}")
            out.append(head.encapsulate(rest) if rest is not None else head)
            if len(out) == MAX_ADDRESSES:
                break
        if not out:
            raise ResolutionError(f"{host!r} has no {protocols[0].name} address")
        return out


__all__ = ["DNSADDR_TXT_PREFIX", "MAX_ADDRESSES", "DNSResolver"]
