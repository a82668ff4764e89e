"""The ledger's tables. Documented in docs/ledger.md; keep the two in step."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

blocks = Table(
    "blocks",
    metadata,
    Column("height", Integer, primary_key=True, autoincrement=False),
    Column("slot", BigInteger, nullable=False, unique=True),
    Column("hash", String(64), nullable=False, unique=True),
    Column("prev_hash", String(64), nullable=False),
    Column("tx_root", String(64), nullable=False),
    Column("trade_root", String(64), nullable=False),
    Column("reading_root", String(64), nullable=False),
    Column("state_hash", String(64), nullable=False),
    Column("tx_count", Integer, nullable=False),
    # The block header's ``rules``: hash of the market rules the slot was settled under, NULL
    # while the genesis rules hold. Added after the first release: :func:`ensure_schema` adds
    # it to an older ledger, readers of a ledger they may not alter check
    # :func:`node.ledger.queries.has_rules_column`.
    Column("rules", String(64), nullable=True),
)

transactions = Table(
    "transactions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("block_height", ForeignKey("blocks.height"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("txid", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("slot", BigInteger, nullable=False),
    Column("ref", Text, nullable=False),
    Index("ix_transactions_block", "block_height", "position", unique=True),
)

postings = Table(
    "postings",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("transaction_id", ForeignKey("transactions.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("account", Text, nullable=False),
    Column("asset", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Index("ix_postings_tx", "transaction_id", "position", unique=True),
    Index("ix_postings_account", "account", "asset"),
)

balances = Table(
    "balances",
    metadata,
    Column("account", Text, primary_key=True),
    Column("asset", String(16), primary_key=True),
    Column("amount", BigInteger, nullable=False),
)

clearings = Table(
    "clearings",
    metadata,
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("mechanism", String(16), nullable=False),
    Column("price", BigInteger, nullable=True),
    Column("volume_wh", BigInteger, nullable=False),
    Column("bid_volume_wh", BigInteger, nullable=False),
    Column("ask_volume_wh", BigInteger, nullable=False),
    Column("order_count", Integer, nullable=False),
    Column("participants", Integer, nullable=False),
)

orders = Table(
    "orders",
    metadata,
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", String(128), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("household", Text, nullable=False),
    Column("side", String(4), nullable=False),
    Column("quantity_wh", BigInteger, nullable=False),
    Column("price", BigInteger, nullable=False),
    Column("nonce", BigInteger, nullable=False),
    Column("signature", String(128), nullable=False),
    # A curve order's steps as canonical JSON ``[[quantity_wh, price], ...]`` (``quantity_wh``
    # is their total, ``price`` the first step's); NULL for a plain order. Added after the
    # first release: :func:`ensure_schema` adds it to an older ledger (whose orders are all
    # plain), readers of a ledger they may not alter select :func:`present_columns`.
    Column("steps", Text, nullable=True),
)

trades = Table(
    "trades",
    metadata,
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("buy_id", String(128), nullable=False),
    Column("sell_id", String(128), nullable=False),
    Column("buyer", Text, nullable=False),
    Column("seller", Text, nullable=False),
    Column("quantity_wh", BigInteger, nullable=False),
    Column("price", BigInteger, nullable=False),
    Column("sell_price", BigInteger, nullable=False),
    # ``Trade.part``: 1, 2, ... for a further trade of the same two orders at another price
    # (pay-as-bid with curve orders only); NULL for 0. Added like ``orders.steps``.
    Column("part", Integer, nullable=True),
)

readings = Table(
    "readings",
    metadata,
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("household", Text, primary_key=True),
    Column("position", Integer, nullable=False),
    Column("grid", Text, nullable=False),
    Column("meter_serial", Text, nullable=False),
    Column("import_wh", BigInteger, nullable=False),
    Column("export_wh", BigInteger, nullable=False),
    Column("nonce", BigInteger, nullable=False),
    Column("signature", String(128), nullable=False),
)

settlements = Table(
    "settlements",
    metadata,
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("household", Text, primary_key=True),
    Column("measured", Boolean, nullable=False),
    Column("import_wh", BigInteger, nullable=False),
    Column("export_wh", BigInteger, nullable=False),
    Column("sold_wh", BigInteger, nullable=False),
    Column("bought_wh", BigInteger, nullable=False),
    Column("imbalance_wh", BigInteger, nullable=False),
    Column("delivered_wh", BigInteger, nullable=False),
    Column("consumed_wh", BigInteger, nullable=False),
    Index("ix_settlements_household", "household", "slot"),
)

feeder_checks = Table(
    "feeder_checks",
    metadata,
    # One row per block of a grid with a feeder meter (MarketConfig.feeder_serial): the
    # operator-signed feeder reading the slot's check used (if any) and the comparison of the
    # feeder's net import with the households' metered net import. Its canonical hash is the
    # block header's ``feeder`` field, so a changed or deleted row breaks the block hash.
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("block_height", ForeignKey("blocks.height"), nullable=False, unique=True),
    Column("status", String(24), nullable=False),
    # ok | mismatch | no_feeder_reading | households_unmeasured
    Column("meter_serial", Text, nullable=True),
    Column("import_wh", BigInteger, nullable=True),
    Column("export_wh", BigInteger, nullable=True),
    Column("nonce", BigInteger, nullable=True),
    Column("signature", String(128), nullable=True),
    Column("feeder_net_wh", BigInteger, nullable=True),
    Column("households_net_wh", BigInteger, nullable=True),
    Column("difference_wh", BigInteger, nullable=True),
    Column("allowed_loss_wh", BigInteger, nullable=True),
)

true_ups = Table(
    "true_ups",
    metadata,
    # One row per true-up (rules >= 2, docs/ledger.md "Unmeasured slots"): the counter movement
    # since the household's previous reading, over ``slots`` unmeasured slots, that the
    # ``true_up`` transaction (ref = the household) of this slot's block settles. Not hashed: the
    # transaction is, and ``ledger verify`` checks the row against it. A separate table (not
    # columns of ``settlements``) so existing ledgers get it from ``create_all``.
    Column("slot", BigInteger, primary_key=True, autoincrement=False),
    Column("household", Text, primary_key=True),
    Column("block_height", ForeignKey("blocks.height"), nullable=False),
    Column("slots", BigInteger, nullable=False),
    Column("import_wh", BigInteger, nullable=False),
    Column("export_wh", BigInteger, nullable=False),
    Index("ix_true_ups_household", "household", "slot"),
)

governance = Table(
    "governance",
    metadata,
    # One row per governance record the engine accepted (docs/ledger.md, "Governance"), in log
    # order: ``position`` 1, 2, ... is its place among them (the same on every node). Not
    # hashed into blocks: ``ledger verify`` checks each row (the operator's signature, the
    # columns against the record, the hash) and every block against the rules and key
    # rotations the rows put in force. A separate table, so older ledgers get it from
    # ``create_all``.
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("log_index", BigInteger, nullable=True),
    # the Raft log index of the entry that committed it; NULL when unknown (recorded from an
    # installed snapshot, until block sync brings the peer's value)
    Column("type", String(32), nullable=False),
    Column("household", Text, nullable=True),  # the DID a member change is about
    Column("from_slot", BigInteger, nullable=False),
    Column("record", Text, nullable=False),
    # the record's canonical JSON with its signatures (node.ledger.governance.record_text)
    Column("record_hash", String(64), nullable=False),
    Column("withdrawn", Integer, nullable=True),
    # resting orders the record took out of the books (like cancelled ones, they never reach
    # ``orders``); NULL when unknown (recorded from a snapshot)
    Index("ix_governance_household", "household", "position"),
)

households = Table(
    "households",
    metadata,
    Column("did", Text, primary_key=True),
    Column("meter_serial", Text, nullable=False),
    Column("role", String(8), nullable=False),
    Column("sold_wh", BigInteger, nullable=False, default=0),
    Column("delivered_wh", BigInteger, nullable=False, default=0),
    Column("bought_wh", BigInteger, nullable=False, default=0),
    Column("consumed_wh", BigInteger, nullable=False, default=0),
    Column("slots", Integer, nullable=False, default=0),
    Column("missed_readings", Integer, nullable=False, default=0),
    Column("reputation_permille", Integer, nullable=False, default=1000),
)


ADDED_COLUMNS: tuple[tuple[Table, str], ...] = (
    (blocks, "rules"),
    (orders, "steps"),
    (trades, "part"),
)
"""Nullable columns added to existing tables after the first release, oldest first:
:func:`ensure_schema` adds them to a ledger that lacks them. (New tables need no entry:
``create_all`` creates them.)"""


def ensure_schema(engine: Engine) -> None:
    """Bring a ledger database to this schema: create missing tables and indexes, then add
    the :data:`ADDED_COLUMNS` a ledger of an older node lacks (``ALTER TABLE ... ADD COLUMN``,
    nullable, so existing rows read NULL: what they meant). Idempotent; SQLite and
    PostgreSQL."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        inspector = inspect(conn)
        for table, name in ADDED_COLUMNS:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            if name in present:
                continue
            column = table.c[name]
            kind = column.type.compile(dialect=engine.dialect)
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def present_columns(conn: Connection, table: Table) -> list[Column[Any]]:
    """The columns of ``table`` this ledger has: every one, or all but the
    :data:`ADDED_COLUMNS` a ledger of an older node (opened read-only) lacks. Select these
    rather than the table when the ledger may be older; a missing column reads as NULL."""
    added = {name for tab, name in ADDED_COLUMNS if tab is table}
    if not added:
        return list(table.c)
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    return [c for c in table.c if c.name in present or c.name not in added]
