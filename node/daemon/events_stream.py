"""The strategy API (issue 18, docs/strategy-api.md): a household's own program places, replaces
and cancels manual orders (plain or curves) for any open slot, reads its orders in open books,
and follows clearings, settlements and its orders' verdicts on ``GET /events`` (server-sent
events).

Parts:

- :class:`EventLog`: a bounded in-memory buffer of this household's events, each with the id
  ``<log index>.<n>`` (the Raft entry that produced it, and its place among that entry's
  events), and the live streams. A client reconnecting with ``Last-Event-ID`` gets what it
  missed from the buffer, or a ``gap`` event when the buffer no longer holds it (or never did:
  entries applied before this process started, or inside a snapshot from the leader). Each
  stream has a bounded queue: a client that does not keep up is dropped (counted), never
  waited for.
- :class:`ManualNonces`: the manual-record nonce pool (node/agent/trader.py), persisted to
  ``<data_dir>/manual_orders.json`` (written and fsynced before a record is signed) together
  with each open slot's current manual order and the orders it replaced or cancelled.
- :class:`StrategyApi`: the handlers (``POST /orders``, ``DELETE /orders``, this household's
  open-book rows for ``GET /orders``, ``GET /events``) and the hook the node calls after each
  applied batch (on the driver's task, like ``_on_batch_applied``): it keeps this household's
  orders in open books, turns events into stream events, and cancels again any withdrawn order
  that reached the book after its cancel (a cancel can commit before the order it names).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from market import CancelOrder, Order, Side
from market.accounting import household_account
from market.bounds import MAX_SLOT
from market.errors import RejectReason
from market.events import (
    Event,
    GateClosed,
    GovernanceAccepted,
    OrderAccepted,
    OrderCancelled,
    Rejected,
    SlotSettled,
)
from market.models import MAX_CURVE_STEPS, Command, curve_problem
from node.agent.trader import (
    NONCE_MANUAL,
    NONCES_PER_SLOT,
    manual_nonce_ceiling,
    max_manual_slot,
    next_pool_nonce,
)
from node.daemon.http_api import ApiError, Request, Stream

if TYPE_CHECKING:
    from node.daemon.household_node import HouseholdNode

log = logging.getLogger(__name__)

EVENT_BUFFER = 256
"""Events kept for clients that reconnect (``Last-Event-ID``): a household has about five
per slot, so 256 cover the last 50 slots (half a day of 15-minute slots)."""
STREAM_QUEUE = 256
"""Events queued for one stream; a stream whose queue is full is dropped."""
KEEPALIVE_SECONDS = 15.0
"""A comment line is sent after this long without an event (proxies and clients see life)."""
STATE_FILE = "manual_orders.json"
MAX_EVENT_ID_CHARS = 40
RESYNC = "GET /orders?household=me&slot=N, /trades?household=me, /statement"
"""Where a client whose stream had a gap reads what it missed."""

EventId = tuple[int, int]


def parse_event_id(text: str) -> EventId:
    """``<index>`` or ``<index>.<n>`` as a pair of integers; ApiError 400 otherwise."""
    index, _, n = text.strip().partition(".")
    if (
        len(text) > MAX_EVENT_ID_CHARS
        or not index.isascii()
        or not index.isdigit()
        or (n and not (n.isascii() and n.isdigit()))
    ):
        raise ApiError(400, f"Last-Event-ID {text[:MAX_EVENT_ID_CHARS]!r} is not "
                            "<index> or <index>.<n>", "bad_event_id")  # fmt: skip
    # a bare index: every event of that entry was seen
    return int(index), int(n) if n else 1 << 62


def format_event_id(event_id: EventId) -> str:
    """The ``id:`` field of an event."""
    return f"{event_id[0]}.{event_id[1]}"


def sse_frame(name: str, data: Mapping[str, Any], event_id: EventId | None = None) -> bytes:
    """One server-sent event: ``id`` (if any), ``event`` and one ``data`` line of JSON."""
    head = "" if event_id is None else f"id: {format_event_id(event_id)}\n"
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return f"{head}event: {name}\ndata: {body}\n\n".encode()


class _Subscriber:
    """One live stream: replayed events first, then its bounded queue."""

    def __init__(self, backlog: list[bytes], queue: int, keepalive: float) -> None:
        self.backlog = deque(backlog)
        self.send, self.recv = trio.open_memory_channel[bytes](queue)
        self.keepalive = keepalive
        self.dropped = False

    async def next(self) -> bytes | None:
        if self.dropped:
            return None
        if self.backlog:
            return self.backlog.popleft()
        with trio.move_on_after(self.keepalive):
            try:
                return await self.recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return None
        return b": keep-alive\n\n"


class EventLog:
    """This household's recent events and the streams that follow them (trio thread only)."""

    def __init__(
        self,
        applied_index: int,
        *,
        size: int = EVENT_BUFFER,
        queue: int = STREAM_QUEUE,
        keepalive: float = KEEPALIVE_SECONDS,
        on_drop: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.covered_from = applied_index
        """Events of every entry after this index were recorded (the index at start)."""
        self.events: deque[tuple[EventId, bytes]] = deque(maxlen=size)
        self.evicted: EventId | None = None
        """The newest event that left the buffer (older ids get a gap event)."""
        self.queue = queue
        self.keepalive = keepalive
        self.on_drop = on_drop
        self.subscribers: set[_Subscriber] = set()
        self.counters: Counter[str] = Counter()

    @property
    def last_id(self) -> EventId | None:
        """The newest event's id (None: none yet)."""
        return self.events[-1][0] if self.events else None

    def publish(self, index: int, name: str, data: Mapping[str, Any]) -> EventId:
        """Record an event of log entry ``index`` and hand it to every live stream; a stream
        whose queue is full is dropped (its client reconnects with Last-Event-ID)."""
        last = self.last_id
        same_entry = last is not None and index <= last[0]
        event_id = (last[0], last[1] + 1) if last is not None and same_entry else (index, 0)
        frame = sse_frame(name, data, event_id)
        if len(self.events) == self.events.maxlen:
            self.evicted = self.events[0][0]
        self.events.append((event_id, frame))
        self.counters[f"event_{name}"] += 1
        for sub in list(self.subscribers):
            try:
                sub.send.send_nowait(frame)
            except trio.WouldBlock:
                self._drop(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(sub)
        return event_id

    def _drop(self, sub: _Subscriber) -> None:
        sub.dropped = True
        self.subscribers.discard(sub)
        sub.send.close()
        self.counters["dropped_slow"] += 1
        self.on_drop("stream_dropped_slow")
        log.info("event stream dropped: the client does not keep up",
                 extra={"event": "stream_dropped"})  # fmt: skip

    def subscribe(self, last: EventId | None, hello: Mapping[str, Any]) -> Stream:
        """A stream: ``hello``, then (with ``last``) the events after it, or a ``gap`` event
        and every buffered one when they are no longer all here; then live events."""
        backlog = [b"retry: 3000\n\n", sse_frame("hello", hello)]
        if last is not None:
            # an id of the entry applied last before this process started may have had more
            # events than the client saw: a (perhaps needless) gap rather than a silent miss
            lost = last[0] <= self.covered_from or (self.evicted is not None
                                                   and last <= self.evicted)  # fmt: skip
            first = self.events[0][0] if self.events else None
            if lost:
                self.counters["gaps"] += 1
                backlog.append(sse_frame("gap", {
                    "reason": "not_buffered", "last_event_id": format_event_id(last),
                    "first_event_id": None if first is None else format_event_id(first),
                    "resync": RESYNC,
                }))  # fmt: skip
            backlog.extend(frame for event_id, frame in self.events if lost or event_id > last)
        sub = _Subscriber(backlog, self.queue, self.keepalive)
        self.subscribers.add(sub)

        def close() -> None:
            self.subscribers.discard(sub)
            sub.send.close()
            sub.recv.close()

        return Stream(sub.next, close)


@dataclasses.dataclass
class ManualNonces:
    """The manual-record nonce pool and the manual orders of open slots, persisted.

    ``next``: the pool's next candidate nonce (every pool nonce below it is spent or
    skipped); ``taken``: slots whose own ``slot * 4 + 3`` a first manual order spent;
    ``current``: each open slot's manual order (the latest placed, not cancelled);
    ``withdrawn``: orders replaced or cancelled (id -> slot), cancelled again should they reach
    the book after their cancel."""

    path: Path
    next: int = 0
    taken: set[int] = dataclasses.field(default_factory=set)
    current: dict[int, str] = dataclasses.field(default_factory=dict)
    withdrawn: dict[str, int] = dataclasses.field(default_factory=dict)
    seq: int = 0
    """States encoded so far (:meth:`save` writes only a newer one than it last wrote)."""
    _written: int = 0
    _write_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @classmethod
    def load(cls, path: Path, floor: int) -> ManualNonces:
        """The state in ``path`` (none yet: empty). A file that cannot be read or is not the
        expected shape is moved aside and the pool restarts at ``floor`` (the highest nonce a
        manual record could have had: nothing below it is signed again)."""
        state = cls(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return state
        except OSError as exc:
            log.error("manual order state unreadable: %s", exc)
            state.next = floor
            return state
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != 1:
                raise ValueError("not a version 1 manual order state")
            state.next = _nonneg(doc["next"])
            state.taken = {_nonneg(s) for s in doc["taken"]}
            state.current = {_nonneg(int(s)): _text(i) for s, i in doc["current"].items()}
            state.withdrawn = {_text(i): _nonneg(s) for i, s in doc["withdrawn"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            aside = path.with_suffix(".corrupt")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.error("manual order state %s is corrupt (moved to %s): the nonce pool restarts "
                      "above every nonce it could have used", path, aside)  # fmt: skip
            return cls(path, next=floor)
        return state

    def prune(self, closed_through: int | None) -> None:
        """Forget slots whose gate has closed (their orders can no longer change)."""
        if closed_through is None:
            return
        self.current = {s: i for s, i in self.current.items() if s > closed_through}
        self.withdrawn = {i: s for i, s in self.withdrawn.items() if s > closed_through}
        low = self.next // NONCES_PER_SLOT
        self.taken = {s for s in self.taken if s >= low}

    def encode(self) -> tuple[bytes, int]:
        """The file's content (canonical JSON) and its sequence number."""
        self.seq += 1
        return json.dumps({
            "version": 1, "next": self.next, "taken": sorted(self.taken),
            "current": {str(s): i for s, i in sorted(self.current.items())},
            "withdrawn": dict(sorted(self.withdrawn.items())),
        }, sort_keys=True).encode(), self.seq  # fmt: skip

    def save(self, data: bytes, seq: int) -> None:
        """Write ``data`` (the state numbered ``seq``) durably: a temporary file, fsync,
        rename, fsync of the directory (a worker thread: never on the trio loop). A write
        abandoned on a timeout that runs after a newer one is skipped, so the file never goes
        back to an older pool position."""
        with self._write_lock:
            if seq <= self._written:
                return
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._written = seq


def _nonneg(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 1 << 62:
        raise ValueError(f"not a non-negative integer: {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise ValueError(f"not an id: {value!r}")
    return value


def order_row(order: Order, status: str, position: int | None = None) -> dict[str, Any]:
    """An own order as ``GET /orders`` shows it (the ledger row's fields, steps a list)."""
    return {
        "slot": order.slot, "order_id": order.id, "position": position,
        "household": order.household, "side": order.side.value,
        "quantity_wh": order.quantity_wh, "price": order.price, "nonce": order.nonce,
        "signature": order.signature, "steps": [list(s) for s in order.steps] or None,
        "status": status,
    }  # fmt: skip


def steps_list(value: Any) -> list[list[int]] | None:
    """A ledger row's ``steps`` (canonical JSON text, or NULL) as a list of [quantity, price]
    (None for a plain order or text that is not such a list)."""
    if value is None or isinstance(value, list):
        return value
    try:
        steps = json.loads(value)
    except (TypeError, ValueError):
        return None
    ok = isinstance(steps, list) and all(
        isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s) for s in steps
    )
    return steps if ok else None


@dataclasses.dataclass(frozen=True, slots=True)
class _OrderRequest:
    side: Side
    slot: int
    quantity_wh: int
    price: int
    steps: tuple[tuple[int, int], ...]
    replace: bool | str


class StrategyApi:
    """Manual orders, this household's open book and the event stream of one node."""

    def __init__(self, node: HouseholdNode) -> None:
        self.node = node
        self.me = node.identity.did
        self.market = node.genesis.market
        self.schedule = node.schedule
        self.log = EventLog(node.replica.applied_index, on_drop=self._count_drop)
        self.book: dict[int, dict[str, Order]] = {}
        """This household's orders in open books (the engine's, after the last batch)."""
        self.published: Mapping[int, tuple[Order, ...]] = {}
        """A frozen copy of :attr:`book` for worker threads."""
        self.queued: dict[str, Order] = {}
        """Manual orders signed and not yet answered by the engine."""
        self.cancels: dict[str, list[float]] = {}
        """Cancels signed and not yet seen in the log, by the order they name (signing time)."""
        self.engine_highest = -1
        """The highest nonce of this household the engine has seen."""
        self.lock = trio.Lock()
        self._reconcile = trio.Event()
        current = self.schedule.slot_at(node.wall_clock())
        floor = manual_nonce_ceiling(current, self.market.nonce_window) + 1
        self.nonces = ManualNonces.load(node.config.data_dir / STATE_FILE, floor)
        self._rescan()
        api = node.api
        api.route("DELETE", "/orders", token=True, ints={"slot": (0, MAX_SLOT)},
                  params={"id"})(self.delete_order)  # fmt: skip
        api.route("GET", "/events", token=False, params={"last_event_id"},
                  stream=True)(self.get_events)  # fmt: skip

    # -- the engine's side (driver task) ------------------------------------------------------

    def _rescan(self) -> None:
        state = self.node.replica.state
        self.book = {}
        for slot, book in state.books.items():
            mine = {i: o for i, o in book.items() if o.household == self.me}
            if mine:
                self.book[slot] = mine
        window = state.nonces.get(self.me)
        self.engine_highest = -1 if window is None else window.highest
        self._publish_book()

    def _publish_book(self) -> None:
        self.published = {s: tuple(b.values()) for s, b in self.book.items() if b}

    def after_batch(
        self, entries: list[tuple[int, list[Event]]], commands: list[Command], installed: bool
    ) -> None:
        """After each applied batch (the driver's task, while no worker applies): keep the own
        book, emit stream events, and schedule cancels of withdrawn orders that are resting."""
        if installed:
            self._rescan()
            self.log.publish(self.node.replica.applied_index, "gap", {
                "reason": "snapshot", "applied_index": self.node.replica.applied_index,
                "resync": RESYNC})  # fmt: skip
        malformed = RejectReason.MALFORMED
        verdicts = [(i, e) for i, events in entries for e in events
                    if not (isinstance(e, Rejected) and e.reason is malformed)]  # fmt: skip
        paired: list[tuple[int, Command | None, Event]]
        if len(verdicts) == len(commands):
            paired = [(i, c, e) for (i, e), c in zip(verdicts, commands, strict=True)]
        else:
            paired = [(i, None, e) for i, events in entries for e in events]
        for command in commands:
            if isinstance(command, CancelOrder) and command.household == self.me:
                sent = self.cancels.get(command.order_id)
                if sent:
                    sent.pop(0)
                if not sent:
                    self.cancels.pop(command.order_id, None)
        for index, command, event in paired:
            self._event(index, command, event)
        window = self.node.replica.state.nonces.get(self.me)
        self.engine_highest = -1 if window is None else window.highest
        closed = self.node.replica.state.closed_through
        self.nonces.prune(closed)
        # a cancel matters while its order is withdrawn (:meth:`_needs_cancel`); without this
        # an entry stayed for every cancel ever signed (issue 19)
        self.cancels = {i: sent for i, sent in self.cancels.items()
                        if sent and i in self.nonces.withdrawn}  # fmt: skip
        if closed is not None:
            for slot in [s for s in self.book if s <= closed]:
                del self.book[slot]
            self.queued = {i: o for i, o in self.queued.items() if o.slot > closed}
        self._publish_book()
        if self._needs_cancel():
            self._reconcile.set()

    def _event(self, index: int, command: Command | None, event: Event) -> None:
        me = self.me
        if isinstance(event, OrderAccepted) and event.order.household == me:
            order = event.order
            self.book.setdefault(order.slot, {})[order.id] = order
            self.queued.pop(order.id, None)
            self.log.publish(index, "order", self._order_event(order, "accepted"))
        elif isinstance(event, OrderCancelled) and event.order.household == me:
            self.book.get(event.order.slot, {}).pop(event.order.id, None)
            self.log.publish(index, "order", {**self._order_event(event.order, "withdrawn"),
                                              "reason": "cancelled"})  # fmt: skip
        elif isinstance(event, GovernanceAccepted):
            for order in event.withdrawn:
                if order.household == me:
                    self.book.get(order.slot, {}).pop(order.id, None)
                    self.log.publish(index, "order", {
                        **self._order_event(order, "withdrawn"), "reason": "governance",
                        "record": event.record.type})  # fmt: skip
        elif (
            isinstance(event, Rejected)
            and event.author == me
            and event.command_type in ("order", "cancel")
        ):
            doc: dict[str, Any] = {"status": "refused", "command": event.command_type,
                                   "reason": event.reason.value, "detail": event.detail,
                                   "order_id": None}  # fmt: skip
            if isinstance(command, Order):
                doc.update(self._order_event(command, "refused"))
                self.queued.pop(command.id, None)
                if self.nonces.current.get(command.slot) == command.id:
                    del self.nonces.current[command.slot]  # a refused order holds no place
            elif isinstance(command, CancelOrder):
                doc["order_id"] = command.order_id
            self.log.publish(index, "order", doc)
        elif isinstance(event, GateClosed):
            self.log.publish(index, "clearing", self._clearing(event))
        elif isinstance(event, SlotSettled):
            self.log.publish(index, "settlement", self._settlement(event))

    def _order_event(self, order: Order, status: str) -> dict[str, Any]:
        return {"status": status, "command": "order", "order_id": order.id, "slot": order.slot,
                "side": order.side.value, "quantity_wh": order.quantity_wh,
                "price": order.price, "steps": [list(s) for s in order.steps] or None,
                "nonce": order.nonce,
                "manual": self.node.trader.is_manual_id(order.id, order.slot)}  # fmt: skip

    def _clearing(self, event: GateClosed) -> dict[str, Any]:
        c, me = event.clearing, self.me
        trades = [{
            "side": "buy" if t.buyer == me else "sell", "buy_id": t.buy_id, "sell_id": t.sell_id,
            "buyer": t.buyer, "seller": t.seller, "quantity_wh": t.quantity_wh,
            "price": t.price, "sell_price": t.sell_price, "part": t.part,
        } for t in event.trades if me in (t.buyer, t.seller)]  # fmt: skip
        return {"slot": event.slot, "price": c.price, "volume_wh": c.volume_wh,
                "bid_volume_wh": c.bid_volume_wh, "ask_volume_wh": c.ask_volume_wh,
                "mechanism": c.mechanism, "orders": len(event.orders),
                "my_orders": sum(o.household == me for o in event.orders),
                "trades": trades}  # fmt: skip

    def _settlement(self, event: SlotSettled) -> dict[str, Any]:
        account = household_account(self.me)
        mine = next((s for s in event.settlements if s.household == self.me), None)
        postings = [{"kind": tx.kind, "ref": tx.ref, "asset": p.asset, "amount": p.amount}
                    for tx in event.transactions for p in tx.postings
                    if p.account == account]  # fmt: skip
        return {
            "slot": event.slot, "height": event.block.height, "block_hash": event.block.hash,
            "settlement": None if mine is None else dataclasses.asdict(mine),
            "money": sum(p["amount"] for p in postings if p["asset"] == "money"),
            "energy_wh": sum(p["amount"] for p in postings if p["asset"] == "energy"),
            "postings": postings,
        }  # fmt: skip

    def _count_drop(self, reason: str) -> None:
        self.node.api.rejections[reason] += 1

    # -- withdrawn orders that reached the book after their cancel -------------------------

    def _cancel_fresh(self, order_id: str) -> bool:
        """A cancel of ``order_id`` was signed within the last slot and is not in the log yet."""
        horizon = self.node.wall_clock() - self.schedule.slot_seconds
        sent = [t for t in self.cancels.get(order_id, []) if t > horizon]
        if sent:
            self.cancels[order_id] = sent
        else:
            self.cancels.pop(order_id, None)
        return bool(sent)

    def _needs_cancel(self) -> list[tuple[int, str]]:
        now = self.node.wall_clock()
        out = []
        for order_id, slot in self.nonces.withdrawn.items():
            resting = order_id in self.book.get(slot, {}) and now < self.schedule.gate_time(slot)
            if resting and not self._cancel_fresh(order_id):
                out.append((slot, order_id))
        return out

    async def run(self) -> None:
        """Cancel again each withdrawn order found resting in its book (a cancel that
        committed before its order, or one gossip refused), while its gate is open."""
        while True:
            await self._reconcile.wait()
            self._reconcile = trio.Event()
            for slot, order_id in self._needs_cancel():
                try:
                    async with self.lock:
                        await self._sign_and_queue(slot, cancel=order_id, order=None)
                except ApiError as exc:
                    log.warning(
                        "withdrawn order not cancelled again: %s",
                        exc.message,
                        extra={"event": "cancel_retry_failed", "order": order_id},
                    )
                else:
                    log.info("withdrawn order reached the book: cancelled again",
                             extra={"event": "cancel_retry", "order": order_id})  # fmt: skip

    # -- signing (under the lock) -------------------------------------------------------------

    def _pool_nonce(self, ceiling: int) -> int:
        start = max(self.nonces.next, self.engine_highest + 1,
                    self.schedule.slot_at(self.node.wall_clock()) * NONCES_PER_SLOT)  # fmt: skip
        nonce = next_pool_nonce(start, self.nonces.taken)
        if nonce > ceiling:
            raise ApiError(
                429,
                "too many manual orders and cancels ahead of time: the "
                "household's nonce window allows more as slots pass (about "
                "two per slot); try again next slot",
                "manual_budget",
            )
        self.nonces.next = nonce + 1
        return nonce

    async def _sign_and_queue(
        self, slot: int, *, cancel: str | None, order: _OrderRequest | None
    ) -> Order | None:
        """Spend nonces (a cancel's first, so it applies before the new order), persist them,
        then sign and queue the records in that order. ApiError 429/503 signs nothing."""
        trader, node = self.node.trader, self.node
        free = node._manual_send.statistics()
        if free.current_buffer_used + 2 > free.max_buffer_size:
            raise ApiError(503, "too many orders queued; try again")
        # on failure nothing is signed; the pool position and taken slots are kept (skipping
        # nonces is harmless), the slot's orders go back to what they were
        before = dict(self.nonces.current), dict(self.nonces.withdrawn)
        ceiling = manual_nonce_ceiling(self.schedule.slot_at(node.wall_clock()),
                                       self.market.nonce_window)  # fmt: skip
        try:
            cancel_nonce = None if cancel is None else self._pool_nonce(ceiling)
            order_nonce = None
            if order is not None:
                own = slot * NONCES_PER_SLOT + NONCE_MANUAL
                if (
                    slot not in self.nonces.taken
                    and own >= self.nonces.next
                    and (own > self.engine_highest and own <= ceiling)
                ):
                    self.nonces.taken.add(slot)
                    order_nonce = own
                else:
                    order_nonce = self._pool_nonce(ceiling)
            if cancel is not None:
                self.nonces.withdrawn[cancel] = slot
                if self.nonces.current.get(slot) == cancel:
                    del self.nonces.current[slot]
            signed = None
            if order is not None and order_nonce is not None:
                signed = trader.sign_manual(slot, order.side, order.quantity_wh, order.price,
                                            order_nonce, order.steps)  # fmt: skip
                self.nonces.current[slot] = signed.id
            await node.api.run_blocking(self.nonces.save, *self.nonces.encode())
        except BaseException:
            self.nonces.current, self.nonces.withdrawn = before
            raise
        records: list[Order | CancelOrder] = []
        if cancel is not None and cancel_nonce is not None:
            records.append(trader.sign_cancel(cancel, cancel_nonce))
            self.cancels.setdefault(cancel, []).append(node.wall_clock())
        if signed is not None:
            records.append(signed)
            self.queued[signed.id] = signed
        for record in records:
            node._manual_send.send_nowait(record)  # room checked above, no checkpoint since
        return signed

    # -- handlers -----------------------------------------------------------------------------

    def current_manual(self, slot: int) -> str | None:
        """The id of this household's manual order in ``slot`` (placed, not cancelled)."""
        current = self.nonces.current.get(slot)
        if current is not None:
            return current
        trader = self.node.trader
        for order_id in self.book.get(slot, {}):
            if trader.is_manual_id(order_id, slot) and order_id not in self.nonces.withdrawn:
                return order_id
        return None

    def _parse_order(self, req: Request) -> _OrderRequest:
        body = req.json()
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object")
        steps_raw = body.get("steps")
        try:
            side = Side(body["side"])
            if steps_raw is None:
                qty, price = body["quantity_wh"], body["price"]
            else:
                qty, price = body.get("quantity_wh"), body.get("price")
        except (KeyError, ValueError, TypeError) as exc:
            raise ApiError(400, f"side (buy|sell), quantity_wh and price are required: {exc}"
                           ) from None  # fmt: skip
        slot = body.get("slot", self.schedule.open_slot(self.node.wall_clock()))
        steps: tuple[tuple[int, int], ...] = ()
        if steps_raw is not None:
            if not isinstance(steps_raw, list) or not all(
                isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s)
                for s in steps_raw
            ):
                raise ApiError(400, "steps must be a list of [quantity_wh, price] integer pairs")
            if not 2 <= len(steps_raw) <= MAX_CURVE_STEPS:
                raise ApiError(
                    400,
                    f"a curve has 2 to {MAX_CURVE_STEPS} steps, not "
                    f"{len(steps_raw)} (one step: send quantity_wh and price)",
                )
            steps = tuple((q, p) for q, p in steps_raw)
            qty = sum(q for q, _ in steps) if qty is None else qty
            price = steps[0][1] if price is None else price
        if not all(type(v) is int for v in (qty, price, slot)):
            raise ApiError(400, "quantity_wh, price and slot must be integers")
        replace = body.get("replace", False)
        if not isinstance(replace, bool | str):
            raise ApiError(400, "replace must be true, false or the id of the order replaced")
        unknown = sorted(set(body) - {"side", "quantity_wh", "price", "slot", "steps", "replace"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0][:40]!r}")
        return _OrderRequest(side, slot, qty, price, steps, replace)

    def _check_order(self, o: _OrderRequest) -> None:
        """Today's limits and reasons (docs/node.md, "POST /orders"), per step for a curve."""
        market, node = self.market, self.node
        if not 0 < o.quantity_wh <= market.max_order_wh:
            raise ApiError(400, f"quantity_wh must be in 1..{market.max_order_wh}")
        for i, (q, _) in enumerate(o.steps):
            if not 0 < q <= market.max_order_wh:
                raise ApiError(400, f"step {i} quantity_wh must be in 1..{market.max_order_wh}")
        problem = curve_problem(o.side, o.quantity_wh, o.price, o.steps)
        if problem is not None:
            raise ApiError(400, problem)
        if not 0 <= o.slot <= MAX_SLOT:
            raise ApiError(400, f"slot must be in 0..{MAX_SLOT}")
        engine = node.engine_snapshot()
        band = engine.band(o.slot)
        if not band.feed_in <= o.price <= band.retail:
            raise ApiError(400, f"price must be in {band.feed_in}..{band.retail} in slot {o.slot}")
        for i, (_, p) in enumerate(o.steps):
            if not band.feed_in <= p <= band.retail:
                raise ApiError(400, f"step {i} price must be in {band.feed_in}..{band.retail} "
                                    f"in slot {o.slot}")  # fmt: skip
        term = engine.term(self.me, o.slot)
        if term is None or not term.active:
            standing = "not a member" if term is None else term.status.value
            raise ApiError(409, f"not_active: this household is {standing} in slot {o.slot}")
        if market.rules >= 2 and engine.silent_slots >= market.max_silent_slots:
            raise ApiError(409, f"meter_silent: no reading of this household's meter for "
                                f"{engine.silent_slots} settled slots; orders are refused until "
                                "one is accepted")  # fmt: skip
        limit = engine.sell_limit_wh
        if o.side == Side.SELL and limit is not None and o.quantity_wh > limit:
            raise ApiError(409, f"over_sell_limit: this household may offer at most "
                                f"{limit} Wh per slot (its delivery record)")  # fmt: skip
        self._check_gate(o.slot)
        now = node.wall_clock()
        last = min(self.schedule.last_due_gate(now) + market.slot_horizon,
                   max_manual_slot(self.schedule.slot_at(now), market.nonce_window))  # fmt: skip
        if o.slot > last:
            raise ApiError(400, f"slot {o.slot} is too far ahead (orders go up to slot {last})")

    def _check_gate(self, slot: int) -> None:
        if self.node.wall_clock() >= self.schedule.gate_time(slot):
            raise ApiError(409, f"the gate of slot {slot} has closed")

    async def post_order(self, req: Request) -> Any:
        """``POST /orders``: a manual order or curve for an open slot, checked, signed and
        queued; with ``replace`` it replaces the slot's manual order (a cancel of the old one
        is signed and queued first)."""
        o = self._parse_order(req)
        self._check_order(o)
        async with self.lock:
            self._check_gate(o.slot)  # time passed while waiting for the lock
            current = self.current_manual(o.slot)
            if current is not None and o.replace is False:
                raise ApiError(
                    409,
                    f"a manual order for slot {o.slot} is already placed (one "
                    f'per slot: send "replace": true to replace {current})',
                )
            if isinstance(o.replace, str) and o.replace != current:
                raise ApiError(
                    409,
                    f"replace names {o.replace[:128]!r}, but the manual order "
                    f"of slot {o.slot} is {current!r}",
                    "conflict",
                )
            cancel = current if current is not None and self._needs_cancel_of(current) else None
            if current is not None and cancel is None:
                self.nonces.withdrawn[current] = o.slot
            signed = await self._sign_and_queue(o.slot, cancel=cancel, order=o)
        assert signed is not None
        answer: dict[str, Any] = {"queued": signed.id, "slot": o.slot}
        if current is not None:
            answer["replaced"] = current
        return answer

    def _needs_cancel_of(self, order_id: str) -> bool:
        """Whether the order may rest in its book (in it, or not answered by the engine yet)."""
        return order_id in self.queued or any(order_id in b for b in self.book.values())

    async def delete_order(self, req: Request) -> Any:
        """``DELETE /orders?slot=N`` (the slot's manual order) or ``?id=ID`` (any own order in
        an open book, the agent's too): signs and queues a cancel."""
        slot, order_id = req.ints.get("slot"), req.query.get("id")
        if (slot is None) == (order_id is None):
            raise ApiError(400, "give either slot or id")
        async with self.lock:
            if order_id is None:
                assert slot is not None
                order_id = self.current_manual(slot)
                if order_id is None:
                    raise ApiError(404, f"no manual order of this household in slot {slot}")
            else:
                found = next((o for o in [*self.queued.values(),
                                          *(o for b in self.book.values() for o in b.values())]
                              if o.id == order_id), None)  # fmt: skip
                if found is None:
                    raise ApiError(404, f"no open order {order_id[:128]!r} of this household")
                slot = found.slot
            self._check_gate(slot)
            if not self._needs_cancel_of(order_id):  # refused, or cancelled already
                self.nonces.current.pop(slot, None)
                self.nonces.withdrawn[order_id] = slot
                await self.node.api.run_blocking(self.nonces.save, *self.nonces.encode())
                return {"cancelled": order_id, "slot": slot, "cancel_queued": False}
            await self._sign_and_queue(slot, cancel=order_id, order=None)
        return {"cancelled": order_id, "slot": slot, "cancel_queued": True}

    def open_rows(self, slot: int) -> list[dict[str, Any]]:
        """This household's orders in the open book of ``slot`` and its manual order still
        on its way (status ``queued``); safe from a worker thread (frozen copies)."""
        rows = [order_row(o, "open") for o in self.published.get(slot, ())]
        seen = {r["order_id"] for r in rows}
        rows += [order_row(o, "queued") for o in list(self.queued.values())
                 if o.slot == slot and o.id not in seen]  # fmt: skip
        return rows

    def get_events(self, req: Request) -> Stream:
        """``GET /events``: this household's events as server-sent events (open: only its own
        rows and the public clearing figures, like the ``household=me`` views)."""
        text = req.headers.get("last-event-id") or req.query.get("last_event_id")
        last = None if not text else parse_event_id(text)
        node = self.node
        last_id = self.log.last_id
        hello = {"household": self.me, "applied_index": node.replica.applied_index,
                 "open_slot": self.schedule.open_slot(node.wall_clock()),
                 "slot_seconds": self.schedule.slot_seconds,
                 "last_event_id": None if last_id is None else format_event_id(last_id),
                 "server_time": time.time()}  # fmt: skip
        return self.log.subscribe(last, hello)


def with_steps_lists(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ledger order rows with ``steps`` parsed into a list."""
    return [{**r, "steps": steps_list(r.get("steps"))} for r in rows]
