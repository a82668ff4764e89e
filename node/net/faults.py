"""Test-only network faults at the libp2p level: partitions and one-way message loss.

The process nemesis (``node/testing/nemesis.py``) cuts nodes off and drops their packets with
nftables in per-node network namespaces. Where namespaces cannot be made (no root, no ``ip`` or
``nft``, a container without ``CAP_NET_ADMIN``), it falls back to this injector: every node
process is started with ``MICROGRID_FAULTS_FILE`` (:data:`FAULTS_FILE_ENV`) naming a JSON file
of :class:`FaultRules`, which the node re-reads whenever the file's modification time changes
(:class:`FaultsFile`, polled by :class:`~node.net.host.NetNode` at most every
:data:`POLL_SECONDS`). **Tests and drills only**: never set it on a real household.

The file (every key optional; peers named by their base58 libp2p peer id or their ``did:key``)::

    {"partitioned": ["did:key:z6Mk...", "12D3KooW..."],
     "drop_inbound": {"12D3KooW...": 50},
     "drop_outbound": {"did:key:z6Mk...": 100},
     "clock_offset_seconds": 150}

- ``partitioned``: no traffic with that peer either way. The node closes its connections to it,
  refuses new ones (like a non-member's, but without blacklisting it in pubsub, so healing
  restores gossip) and its reconnect loop waits; anything still in flight from it is dropped.
- ``drop_inbound``: that percentage (an integer 0-100) of the messages *from* that peer is
  dropped on arrival: gossip messages it forwards, Raft frames, and the request streams it
  opens (block sync, clock samples), each as a whole.
- ``drop_outbound``: that percentage of the gossip messages and Raft frames *to* that peer is
  dropped before sending.
- ``clock_offset_seconds``: a number of seconds (within ``MAX_CLOCK_OFFSET``, ten years, either
  way) by which the running household node's wall clock jumps, on top of any configured
  ``clock_offset_seconds``; removing the key (or 0) sets it right again. The node's clock
  follows the file at once (:class:`LiveClockOffset`), and logs a warning on every change:
  what a machine whose clock is stepped while it runs sees (the process nemesis's ``jump``).

The loss is of whole messages, not packets: TCP cannot lose bytes in the middle of a stream
without corrupting it, and a message lost is what a Raft or gossip peer sees of a lossy link.
Control traffic (gossipsub subscriptions and mesh control, liveness pings, address exchanges)
is not dropped, and connections stay up whatever the loss; docs/reliability.md compares this
with nftables.

A rules file is bounded (:data:`MAX_FILE_BYTES`, :data:`MAX_ENTRIES`) and validated: a file that
is absent, half-written or malformed never stops the node: the last good rules stay in force and
the problem is logged once (until the file is good again).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libp2p.peer.id import ID

from market.did import IdentityError
from node.setup.config import MAX_CLOCK_OFFSET
from node.setup.keyfile import peer_id_from_did

log = logging.getLogger("microgrid.net.faults")

FAULTS_FILE_ENV = "MICROGRID_FAULTS_FILE"
"""The environment variable naming a node's faults file (tests and drills only)."""
POLL_SECONDS = 0.2
"""A running node looks at its faults file's modification time this often."""
MAX_ENTRIES = 256
"""At most this many peers in a rules file, over all its keys."""
MAX_FILE_BYTES = 64 * 1024
"""A larger faults file is refused (the last good rules stay)."""
KEYS = ("partitioned", "drop_inbound", "drop_outbound", "clock_offset_seconds")

_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,64}$")


class FaultRulesError(ValueError):
    """A faults file or rule is invalid; the message names the source and the entry."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


def peer_key(name: Any, source: str = "faults") -> str:
    """The base58 peer id a rule names: ``name`` as a base58 libp2p peer id (an identity or
    sha2-256 multihash) or an Ed25519 ``did:key``; raises :class:`FaultRulesError`."""
    if not isinstance(name, str):
        raise FaultRulesError(source, f"a peer must be a string, not {type(name).__name__}")
    if name.startswith("did:"):
        if len(name) > 128:
            raise FaultRulesError(source, f"DID of {len(name)} characters")
        try:
            return str(peer_id_from_did(name))
        except (IdentityError, ValueError) as exc:
            raise FaultRulesError(source, f"bad DID {name[:60]!r}: {exc}") from None
    if not _BASE58.match(name):
        raise FaultRulesError(source, f"not a base58 peer id or a DID: {name[:60]!r}")
    try:
        raw = ID.from_base58(name).to_bytes()
    except Exception:  # the base58 decoder's own errors
        raise FaultRulesError(source, f"not base58: {name[:60]!r}") from None
    if len(raw) < 2 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        raise FaultRulesError(source, f"not a peer id multihash: {name[:60]!r}")
    return name


def _percent(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise FaultRulesError(source, f"{where}: a loss is an integer percentage 0-100, "
                                      f"not {value!r}")  # fmt: skip
    return value


def _clock_offset(value: Any, source: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or abs(value) > MAX_CLOCK_OFFSET):  # fmt: skip
        raise FaultRulesError(source, f"clock_offset_seconds: a finite number of seconds within "
                                      f"±{MAX_CLOCK_OFFSET}, not {value!r}")  # fmt: skip
    return float(value)


@dataclass(frozen=True, slots=True)
class FaultRules:
    """What one node does to its traffic with named peers (keys: base58 peer ids). The empty
    rules (the default) do nothing. Build with :meth:`make` or :meth:`from_json` (validated)."""

    partitioned_peers: frozenset[str] = frozenset()
    inbound: Mapping[str, int] = field(default_factory=dict)
    """Peer -> percentage of its messages dropped on arrival."""
    outbound: Mapping[str, int] = field(default_factory=dict)
    """Peer -> percentage of our messages to it dropped before sending."""
    clock_offset: float = 0.0
    """Seconds the node's wall clock is shifted by, live (``clock_offset_seconds``)."""

    @classmethod
    def make(cls, partitioned: Iterable[str] = (), drop_inbound: Mapping[str, int] | None = None,
             drop_outbound: Mapping[str, int] | None = None, source: str = "faults",
             clock_offset_seconds: Any = 0.0) -> FaultRules:  # fmt: skip
        """Validated rules (peers as base58 ids or DIDs, normalised to base58 ids; percentages
        0-100; at most :data:`MAX_ENTRIES` entries; a finite clock offset within
        ``MAX_CLOCK_OFFSET``); raises :class:`FaultRulesError`."""
        offset = _clock_offset(clock_offset_seconds, source)
        parts = list(partitioned)
        ins = dict(drop_inbound or {})
        outs = dict(drop_outbound or {})
        if len(parts) + len(ins) + len(outs) > MAX_ENTRIES:
            raise FaultRulesError(source, f"more than {MAX_ENTRIES} entries")
        inbound: dict[str, int] = {}
        outbound: dict[str, int] = {}
        for table, into, key in ((ins, inbound, "drop_inbound"), (outs, outbound, "drop_outbound")):
            for peer, pct in table.items():
                p = _percent(pct, f"{key}[{str(peer)[:60]!r}]", source)
                if p:
                    into[peer_key(peer, source)] = p
        return cls(frozenset(peer_key(p, source) for p in parts), inbound, outbound, offset)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "faults") -> FaultRules:
        """Parse a faults file's content (module docstring); raises :class:`FaultRulesError`."""
        if len(text) > MAX_FILE_BYTES:
            raise FaultRulesError(source, f"over {MAX_FILE_BYTES} bytes")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FaultRulesError(source, f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise FaultRulesError(source, "not a JSON object")
        unknown = sorted(set(doc) - set(KEYS))
        if unknown:
            raise FaultRulesError(source, f"unknown keys {unknown[:5]} (known: {list(KEYS)})")
        parts = doc.get("partitioned", [])
        if not isinstance(parts, list):
            raise FaultRulesError(source, "partitioned: not a list")
        tables = []
        for key in ("drop_inbound", "drop_outbound"):
            table = doc.get(key, {})
            if not isinstance(table, dict):
                raise FaultRulesError(source, f"{key}: not an object")
            tables.append(table)
        return cls.make(parts, tables[0], tables[1], source,
                        doc.get("clock_offset_seconds", 0.0))  # fmt: skip

    def to_json(self) -> str:
        """The rules as a faults file's content (canonical; the clock offset only if set)."""
        doc: dict[str, Any] = {"partitioned": sorted(self.partitioned_peers),
                               "drop_inbound": dict(sorted(self.inbound.items())),
                               "drop_outbound": dict(sorted(self.outbound.items()))}  # fmt: skip
        if self.clock_offset:
            doc["clock_offset_seconds"] = self.clock_offset
        return json.dumps(doc, sort_keys=True)

    @property
    def empty(self) -> bool:
        """No rule: nothing is dropped or refused, the clock is not shifted."""
        return not (self.partitioned_peers or self.inbound or self.outbound or self.clock_offset)

    def partitioned(self, peer: str) -> bool:
        """No traffic with ``peer`` (a base58 peer id) either way."""
        return peer in self.partitioned_peers

    def drop_inbound(self, peer: str, rng: random.Random) -> bool:
        """Drop this message from ``peer``: it is partitioned, or its inbound loss hit."""
        if peer in self.partitioned_peers:
            return True
        pct = self.inbound.get(peer, 0)
        return pct >= 100 or (pct > 0 and rng.randrange(100) < pct)

    def drop_outbound(self, peer: str, rng: random.Random) -> bool:
        """Drop this message to ``peer``: it is partitioned, or its outbound loss hit."""
        if peer in self.partitioned_peers:
            return True
        pct = self.outbound.get(peer, 0)
        return pct >= 100 or (pct > 0 and rng.randrange(100) < pct)


NO_FAULTS = FaultRules()
"""The rules of a node without a faults file."""


class LiveClockOffset:
    """The faults file's ``clock_offset_seconds`` as a running node's wall clock follows it
    (tests and drills only). The node builds its wall clock once with :meth:`shift`; the faults
    loop calls :meth:`follow` with each new rules' offset. A clock function reads
    :attr:`seconds` on every call: a change shows at the next reading, nothing is restarted."""

    def __init__(self) -> None:
        self.seconds = 0.0
        """The live offset now (0: none)."""
        self.changes = 0
        """Times it changed."""

    def shift(self, clock: Callable[[], float]) -> Callable[[], float]:
        """``clock`` plus the live offset (whatever it is when the result is called)."""
        return lambda: clock() + self.seconds

    def follow(self, seconds: float) -> bool:
        """Take ``seconds`` (validated: a finite number within ``MAX_CLOCK_OFFSET``, else
        :class:`FaultRulesError` and no change) as the live offset; True (and a warning logged)
        if it changed."""
        seconds = _clock_offset(seconds, "live clock offset")
        if seconds == self.seconds:
            return False
        log.warning("wall clock jumps by %+g s: live clock offset %g s -> %g s (faults file; "
                    "tests and drills only)", seconds - self.seconds, self.seconds,
                    seconds)  # fmt: skip
        self.seconds = seconds
        self.changes += 1
        return True


def faults_file_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """The test-only faults file :data:`FAULTS_FILE_ENV` names (None: unset or empty); a
    relative path is taken against the current directory."""
    value = (os.environ if environ is None else environ).get(FAULTS_FILE_ENV, "").strip()
    return Path(value).absolute() if value else None


class FaultsFile:
    """A faults file a running node follows: :meth:`poll` re-reads it when its modification
    time (or size, or inode) changed, and keeps the last good rules when it is absent,
    unreadable, half-written or invalid (logging that once, until it is good again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rules: FaultRules = NO_FAULTS
        self.loads = 0
        """Good rules read."""
        self.errors = 0
        """Reads that failed (absent, unreadable, invalid)."""
        self.last_error: str | None = None
        self._seen: tuple[int, int, int] | None = None

    def poll(self) -> FaultRules | None:
        """The new rules if the file changed and parses; None otherwise (never raises)."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._seen is not None or self.last_error is None:
                self._seen = None
                self._fail(f"cannot read {self.path}: {exc.strerror or exc}; keeping the last "
                           "good fault rules")  # fmt: skip
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._seen:
            return None
        self._seen = stamp
        try:
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block the node
                raise FaultRulesError(str(self.path), "not a regular file")
            if st.st_size > MAX_FILE_BYTES:
                raise FaultRulesError(str(self.path), f"over {MAX_FILE_BYTES} bytes")
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
            rules = FaultRules.from_json(data, str(self.path))
        except (OSError, FaultRulesError) as exc:
            self._fail(f"{exc}; keeping the last good fault rules")
            return None
        if self.last_error is not None:
            log.warning("faults file %s is good again", self.path)
        self.last_error = None
        self.loads += 1
        self.rules = rules
        return rules

    def _fail(self, message: str) -> None:
        self.errors += 1
        if message != self.last_error:
            log.warning("%s", message)
        self.last_error = message


def write_rules(path: Path, rules: FaultRules) -> None:
    """Write ``rules`` to ``path`` atomically (a temporary file renamed over it), as a test or
    the nemesis does; the node sees the new modification time within :data:`POLL_SECONDS`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(rules.to_json())
    os.replace(tmp, path)
