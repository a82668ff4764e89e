"""Which gossip rejections to write to the log, and how many were left out (pure: no I/O).

Every rejected message is counted (metrics and the status document's ``invalid_messages``), but
a count does not say what was wrong. The log line does: the reason, the validator's detail (the
record and nonce, the slot policy, the member that is not one) and the forwarding peer. A
hostile or broken peer can send thousands of bad messages a second, so per (reason, forwarder)
the first rejection is logged and then at most one per ``interval`` seconds, carrying the number
left out since the last line. The keys are bounded: past ``max_keys`` the oldest is forgotten
(its next rejection is logged again as a first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    logged_at: float
    suppressed: int = 0


class RejectionLog:
    """Rate limit for rejection log lines, per (reason, forwarder)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if interval < 0 or max_keys < 1:
            raise ValueError("interval must be >= 0 and max_keys >= 1")
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}

    def admit(self, reason: str, forwarder: str) -> int | None:
        """None: leave this rejection out of the log (it is counted for the next line).
        Otherwise log it; the number is how many of this key were left out before it."""
        key = (reason, forwarder)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_keys:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = _Entry(now)
            return 0
        if now - entry.logged_at < self.interval:
            entry.suppressed += 1
            return None
        left_out, entry.logged_at, entry.suppressed = entry.suppressed, now, 0
        return left_out
