"""Ledger blocks between members over the libp2p stream protocol ``/microgrid/blocks/1``.

A node that installed a Raft snapshot (it fell behind a compacted log) has a gap in its ledger:
the engine continued from the snapshot, the blocks in between were never applied here. It asks a
connected member for them, a chunk at a time, and imports what it gets only after checking it
(:func:`node.ledger.chunk_import.import_blocks`: hashes, signatures, roots, chain, balances):
a peer cannot make it accept a block that is not the grid's.

One request per stream, both frames varint-length-prefixed (``node.net.wire.frame``):

- request: canonical JSON ``{"first": a, "last": b}`` (at most ``MAX_REQUEST_BYTES``);
- response: one status byte, then ``0``: the chunk (``node.ledger.chunk_export.export_blocks``,
  format in :mod:`node.ledger.chunk`), or ``1``: a UTF-8 reason (``not_available: ...``,
  ``refused: ...``).

Only members may ask (the authenticated peer id is the household's key). The server reads its
ledger in a worker thread and answers within ``SERVE_TIMEOUT``. A malformed or oversized
request is refused and then reported as a :class:`~node.net.validator.PeerFault` (the host's
stream guard counts and penalises it).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from market.bounds import SAFE_INT
from market.did import IdentityError
from node.ledger.chunk import MAX_CHUNK_BYTES, BlockSyncError
from node.ledger.chunk_export import export_blocks
from node.net.validator import PeerFault
from node.net.wire import frame
from node.setup.keyfile import did_from_peer_id

log = logging.getLogger("microgrid.net.blocks")

BLOCKS_PROTOCOL = "/microgrid/blocks/1"
BLOCKS_PROTOCOL_ID = TProtocol(BLOCKS_PROTOCOL)
MAX_REQUEST_BYTES = 256
MAX_RESPONSE_BYTES = MAX_CHUNK_BYTES + 1024
SERVE_TIMEOUT = 30.0
OK, ERROR = 0, 1


class FetchError(Exception):
    """A peer did not deliver the requested blocks; ``reason`` is short and stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_request(first: int, last: int) -> bytes:
    """The request frame's payload."""
    return json.dumps({"first": first, "last": last}, sort_keys=True,
                      separators=(",", ":")).encode()  # fmt: skip


def decode_request(data: bytes) -> tuple[int, int]:
    """``(first, last)`` of a request; ValueError if it is not exactly that.

    Heights are bounded to what the ledger can hold (``market.bounds.SAFE_INT``), so a request
    for block 2**64 is refused here instead of overflowing the database query.
    """
    if len(data) > MAX_REQUEST_BYTES:
        raise ValueError(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
    doc = json.loads(data)
    if not isinstance(doc, dict) or set(doc) != {"first", "last"}:
        raise ValueError("expected {first, last}")
    first, last = doc["first"], doc["last"]
    if type(first) is not int or type(last) is not int or not 1 <= first <= last <= SAFE_INT:
        raise ValueError(f"first and last must be integers with 1 <= first <= last <= {SAFE_INT}")
    return first, last


class BlockServer:
    """Answers other members' block requests from this node's ledger."""

    def __init__(self, export: Callable[[int, int], bytes], allowed: Callable[[str], bool]) -> None:
        self.export = export
        self.allowed = allowed
        self.served = 0
        self.refused: dict[str, int] = {}

    def register(self, host: Any) -> None:
        """Install the stream handler on a libp2p host."""
        host.set_stream_handler(BLOCKS_PROTOCOL_ID, self.handle)

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def handle(self, stream: Any) -> None:
        """One request, one response, then close.

        A malformed or oversized request is answered with a refusal and then raises
        :class:`~node.net.validator.PeerFault` (after the stream is closed), for the host's
        stream guard to count against the peer and penalise.
        """
        fault: PeerFault | None = None
        try:
            with trio.move_on_after(SERVE_TIMEOUT):
                fault = await self._serve(stream)
        except Exception as exc:  # the requester went away: nothing to answer
            log.debug("block request failed: %s", exc)
        finally:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await stream.close()
        if fault is not None:
            raise fault

    async def _serve(self, stream: Any) -> PeerFault | None:
        """Answer one request; the fault to report if the request broke the protocol."""
        try:
            did = did_from_peer_id(stream.muxed_conn.peer_id)
        except IdentityError:
            did = ""
        if not did or not self.allowed(did):
            self._refuse("not_member")
            await stream.write(frame(bytes([ERROR]) + b"refused: not a member"))
            return None
        try:
            first, last = decode_request(
                await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST_BYTES)
            )
        except (ValueError, ParseError, MessageTooLarge) as exc:
            self._refuse("malformed")
            await stream.write(frame(bytes([ERROR]) + f"refused: {exc}".encode()))
            return PeerFault("blocks", "malformed_request", f"{type(exc).__name__}: {exc}")
        try:
            chunk = await trio.to_thread.run_sync(self.export, first, last)
        except BlockSyncError as exc:
            self._refuse(exc.reason)
            await stream.write(frame(bytes([ERROR]) + f"{exc.reason}: {exc}".encode()))
            return None
        await stream.write(frame(bytes([OK]) + chunk))
        self.served += 1
        return None


def store_exporter(store: Any) -> Callable[[int, int], bytes]:
    """``export(first, last)`` over a :class:`~node.ledger.LedgerStore`."""
    return lambda first, last: export_blocks(store, first, last)


async def fetch_blocks(host: Any, peer: ID, first: int, last: int, timeout: float = 20.0) -> bytes:
    """Ask ``peer`` for blocks ``first..last``; the chunk it sent (maybe fewer blocks), unchecked.

    Raises :class:`FetchError` (``no_stream``, ``closed``, ``timeout``, ``refused``,
    ``not_available``, ``malformed``) instead of the libp2p error.
    """
    stream = None
    try:
        with trio.fail_after(timeout):
            try:
                stream = await host.new_stream(peer, [BLOCKS_PROTOCOL_ID])
            except Exception as exc:
                raise FetchError("no_stream", str(exc)) from None
            try:
                await stream.write(frame(encode_request(first, last)))
            except Exception as exc:  # reset by the peer, or its connection closed meanwhile
                raise FetchError("closed", f"sending the request: {exc}") from None
            try:
                data = await read_varint_prefixed_bytes_limited(stream, MAX_RESPONSE_BYTES)
            except Exception as exc:
                raise FetchError("malformed", f"bad response frame: {exc}") from None
    except trio.TooSlowError:
        raise FetchError("timeout", f"no answer within {timeout:.0f} s") from None
    finally:
        if stream is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1.0),
                contextlib.suppress(Exception),
            ):
                await stream.close()
    if not data:
        raise FetchError("malformed", "empty response")
    if data[0] == OK:
        return bytes(data[1:])
    text = bytes(data[1:]).decode(errors="replace")
    reason = text.partition(":")[0] if data[0] == ERROR else "malformed"
    raise FetchError(reason if reason in ("refused", "not_available") else "refused", text)
