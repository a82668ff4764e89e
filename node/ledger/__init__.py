"""The ledger store: what the contract engine produces, persisted with SQLAlchemy.

SQLite by default (WAL, synchronous=FULL), PostgreSQL for archives, same schema on both.
"""

from node.ledger.store import LedgerStore, LedgerStoreError
from node.ledger.verify import VerifyReport, verify_ledger

__all__ = ["LedgerStore", "LedgerStoreError", "VerifyReport", "verify_ledger"]
