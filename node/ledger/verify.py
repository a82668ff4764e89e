"""Recompute a ledger from its raw tables and report the first fault.

Checks, block by block in height order: heights are contiguous from 1; each block points to the
previous block's hash (the first to the genesis hash in ``meta``); every transaction's id matches
its postings and its postings sum to zero per asset; the block's transaction, trade and reading
Merkle roots; every reading's signature; the state hash over the running balances; in a grid with
a feeder meter (``feeder_serial`` in the market rules in ``meta``), the block's ``feeder_checks``
row: the feeder reading's operator signature, and the check recomputed from that reading, the
previous block's and the slot's ``settlements`` rows; the block's own hash, with the row's hash
as its ``feeder`` field; each ``true_ups`` row against the ``true_up`` transaction of its block
and household (energy legs, and the money the grid's tariffs give for its unmeasured slots);
the block's grid-fee transactions (``local_fee``, ``grid_fee``) against its ``settlements`` and
``true_ups`` rows at the fees in force for its slot.
Finally the ``balances`` table must equal the sum of all postings (and no feeder row may lie
outside the blocks).

**Conservation** (grids with ``rules >= 2``, a complete ledger: docs/ledger.md, "Unmeasured
slots"): for every household, the energy its account settled (``energy`` balance, import −
export) equals its counters' movement between its first and last readings in the ``readings``
table (summed over consecutive readings of the same meter: a replaced meter starts afresh, a
restarted one counts from zero), and the import and export settled (measured ``settlements``
plus ``true_ups``) equal the two counters' movements. The per-household figures are in
:attr:`VerifyReport.households`.

A ledger with a block-sync gap (``meta.block_sync_needed``, left by an installed Raft snapshot,
see :mod:`node.ledger.gaps`) is verified up to the first missing height and then reported as
incomplete ("blocks 5..9 missing: block sync pending"); once the gap is filled it verifies whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from market.accounting import (
    ASSETS,
    ENERGY,
    Block,
    Posting,
    Transaction,
    household_account,
    roots,
    state_hash,
)
from market.config import MarketConfigError
from market.did import verify_signature
from market.feeder import FeederCheck, HouseholdFlow, feeder_check
from market.governance import Governance
from market.models import FeederReading, GovernanceRecord, MeterReading, RotateKey, Trade
from market.settlement import Gap, Tariffs, fee_transactions, true_up_transaction
from market.snapshot import SnapshotError, config_from_json
from market.state import MarketConfig, reading_leaf
from node.ledger import schema as t
from node.ledger.governance import (
    decode_record,
    fold,
    governance_row,
    rotation_ref,
    rules_hash_at,
)
from node.ledger.queries import block_columns, has_governance_table, has_true_up_table
from node.ledger.store import make_engine

SYNC_NEEDED_KEY = "block_sync_needed"
"""Meta key listing the heights a block sync still has to fill, e.g. ``5..9,14..20``."""


class LedgerFault(Exception):
    """The first inconsistency found, with where it is."""


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"5..9,14..20"`` -> ``[(5, 9), (14, 20)]``; empty text is no range.

    Ranges must be ascending, ``1 <= first <= last``, and separated by at least one height.
    Raises ValueError otherwise.
    """
    ranges: list[tuple[int, int]] = []
    for part in text.split(",") if text else []:
        m = re.fullmatch(r"([1-9][0-9]*)\.\.([1-9][0-9]*)", part)
        if m is None:
            raise ValueError(f"bad range {part!r} (expected FIRST..LAST)")
        first, last = int(m[1]), int(m[2])
        if first > last or (ranges and first <= ranges[-1][1] + 1):
            raise ValueError(f"range {part!r} is empty, overlaps or touches the one before")
        ranges.append((first, last))
    return ranges


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    """Inverse of :func:`parse_ranges`."""
    return ",".join(f"{a}..{b}" for a, b in ranges)


def pending_ranges(meta: dict[str, str]) -> list[tuple[int, int]]:
    """The block-sync gaps recorded in ``meta``; LedgerFault if the entry is unreadable."""
    try:
        return parse_ranges(meta.get(SYNC_NEEDED_KEY, ""))
    except ValueError as exc:
        raise LedgerFault(f"meta {SYNC_NEEDED_KEY} is unreadable: {exc}") from None


@dataclass(frozen=True, slots=True)
class HouseholdConservation:
    """One household's energy over a ledger: what its meter's counters moved between its first
    and last readings, and what the ledger settled (docs/ledger.md, "Unmeasured slots")."""

    household: str
    first_reading_slot: int | None
    """Slot of its first reading in the ``readings`` table (None: it has none)."""
    last_reading_slot: int | None
    import_moved_wh: int
    """Import counter's rise between its first and last readings (per meter: a replaced meter's
    first reading is a new baseline)."""
    export_moved_wh: int
    energy_settled_wh: int
    """Its account's ``energy`` balance: energy received (bought, imported) − given."""
    measured_slots: int
    """Settled slots with a usable reading (``settlements.measured``)."""
    unmeasured_slots: int
    """Settled slots without one: estimated zero, trued up at its next reading."""
    true_ups: int
    """``true_ups`` rows of the household."""
    true_up_slots: int
    """Unmeasured slots those true-ups covered."""
    true_up_import_wh: int
    true_up_export_wh: int
    settled_import_wh: int
    """Import settled on measured slots plus true-ups."""
    settled_export_wh: int

    @property
    def moved_net_wh(self) -> int:
        """Net import the counters moved: what the energy balance must equal."""
        return self.import_moved_wh - self.export_moved_wh

    @property
    def conserved(self) -> bool:
        """Settled energy equals the counters' movement (net, and each counter)."""
        return (
            self.energy_settled_wh == self.moved_net_wh
            and self.settled_import_wh == self.import_moved_wh
            and self.settled_export_wh == self.export_moved_wh
        )


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of :func:`verify_ledger`."""

    ok: bool
    height: int
    head_hash: str | None
    blocks: int
    transactions: int
    error: str | None = None
    missing: tuple[tuple[int, int], ...] = ()
    """Block-sync gaps recorded in the ledger (``ok`` is False while there are any)."""
    conservation: str = "not_checked"
    """The conservation check: ``ok``, ``failed``, ``skipped`` (a block-sync gap, or a grid
    with rules 1: see :attr:`conservation_note`) or ``not_checked`` (verification stopped
    before it)."""
    conservation_note: str | None = None
    """Why the conservation check was skipped, or what it found."""
    households: tuple[HouseholdConservation, ...] = ()
    """Per-household figures of the conservation check (when it ran), by DID."""
    rules: int | None = None
    """The market rules' version in the ledger's meta (None: no readable config)."""
    governance_records: int = 0
    """Governance records checked (``governance`` rows)."""


def verify_ledger(url: str) -> VerifyReport:
    """Verify the ledger at ``url`` (read-only). Never raises for a bad ledger: it reports.

    After the chain, a complete ledger of a grid with ``rules >= 2`` gets the conservation
    check (:func:`conservation`): a household whose settled energy differs from its counters'
    movement fails verification, naming the household and both figures."""
    engine = make_engine(url, read_only=True)
    counts = {"blocks": 0, "transactions": 0, "height": 0, "governance": 0}
    head: list[str | None] = [None]
    missing: tuple[tuple[int, int], ...] = ()
    rules: int | None = None
    note: str | None = None
    figures: tuple[HouseholdConservation, ...] = ()
    try:
        with engine.connect() as conn:
            meta = {row.key: row.value for row in conn.execute(select(t.meta))}
            missing = tuple(pending_ranges(meta))
            config = _config(meta)
            rules = None if config is None else config.rules
            if missing:
                note = f"skipped: blocks {_gap_list(list(missing))} missing (block sync pending)"
            elif config is None or config.rules < 2:
                note = "skipped: rules 1 grid (unmeasured slots are not trued up)"
            else:
                note = None
            balances = _verify(conn, counts, head)
            if note is None:
                figures = conservation(conn, balances, _governance(conn, config)[1])
                _check_conservation(figures)
    except LedgerFault as fault:
        state = "not_checked"
        if figures:
            state = "failed"
        elif missing:
            state = "skipped"
        return VerifyReport(
            False,
            counts["height"],
            head[0],
            counts["blocks"],
            counts["transactions"],
            str(fault),
            missing,
            state,
            note if state == "skipped" else None,
            figures,
            rules,
            counts["governance"],
        )
    except SQLAlchemyError as exc:
        msg = f"cannot read ledger tables at {url}: {exc.__class__.__name__}: {exc.args[0]}"
        return VerifyReport(False, 0, None, 0, 0, msg)
    finally:
        engine.dispose()
    if note is None:
        state = "ok"
        note = f"{len(figures)} households: settled energy equals their meters' movement"
    else:
        state = "skipped"
    return VerifyReport(
        True,
        counts["height"],
        head[0],
        counts["blocks"],
        counts["transactions"],
        conservation=state,
        conservation_note=note,
        households=figures,
        rules=rules,
        governance_records=counts["governance"],
    )


def _verify(
    conn: Connection,
    counts: dict[str, int],
    head: list[str | None],
    upto: int | None = None,
    start: int = 1,
) -> dict[tuple[str, str], int]:
    """Verify blocks ``start..upto`` (to the last block when None), raising :class:`LedgerFault`;
    the running balances after the last block verified (every account's, by asset).

    With ``upto`` the blocks up to it must all exist and verify; what follows them (more blocks,
    the ``balances`` table, which also holds later postings) is not looked at. Without it, a
    ledger whose meta records a block-sync gap is verified up to the gap and then reported as
    incomplete; a complete ledger gets the end-of-ledger checks too. ``start`` > 1 trusts the
    blocks before it (block sync: verified when they were imported): the chain continues from
    block ``start - 1``'s hash and the running balances from the sum of their postings.
    """
    meta = {row.key: row.value for row in conn.execute(select(t.meta))}
    if "genesis_hash" not in meta:
        raise LedgerFault("meta table has no genesis_hash: not a microgrid ledger")
    prev_hash = meta["genesis_hash"]
    config = _config(meta)
    feeder_config = config if config is not None and config.has_feeder else None
    records, gov = _governance(conn, config)
    counts["governance"] = len(records)
    rotations: dict[int, list[RotateKey]] = {}
    for rot in gov.rotations:
        rotations.setdefault(rot.from_slot, []).append(rot)
    if feeder_config is None:
        stray = conn.execute(select(t.feeder_checks.c.block_height).limit(1)).scalar()
        if stray is not None:
            raise LedgerFault(f"block {stray}: a feeder check row in a grid without a feeder meter")
    feeder_rows = 0
    feeder_baseline: FeederReading | None = None
    balances: dict[tuple[str, str], int] = {}
    pending = pending_ranges(meta) if upto is None else []
    limit = upto if upto is not None else (pending[0][0] - 1 if pending else None)
    if start > 1:
        before = conn.execute(select(t.blocks.c.hash).where(t.blocks.c.height == start - 1))
        prev_hash = before.scalar()
        if prev_hash is None:
            raise LedgerFault(f"block {start - 1}, where verification starts, is missing")
        if feeder_config is not None:
            before_row = conn.execute(
                select(t.feeder_checks).where(t.feeder_checks.c.block_height == start - 1)
            ).first()
            if before_row is not None:
                feeder_baseline = _feeder_reading(before_row, feeder_config, f"block {start - 1}")
        p, tx = t.postings.c, t.transactions.c
        for row in conn.execute(
            select(p.account, p.asset, func.sum(p.amount).label("amount"))
            .join(t.transactions, p.transaction_id == tx.id)
            .where(tx.block_height < start)
            .group_by(p.account, p.asset)
        ):
            balances[(row.account, row.asset)] = int(row.amount)

    tx_query = select(t.transactions).order_by(
        t.transactions.c.block_height, t.transactions.c.position
    )
    posting_query = (
        select(t.postings, t.transactions.c.block_height)
        .join(t.transactions, t.postings.c.transaction_id == t.transactions.c.id)
        .order_by(t.transactions.c.block_height, t.transactions.c.position, t.postings.c.position)
    )
    block_query = select(*block_columns(conn)).order_by(t.blocks.c.height)
    if start > 1:
        tx_query = tx_query.where(t.transactions.c.block_height >= start)
        posting_query = posting_query.where(t.transactions.c.block_height >= start)
        block_query = block_query.where(t.blocks.c.height >= start)
    if limit is not None:
        tx_query = tx_query.where(t.transactions.c.block_height <= limit)
        posting_query = posting_query.where(t.transactions.c.block_height <= limit)
        block_query = block_query.where(t.blocks.c.height <= limit)
    true_ups = _true_up_rows(conn, start, limit)
    tx_rows = conn.execute(tx_query)
    posting_rows = conn.execute(posting_query)
    txs_by_block = groupby(tx_rows, key=lambda r: r.block_height)
    postings_by_tx = groupby(posting_rows, key=lambda r: r.transaction_id)
    next_txs = next(txs_by_block, None)
    next_postings = next(postings_by_tx, None)

    trade_columns = t.present_columns(conn, t.trades)  # ``part`` only in a newer ledger
    expected_height = start
    for row in conn.execute(block_query):
        where = f"block {row.height} (slot {row.slot})"
        if row.height != expected_height:
            raise LedgerFault(f"block heights jump from {expected_height - 1} to {row.height}")
        if row.prev_hash != prev_hash:
            raise LedgerFault(
                f"{where}: broken chain: prev_hash {row.prev_hash[:16]}… "
                f"but the previous block hashes to {prev_hash[:16]}…"
            )
        rules_config = _rules_in_force(gov, config, row, records, where)
        due = list(rotations.get(row.slot, ()))
        transactions: list[Transaction] = []
        if next_txs is not None and next_txs[0] == row.height:
            for tx_row in next_txs[1]:
                if next_postings is None or next_postings[0] != tx_row.id:
                    postings: tuple[Posting, ...] = ()
                else:
                    postings = tuple(
                        Posting(p.account, p.asset, p.amount) for p in next_postings[1]
                    )
                    next_postings = next(postings_by_tx, None)
                tx = Transaction(tx_row.kind, tx_row.slot, tx_row.ref, postings)
                if tx.txid != tx_row.txid:
                    raise LedgerFault(
                        f"{where}: transaction {tx_row.position} ({tx_row.kind} {tx_row.ref}) "
                        f"does not match its id: its postings or fields were altered"
                    )
                if not tx.is_balanced():
                    raise LedgerFault(
                        f"{where}: transaction {tx_row.position} ({tx_row.kind} {tx_row.ref}) "
                        f"postings do not sum to zero: {tx.imbalance()}"
                    )
                if tx.kind == "key_rotation":
                    _check_rotation(tx, due.pop(0) if due else None, balances, where)
                for p in postings:
                    balances[(p.account, p.asset)] = (
                        balances.get((p.account, p.asset), 0) + p.amount
                    )
                transactions.append(tx)
            next_txs = next(txs_by_block, None)
        trades = [
            Trade(
                r.buy_id, r.sell_id, r.quantity_wh, r.price, r.sell_price, r.slot, r.buyer,
                r.seller, r._mapping.get("part") or 0,
            )
            for r in conn.execute(
                select(*trade_columns)
                .where(t.trades.c.slot == row.slot)
                .order_by(t.trades.c.position)
            )
        ]  # fmt: skip
        readings = []
        for r in conn.execute(
            select(t.readings).where(t.readings.c.slot == row.slot).order_by(t.readings.c.position)
        ):
            fields = dict(r._mapping)
            del fields["position"]  # storage order, not part of the signed record
            reading = MeterReading.model_validate(fields)
            if not reading.verify(reading.household):
                raise LedgerFault(f"{where}: reading of {r.household} has an invalid signature")
            readings.append(reading)
        tx_root, trade_root, reading_root = roots(
            transactions, (tr.encode() for tr in trades), (reading_leaf(r) for r in readings)
        )
        for name, got, want in (
            ("transaction root", tx_root, row.tx_root),
            ("trade root", trade_root, row.trade_root),
            ("reading root", reading_root, row.reading_root),
        ):
            if got != want:
                raise LedgerFault(f"{where}: {name} mismatch: rows were added, removed or altered")
        if len(transactions) != row.tx_count:
            raise LedgerFault(
                f"{where}: {len(transactions)} transactions, header says {row.tx_count}"
            )
        if state_hash(row.height, balances) != row.state_hash:
            raise LedgerFault(f"{where}: state hash does not match the balances after this block")
        if due:
            raise LedgerFault(
                f"{where}: no key_rotation transaction for the rotate_key record of "
                f"{due[0].household} in force from this slot"
            )
        tariffs = None if rules_config is None else rules_config.tariffs_at(row.slot)
        block_true_ups = true_ups.pop(row.height, [])
        _check_true_ups(row.slot, transactions, block_true_ups, tariffs, where)
        _check_fees(conn, row.slot, transactions, block_true_ups, tariffs, where)
        feeder_hash = None
        if feeder_config is not None:
            feeder_row = conn.execute(
                select(t.feeder_checks).where(t.feeder_checks.c.block_height == row.height)
            ).first()
            if feeder_row is None:
                raise LedgerFault(f"{where}: the feeder check row is missing")
            feeder_rows += 1
            reading = _feeder_reading(feeder_row, feeder_config, where)
            check = _check_feeder_row(
                conn, feeder_row, row.slot, feeder_config, reading, feeder_baseline, where
            )
            feeder_hash = check.hash
            if reading is not None:
                feeder_baseline = reading
        block = Block(
            row.height,
            row.slot,
            row.prev_hash,
            row.tx_root,
            row.trade_root,
            row.reading_root,
            row.state_hash,
            row.tx_count,
            feeder_hash,
            row._mapping.get("rules"),
        )
        if block.hash != row.hash:
            raise LedgerFault(f"{where}: header fields do not hash to the stored block hash")
        prev_hash = row.hash
        head[0] = row.hash
        counts["height"] = row.height
        counts["blocks"] += 1
        counts["transactions"] += len(transactions)
        expected_height += 1

    if limit is not None:
        if expected_height - 1 != limit:
            raise LedgerFault(
                f"blocks {expected_height}..{limit} are missing"
                + (f" before the block-sync gap {format_ranges(pending[:1])}" if pending else "")
            )
        if pending:
            raise LedgerFault(f"blocks {_gap_list(pending)} missing: block sync pending")
        return balances
    if next_txs is not None:
        raise LedgerFault(f"transactions reference block {next_txs[0]}, which does not exist")
    if next_postings is not None:
        raise LedgerFault("postings reference a transaction outside every block")
    for asset in ASSETS:
        total = sum(v for (_, a), v in balances.items() if a == asset)
        if total != 0:
            raise LedgerFault(f"total {asset} over all accounts is {total}, not 0")
    if start == 1 and feeder_config is not None:
        total_rows = conn.execute(select(func.count()).select_from(t.feeder_checks)).scalar()
        if total_rows != feeder_rows:
            raise LedgerFault(
                f"{total_rows} feeder check rows, but {feeder_rows} blocks with a feeder check"
            )
    stored = {(r.account, r.asset): r.amount for r in conn.execute(select(t.balances))}
    if stored != balances:
        diff = sorted(set(stored.items()) ^ set(balances.items()))[:1]
        raise LedgerFault(
            f"balances table disagrees with the postings, e.g. {diff[0] if diff else ''}"
        )
    return balances


# --- governance ------------------------------------------------------------------------------


def _governance(
    conn: Connection, config: MarketConfig | None
) -> tuple[list[GovernanceRecord], Governance]:
    """The ``governance`` rows, each checked, as records in log order, and their history.

    Positions run 1, 2, ... without a hole; each record decodes strictly as a governance record
    of the grid, is signed by the genesis operator (a key rotation's countersignature, if any,
    by the old key), and its row's other columns (type, household, from slot, canonical text,
    hash) are what the record says. :class:`LedgerFault` names the first row that is not."""
    if not has_governance_table(conn):
        return [], Governance()
    records = []
    for i, r in enumerate(conn.execute(select(t.governance).order_by(t.governance.c.position))):
        where = f"governance record {r.position} ({r.type} from slot {r.from_slot})"
        if r.position != i + 1:
            raise LedgerFault(
                f"governance records jump from {i} to {r.position}: a record was deleted"
            )
        if config is None:
            raise LedgerFault(f"{where}: a governance record in a ledger without market rules")
        try:
            record = decode_record(r.record, config.grid)
        except ValueError as exc:
            raise LedgerFault(f"{where}: the record does not decode: {exc}") from None
        if record.operator != config.operator or not record.verify(config.operator):
            raise LedgerFault(
                f"{where}: not signed by the genesis operator {config.operator[:24]}…: "
                "the row was altered or forged"
            )
        if (
            isinstance(record, RotateKey)
            and record.household_signature
            and not verify_signature(
                record.household, record.signing_bytes(), record.household_signature
            )
        ):
            raise LedgerFault(f"{where}: the old key's countersignature does not verify")
        expected = governance_row(i + 1, record, r.log_index, r.withdrawn)
        for column in ("type", "household", "from_slot", "record", "record_hash"):
            if getattr(r, column) != expected[column]:
                raise LedgerFault(
                    f"{where}: its {column} column is not what its signed record says"
                )
        records.append(record)
    return records, fold(records)


def _rules_in_force(
    gov: Governance,
    config: MarketConfig | None,
    row: Any,
    records: list[GovernanceRecord],
    where: str,
) -> MarketConfig | None:
    """The market rules in force for the block's slot (genesis rules and the governance
    records' rules changes); the block's ``rules`` column must name them (NULL while the
    genesis rules hold)."""
    stored = row._mapping.get("rules")
    if config is None:
        if stored is not None:
            raise LedgerFault(f"{where}: names rules {stored[:16]}… in a ledger without rules")
        return None
    try:
        in_force = gov.config_at(config, row.slot)
        expected = rules_hash_at(gov, config, row.slot)
    except MarketConfigError as exc:
        raise LedgerFault(
            f"{where}: the governance records' rules changes make no valid rules: {exc}"
        ) from None
    if stored != expected:
        raise LedgerFault(
            f"{where}: its rules column is {_rules_name(stored)}, but the rules in force for "
            f"slot {row.slot} (genesis rules and {len(records)} governance records) are "
            f"{_rules_name(expected)}"
        )
    return in_force


def _rules_name(value: str | None) -> str:
    return "the genesis rules (NULL)" if value is None else f"{value[:16]}…"


def _check_rotation(
    tx: Transaction,
    rotation: RotateKey | None,
    balances: dict[tuple[str, str], int],
    where: str,
) -> None:
    """A ``key_rotation`` transaction must be the one of an accepted ``rotate_key`` record in
    force from the block's slot (in log order): between the old and the new household's
    accounts only, moving every balance the old one held before it (``balances``)."""
    if rotation is None:
        raise LedgerFault(
            f"{where}: key_rotation transaction {tx.ref} has no rotate_key record in force from "
            "this slot"
        )
    old, new = household_account(rotation.household), household_account(rotation.new_household)
    if tx.ref != rotation_ref(rotation) or tx.slot != rotation.from_slot:
        raise LedgerFault(
            f"{where}: key_rotation transaction {tx.ref}, but the rotate_key record in force "
            f"from this slot is {rotation_ref(rotation)}"
        )
    stray = sorted({p.account for p in tx.postings} - {old, new})
    if stray:
        raise LedgerFault(
            f"{where}: key_rotation transaction {tx.ref} moves balances of {stray[0]}, not only "
            "from the old key's account to the new one's"
        )
    legs = []
    for asset in ASSETS:
        amount = balances.get((old, asset), 0)
        if amount:
            legs += [Posting(old, asset, -amount), Posting(new, asset, amount)]
    if Transaction("key_rotation", tx.slot, tx.ref, tuple(legs)).txid != tx.txid:
        raise LedgerFault(
            f"{where}: key_rotation transaction {tx.ref} does not move exactly the old key's "
            "balances to the new one"
        )


def _gap_list(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}..{b}" for a, b in ranges)


def _config(meta: dict[str, str]) -> MarketConfig | None:
    """The market rules in ``meta`` (None if there are none: then no feeder checks)."""
    if "config" not in meta:
        return None
    try:
        return config_from_json(json.loads(meta["config"]))
    except (ValueError, SnapshotError) as exc:
        raise LedgerFault(f"meta config is unreadable: {exc}") from None


_READING_COLUMNS = ("meter_serial", "import_wh", "export_wh", "nonce", "signature")


def _feeder_reading(row: Any, config: MarketConfig, where: str) -> FeederReading | None:
    """The operator-signed feeder reading a ``feeder_checks`` row holds (None if the row has
    none); :class:`LedgerFault` if it is partial, malformed or its signature does not verify."""
    values = [getattr(row, c) for c in _READING_COLUMNS]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise LedgerFault(f"{where}: the feeder check row holds a partial feeder reading")
    try:
        reading = FeederReading(
            grid=config.grid,
            operator=config.operator,
            slot=row.slot,
            **dict(zip(_READING_COLUMNS, values, strict=True)),
        )
    except ValueError as exc:
        raise LedgerFault(f"{where}: the feeder reading is malformed: {exc}") from None
    if not reading.verify(config.operator):
        raise LedgerFault(f"{where}: the feeder reading has an invalid operator signature")
    return reading


def _check_feeder_row(
    conn: Connection,
    row: Any,
    slot: int,
    config: MarketConfig,
    reading: FeederReading | None,
    baseline: FeederReading | None,
    where: str,
) -> FeederCheck:
    """Recompute the feeder check of ``slot`` from the row's reading (``reading``, already
    checked by :func:`_feeder_reading`), the previous block's (``baseline``) and the slot's
    settlements rows; it must equal the row."""
    if row.slot != slot:
        raise LedgerFault(f"{where}: the feeder check row is of slot {row.slot}")
    try:
        stored = FeederCheck.from_json(slot, row._mapping)
    except ValueError:
        raise LedgerFault(f"{where}: feeder check status {row.status!r} is unknown") from None
    s = t.settlements.c
    flows = [
        HouseholdFlow(bool(r.measured), r.import_wh, r.export_wh)
        for r in conn.execute(
            select(s.measured, s.import_wh, s.export_wh).where(s.slot == slot).order_by(s.household)
        )
    ]
    recomputed = feeder_check(
        slot,
        reading,
        baseline,
        flows,
        loss_permille=config.feeder_loss_permille,
        tolerance_wh=config.feeder_tolerance_wh,
    )
    if recomputed != stored:
        raise LedgerFault(
            f"{where}: feeder check row does not match its reading, the previous feeder reading "
            f"and the settlements (row {stored.status}, recomputed {recomputed.status})"
        )
    return stored


# --- true-ups and conservation -------------------------------------------------------------------


def _true_up_rows(conn: Connection, start: int, limit: int | None) -> dict[int, list[Any]]:
    """The ``true_ups`` rows of blocks ``start..limit``, by block height."""
    if not has_true_up_table(conn):
        return {}
    c = t.true_ups.c
    q = select(t.true_ups).where(c.block_height >= start).order_by(c.block_height, c.household)
    if limit is not None:
        q = q.where(c.block_height <= limit)
    rows: dict[int, list[Any]] = {}
    for r in conn.execute(q):
        rows.setdefault(r.block_height, []).append(r)
    return rows


def _true_up_energy(tx: Transaction, household: str) -> tuple[int, int]:
    """(import, export) Wh a ``true_up`` transaction moves for ``household``: its account's
    energy credits and debits."""
    account = household_account(household)
    legs = [p.amount for p in tx.postings if p.account == account and p.asset == ENERGY]
    return sum(a for a in legs if a > 0), -sum(a for a in legs if a < 0)


def _check_true_ups(
    slot: int,
    transactions: list[Transaction],
    rows: list[Any],
    tariffs: Tariffs | None,
    where: str,
) -> None:
    """Every ``true_up`` transaction of a block has its ``true_ups`` row and every row its
    transaction, with the same energy; with the market rules, the row recomputes to exactly
    the transaction (the money of its unmeasured slots at ``tariffs``: those of the slot, under
    the rules in force for it)."""
    txs: dict[str, Transaction] = {}
    for tx in transactions:
        if tx.kind == "true_up":
            if tx.ref in txs:
                raise LedgerFault(f"{where}: two true_up transactions of {tx.ref}")
            txs[tx.ref] = tx
    for r in rows:
        if r.slot != slot:
            raise LedgerFault(f"{where}: the true_ups row of {r.household} is of slot {r.slot}")
        tx = txs.pop(r.household, None)
        if tx is None:
            raise LedgerFault(
                f"{where}: true_ups row of {r.household} ({r.import_wh} Wh import, "
                f"{r.export_wh} Wh export over {r.slots} slots) has no true_up transaction"
            )
        moved = _true_up_energy(tx, r.household)
        if moved != (r.import_wh, r.export_wh):
            raise LedgerFault(
                f"{where}: true_ups row of {r.household} says {r.import_wh} Wh import, "
                f"{r.export_wh} Wh export; its true_up transaction moves {moved[0]} Wh import, "
                f"{moved[1]} Wh export"
            )
        if tariffs is not None:
            try:
                expected = true_up_transaction(
                    slot, r.household, Gap(r.slots, r.import_wh, r.export_wh), tariffs
                )
            except ValueError as exc:
                raise LedgerFault(f"{where}: true_ups row of {r.household}: {exc}") from None
            if expected.txid != tx.txid:
                raise LedgerFault(
                    f"{where}: true_ups row of {r.household} ({r.slots} unmeasured slots) does "
                    "not give its true_up transaction's money at the grid's tariffs"
                )
    if txs:
        did = sorted(txs)[0]
        imp, exp = _true_up_energy(txs[did], did)
        raise LedgerFault(
            f"{where}: true_up transaction of {did} ({imp} Wh import, {exp} Wh export) has no "
            "true_ups row"
        )


FEE_KINDS = ("local_fee", "grid_fee")
"""Transaction kinds of the grid fees (:func:`market.settlement.fee_transactions`)."""


def _check_fees(
    conn: Connection,
    slot: int,
    transactions: list[Transaction],
    true_up_rows: list[Any],
    tariffs: Tariffs | None,
    where: str,
) -> None:
    """With the market rules, a block's grid-fee transactions are exactly those its
    ``settlements`` rows (bought energy, negative imbalance) and ``true_ups`` rows (import)
    give at the fees in force for its slot: none missing, none extra, none altered."""
    if tariffs is None:
        return
    found = sorted((tx.kind, tx.ref, tx.txid) for tx in transactions if tx.kind in FEE_KINDS)
    if not found and not (tariffs.local_fee or tariffs.grid_fee):
        return
    gap_import = {r.household: int(r.import_wh) for r in true_up_rows}
    s = t.settlements.c
    expected: list[tuple[str, str, str]] = []
    for r in conn.execute(select(s.household, s.bought_wh, s.imbalance_wh).where(s.slot == slot)):
        grid_import = max(-int(r.imbalance_wh), 0) + gap_import.get(r.household, 0)
        try:
            fees = fee_transactions(slot, r.household, int(r.bought_wh), grid_import, tariffs)
        except ValueError as exc:
            raise LedgerFault(f"{where}: settlements row of {r.household}: {exc}") from None
        expected += [(tx.kind, tx.ref, tx.txid) for tx in fees]
    expected.sort()
    if found != expected:
        wrong = sorted(set(found) ^ set(expected))[0]
        side = "has no matching transaction" if wrong in expected else "is not what the rows give"
        raise LedgerFault(
            f"{where}: the {wrong[0]} of {wrong[1]} {side} at the grid fees in force for the slot "
            f"(local {tariffs.local_fee}, grid {tariffs.grid_fee} per kWh)"
        )


def conservation(
    conn: Connection,
    balances: dict[tuple[str, str], int],
    governance: Governance | None = None,
) -> tuple[HouseholdConservation, ...]:
    """Per household: its counters' movement between its first and last readings (the
    ``readings`` table: consecutive readings of one meter differenced, a restart, counters
    below the previous reading's, counted from zero; across an operator's meter swap
    (``replace_meter``) the old meter's rise to its final counters plus the new meter's rise
    from its first ones; another new meter serial a new baseline), the energy its account
    settled (``balances``: the running balances :func:`_verify` computed from the postings),
    and the settlements' and true-ups' figures.

    A household whose key was rotated (``governance``, the ledger's governance history) is one
    household under its newest DID: its readings, settlements, true-ups and balances under
    every DID it had count together, as the engine carries its baseline and balances over.
    Households are those with a reading, a settlement, a true-up or a household account."""
    gov = governance if governance is not None else Governance()
    successor = {rot.household: rot.new_household for rot in gov.rotations}

    def newest(did: str) -> str:
        for _ in range(len(successor)):
            if did not in successor:
                break
            did = successor[did]
        return did

    rd = t.readings.c
    moved: dict[str, list[int]] = {}
    span: dict[str, list[int]] = {}
    previous: dict[str, Any] = {}
    for r in conn.execute(
        select(rd.household, rd.slot, rd.meter_serial, rd.import_wh, rd.export_wh).order_by(
            rd.slot, rd.household
        )
    ):
        did = newest(r.household)
        m = moved.setdefault(did, [0, 0])
        span.setdefault(did, [int(r.slot), int(r.slot)])[1] = int(r.slot)
        prev = previous.get(did)
        if prev is not None:
            step = _counted(gov, did, prev, r)
            m[0] += step[0]
            m[1] += step[1]
        previous[did] = r
    s = t.settlements.c
    settled: dict[str, tuple[int, int, int, int]] = {}
    for r in conn.execute(
        select(
            s.household,
            func.sum(case((s.measured, 1), else_=0)).label("measured"),
            func.sum(case((s.measured, 0), else_=1)).label("unmeasured"),
            func.sum(s.import_wh).label("imp"),
            func.sum(s.export_wh).label("exp"),
        ).group_by(s.household)
    ):
        _add_to(
            settled,
            newest(r.household),
            (_int(r.measured), _int(r.unmeasured), _int(r.imp), _int(r.exp)),
        )
    trued: dict[str, tuple[int, int, int, int]] = {}
    if has_true_up_table(conn):
        c = t.true_ups.c
        for r in conn.execute(
            select(
                c.household,
                func.count().label("n"),
                func.sum(c.slots).label("slots"),
                func.sum(c.import_wh).label("imp"),
                func.sum(c.export_wh).label("exp"),
            ).group_by(c.household)
        ):
            _add_to(
                trued, newest(r.household), (_int(r.n), _int(r.slots), _int(r.imp), _int(r.exp))
            )
    prefix = household_account("")
    energy: dict[str, int] = {}
    for (account, asset), amount in balances.items():
        if account.startswith(prefix):
            did = newest(account[len(prefix) :])
            energy[did] = energy.get(did, 0) + (amount if asset == ENERGY else 0)
    accounts = set(energy)
    out = []
    for did in sorted(accounts | set(moved) | set(settled) | set(trued)):
        m_imp, m_exp = moved.get(did, (0, 0))
        measured, unmeasured, s_imp, s_exp = settled.get(did, (0, 0, 0, 0))
        n, gap_slots, g_imp, g_exp = trued.get(did, (0, 0, 0, 0))
        first, last = span.get(did, (None, None))
        out.append(
            HouseholdConservation(
                household=did,
                first_reading_slot=first,
                last_reading_slot=last,
                import_moved_wh=m_imp,
                export_moved_wh=m_exp,
                energy_settled_wh=energy.get(did, 0),
                measured_slots=measured,
                unmeasured_slots=unmeasured,
                true_ups=n,
                true_up_slots=gap_slots,
                true_up_import_wh=g_imp,
                true_up_export_wh=g_exp,
                settled_import_wh=s_imp + g_imp,
                settled_export_wh=s_exp + g_exp,
            )
        )
    return tuple(out)


def _add_to(
    totals: dict[str, tuple[int, int, int, int]], did: str, add: tuple[int, int, int, int]
) -> None:
    have = totals.get(did, (0, 0, 0, 0))
    totals[did] = (have[0] + add[0], have[1] + add[1], have[2] + add[2], have[3] + add[3])


def _counted(gov: Governance, did: str, prev: Any, r: Any) -> tuple[int, int]:
    """What the engine settles of a household's counters between its consecutive readings
    ``prev`` and ``r`` (import, export): as ``market.state`` differences them."""
    if prev.meter_serial == r.meter_serial:
        if r.import_wh < prev.import_wh or r.export_wh < prev.export_wh:
            # a meter restart (rules 2): counted from zero, as the engine trues it up
            return int(r.import_wh), int(r.export_wh)
        return int(r.import_wh) - int(prev.import_wh), int(r.export_wh) - int(prev.export_wh)
    serial, imp, exp = prev.meter_serial, int(prev.import_wh), int(prev.export_wh)
    moved_import = moved_export = 0
    for swap in gov.swaps_between(did, int(prev.slot), int(r.slot)):
        moved_import += swap.old_import_wh - imp
        moved_export += swap.old_export_wh - exp
        serial, imp, exp = swap.meter_serial, swap.new_import_wh, swap.new_export_wh
    if serial != r.meter_serial:
        return 0, 0  # no swap links the meters: the new one is a new baseline
    moved_import += int(r.import_wh) - imp
    moved_export += int(r.export_wh) - exp
    if moved_import < 0 or moved_export < 0:
        return 0, 0  # the new meter restarted: the engine settles no movement
    return moved_import, moved_export


def _int(value: Any) -> int:
    """An aggregate as int (PostgreSQL sums BIGINT to NUMERIC; no rows give NULL)."""
    return 0 if value is None else int(value)


def _check_conservation(figures: tuple[HouseholdConservation, ...]) -> None:
    """:class:`LedgerFault` naming the first household whose settled energy is not what its
    counters moved."""
    for h in figures:
        between = (
            "no readings"
            if h.first_reading_slot is None
            else f"its readings of slots {h.first_reading_slot} and {h.last_reading_slot}"
        )
        if h.energy_settled_wh != h.moved_net_wh:
            raise LedgerFault(
                f"conservation: household {h.household} settled {h.energy_settled_wh:+} Wh of "
                f"energy, but its counters moved {h.moved_net_wh:+} Wh (import "
                f"{h.import_moved_wh} Wh − export {h.export_moved_wh} Wh) between {between}"
            )
        for name, got, want in (
            ("import", h.settled_import_wh, h.import_moved_wh),
            ("export", h.settled_export_wh, h.export_moved_wh),
        ):
            if got != want:
                raise LedgerFault(
                    f"conservation: household {h.household}'s settlements and true-ups settle "
                    f"{got} Wh {name}, but its {name} counter moved {want} Wh between {between}"
                )
