"""Block sync's task: fill the ledger's gaps from connected members.

A node that installed a Raft snapshot from its leader holds the engine state of the snapshot but
not the ledger blocks it skipped; the snapshot recorded those heights as gaps
(:mod:`node.ledger.gaps`). :class:`BlockFiller` asks connected members for them over
``/microgrid/blocks/1`` (:func:`node.net.block_sync.fetch_blocks`) and imports each chunk only
after it is checked against the chain on both sides of the gap
(:func:`node.ledger.chunk_import.import_blocks`). The household node and the operator node both
run one.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import trio

from node.ledger import LedgerStore
from node.ledger.chunk import BlockSyncError
from node.ledger.chunk_import import import_blocks
from node.ledger.gaps import missing_ranges
from node.ledger.store import LedgerStoreError
from node.net.block_sync import FetchError, fetch_blocks
from node.net.host import NetNode

log = logging.getLogger("microgrid.node")

BLOCK_SYNC_IDLE_SECONDS = 60.0
"""How long a node without gaps waits before it checks its ledger for one anyway. Gaps appear
when a Raft snapshot from the leader is installed, and the node wakes block sync right then
(:meth:`BlockFiller.wake`); this re-check is only a bound on that wait."""
BLOCK_SYNC_RETRY_SECONDS = 2.0
"""Pause after a round in which no member could give the missing blocks."""


class BlockFiller:
    """Fills ``store``'s gaps from ``net``'s connected members, counting what happens in
    ``counters`` (``block_fetch_<reason>``, ``block_import_<reason>``,
    ``block_import_local_error``, ``block_chunks_synced``)."""

    def __init__(self, store: LedgerStore, net: NetNode, counters: Counter[str]) -> None:
        self.store = store
        self.net = net
        self.counters = counters
        self._wake = trio.Event()

    def wake(self) -> None:
        """The ledger may have a new gap (a snapshot was installed): look at once."""
        self._wake.set()

    async def run(self) -> None:
        """Forever: read the gaps; ask connected members, in random order, for the first one;
        a peer that cannot give it or sends a bad chunk is skipped for the round and counted."""
        while True:
            # a fresh event before reading: a snapshot installed during the read wakes us again
            wake = self._wake = trio.Event()
            gaps = await trio.to_thread.run_sync(missing_ranges, self.store)
            if not gaps:
                with trio.move_on_after(BLOCK_SYNC_IDLE_SECONDS):
                    await wake.wait()
                continue
            first, last = gaps[0]
            peers = [p for p in self.net.connected_peers()
                     if str(p) in self.net.member_peers]  # fmt: skip
            random.shuffle(peers)
            for peer in peers:
                try:
                    data = await fetch_blocks(self.net.host, peer, first, last)
                    remaining = await trio.to_thread.run_sync(self._import, data)
                except FetchError as exc:
                    self.counters[f"block_fetch_{exc.reason}"] += 1
                    log.info("block fetch failed", extra={"event": "block_fetch_failed",
                             "peer": str(peer), "first": first, "reason": exc.reason})  # fmt: skip
                    continue
                except LedgerStoreError as exc:  # our own database, not the peer's chunk
                    self.counters["block_import_local_error"] += 1
                    log.error("block import failed locally", extra={
                        "event": "block_import_failed", "error": str(exc)})  # fmt: skip
                    await trio.sleep(BLOCK_SYNC_RETRY_SECONDS)
                    break
                except BlockSyncError as exc:
                    self.counters[f"block_import_{exc.reason}"] += 1
                    log.warning("blocks from a peer refused", extra={
                        "event": "block_import_refused", "peer": str(peer), "first": first,
                        "reason": exc.reason, "detail": str(exc)})  # fmt: skip
                    continue
                self.counters["block_chunks_synced"] += 1
                log.info("blocks synced", extra={
                    "event": "blocks_synced", "peer": str(peer), "first": first,
                    "remaining": [list(r) for r in remaining]})  # fmt: skip
                break
            else:
                await trio.sleep(BLOCK_SYNC_RETRY_SECONDS)

    def _import(self, data: bytes) -> list[tuple[int, int]]:
        with self.store.write_lock:
            return import_blocks(self.store, data)
