"""Keep py-libp2p's unused optional parts out of a node process (issue 19: RSS and start-up).

py-libp2p 0.8.1 imports every transport, discovery service and record type it ships when the
``libp2p`` package is first imported (``libp2p/__init__.py`` and ``libp2p.host.basic_host``
import them eagerly, none behind ``try/except ImportError``): QUIC and WebTransport (aioquic),
WebSocket (trio-websocket, wsproto), mDNS (zeroconf, ifaddr), UPnP (miniupnpc), AutoTLS's ACME
client and the observability providers (httpx, requests, urllib3, certifi,
charset_normalizer), TLS (pyOpenSSL, service-identity), IPNS and bitswap records (cbor2), and,
through httpx's command-line interface where they are installed, rich, pygments and click. A
node uses none of them: TCP, Noise, yamux, gossipsub, identify, ping, circuit relay v2 and
DCUtR (docs/libp2p.md). Loading them costs about 19 MB of RSS per node and 0.15-0.25 s of
start-up (docs/performance.md). libp2p's own modules of those parts (QUIC, WebSocket, TLS,
secio, mplex, the persistent peer store, mDNS, random walk, rendezvous, UPnP, Kademlia,
bitswap, records: 150 modules) cost about 6 MB more and are blocked the same way. With
``mdns = true`` in the config, mDNS's packages are loaded (:func:`unused`). multiaddr's DNS
resolver, the only user of dnspython, is answered with :mod:`node.net.system_resolver`
(:data:`SUBSTITUTES`: the operating system's resolver), and dnspython is blocked too; libp2p's
RSA and secp256k1 key modules are answered with :mod:`node.net.refused_keys` (grid members use
Ed25519 keys only), and pycryptodome and coincurve are blocked.

:func:`install` puts a finder first on ``sys.meta_path`` that answers an import of any of
:data:`UNUSED` (and its submodules) with a placeholder module: libp2p's module bodies import
and subclass names from it, and any *use* (calling or instantiating a placeholder) raises
:class:`UnusedDependencyError` naming the module and attribute, so a libp2p code path that does
need one fails loudly at once rather than misbehaving. Placeholders are exception classes
(``except placeholder:`` is valid and never matches) and each name is its own class (a
class may list two of them as bases).

Only the node processes call it (``microgrid node run``, ``operator run``, ``net``), before
anything imports libp2p; never a library import, so tests and the dashboard (which needs
some of these packages) are untouched. ``MICROGRID_FULL_IMPORTS=1`` turns it off.
tests/net/test_lean_imports.py checks that a node's imports leave these packages out and that
a placeholder raises; every multi-process test runs nodes with it on.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

UNUSED: tuple[str, ...] = (
    "aioquic",
    "pylsqpack",
    "trio_websocket",
    "wsproto",
    "zeroconf",
    "ifaddr",
    "miniupnpc",
    "httpx",
    "requests",
    "urllib3",
    "certifi",
    "charset_normalizer",
    "OpenSSL",
    "service_identity",
    "cbor2",
    "dns",
    "Crypto",
    "coincurve",
    "rich",
    "pygments",
    "click",
    # libp2p's own parts a node never runs (its package imports them all): about 6 MB
    "libp2p.transport.quic",
    "libp2p.transport.websocket",
    "libp2p.security.tls",
    "libp2p.security.secio",
    "libp2p.security.pnet",
    "libp2p.stream_muxer.mplex",
    "libp2p.peer.persistent",
    "libp2p.discovery.mdns",
    "libp2p.discovery.random_walk",
    "libp2p.discovery.rendezvous",
    "libp2p.discovery.upnp",
    "libp2p.kad_dht",
    "libp2p.bitswap",
    "libp2p.records",
)
"""Packages and libp2p subpackages a node never uses (see the module docstring for who imports
each); a dotted name blocks that subpackage and everything under it."""

SUBSTITUTES: dict[str, str] = {
    "multiaddr.resolvers.dns": "node.net.system_resolver",
    "libp2p.crypto.rsa": "node.net.refused_keys",
    "libp2p.crypto.secp256k1": "node.net.refused_keys",
}
"""Modules answered with one of ours instead: multiaddr's DNS resolver (dnspython, blocked
above) by one over the operating system's resolver (:mod:`node.net.system_resolver`); libp2p's
RSA and secp256k1 keys (pycryptodome, coincurve, blocked above) by key classes that refuse
them as a parser refuses an unknown key type (:mod:`node.net.refused_keys`)."""

MDNS_PACKAGES: tuple[str, ...] = ("zeroconf", "ifaddr", "libp2p.discovery.mdns")
"""What libp2p's mDNS discovery needs: loaded when the config turns ``mdns`` on."""


def unused(*, mdns: bool = False) -> tuple[str, ...]:
    """:data:`UNUSED`, less what mDNS discovery needs when it is on."""
    return tuple(b for b in UNUSED if not (mdns and b in MDNS_PACKAGES))


DISABLE_ENV = "MICROGRID_FULL_IMPORTS"


class UnusedDependencyError(RuntimeError):
    """A placeholder of a package the node does not load was used."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name} is not loaded in a node process (node/net/lean_imports.py); a libp2p code "
            f"path the node did not use before needs it: set {DISABLE_ENV}=1 and report it"
        )
        self.name = name


class _PlaceholderMeta(type):
    """Attribute access on a placeholder class yields a further placeholder (``a.b.c``)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnusedDependencyError(cls.__qualname__)


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (Exception,), {"__qualname__": qualname})


class _PlaceholderModule(types.ModuleType):
    """A module whose every public attribute is a placeholder class, one per name."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _UnusedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the blocked packages with placeholder modules, and each of the
    ``substitutes`` (module name -> ours) with our module."""

    def __init__(self, blocked: frozenset[str], substitutes: dict[str, str] | None = None) -> None:
        self.blocked = blocked
        self.substitutes = substitutes or {}
        self.answered: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in self.substitutes:
            return importlib.machinery.ModuleSpec(fullname, self)
        if not any(fullname == b or fullname.startswith(b + ".") for b in self.blocked):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        if spec.name in self.substitutes:
            self.answered.add(spec.name)
            return importlib.import_module(self.substitutes[spec.name])
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        self.answered.add(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install(
    blocked: Sequence[str] = UNUSED, substitutes: dict[str, str] | None = None
) -> _UnusedFinder | None:
    """Block ``blocked`` and answer the :data:`SUBSTITUTES` (or ``substitutes``) with our
    modules for the rest of this process (None when ``MICROGRID_FULL_IMPORTS`` is set or
    already installed). A module already imported stays as it is."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    if any(isinstance(f, _UnusedFinder) for f in sys.meta_path):
        return None
    subs = SUBSTITUTES if substitutes is None else substitutes
    finder = _UnusedFinder(
        frozenset(b for b in blocked if b not in sys.modules),
        {name: ours for name, ours in subs.items() if name not in sys.modules},
    )
    sys.meta_path.insert(0, finder)
    return finder


def is_placeholder(module: object) -> bool:
    """True for a module :func:`install` answered."""
    return isinstance(module, _PlaceholderModule)
