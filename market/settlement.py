"""Settlement of one delivery slot against what the meters measured.

Rules (all integer arithmetic):

- Each trade is a firm contract: the buyer pays ``price`` and the seller receives ``sell_price``
  per kWh for the traded energy; the market keeps any gap (McAfee trade reduction only).
- A household's metered net export in the slot (export minus import, from the difference of its
  cumulative counters against its reading for the previous slot) minus its contracted net export
  (sold minus bought) is its imbalance, settled with the grid: a surplus is sold at the feed-in
  tariff, a shortfall (a seller that delivered less than it sold, a buyer that drew more than it
  bought) is bought at the retail price. So every household's money for the slot follows what
  its meter really measured, and never is worse than trading with the utility alone.
- A missing reading, or one with no reading of the previous slot to difference against, counts
  as zero delivery and zero consumption: the whole contracted position becomes imbalance (the
  slot is *unmeasured*: its contracts are not treated as delivered).
- Meter registers are cumulative, so the first reading after unmeasured slots still measures
  everything since the household's previous reading. That movement (a :class:`Gap`) is *trued
  up* against the grid in the reading's slot: its import bought at the retail price, its export
  sold at the feed-in tariff, less :data:`UNMEASURED_SLOT_FEE` per unmeasured slot it covers,
  the total rounded down (in the grid's favour). Energy is settled exactly: over any run of
  slots a household's settled energy equals its counters' movement between its readings. The
  fee and the rounding make withholding or delaying a reading never pay, even by the half minor
  unit that per-slot rounding could otherwise gain (docs/ledger.md has the argument).
- Grid fees (zero unless the rules set them): a household pays ``local_fee`` per kWh it bought
  in the local market and ``grid_fee`` per kWh it imported from the grid (its negative imbalance
  plus a true-up's import) to the ``network`` account, in one ``local_fee`` and one ``grid_fee``
  transaction per household and slot (:func:`fee_transactions`, half up like every price). A
  true-up's unmeasured-slot fee exceeds the half minor unit per slot that rounding a gap's fee
  once instead of per slot could save, so withholding readings still never pays.
- Delivery statistics for reputation: a seller delivered ``min(max(net export, 0), sold)``, a
  buyer took ``min(max(-net export, 0), bought)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from market.accounting import (
    ENERGY,
    GRID,
    MARKET,
    MONEY,
    NETWORK,
    Transaction,
    household_account,
    money_for,
    transfer,
)
from market.models import Trade


@dataclass(frozen=True, slots=True)
class Metered:
    """Energy a meter measured in one slot (deltas of its cumulative counters)."""

    import_wh: int
    export_wh: int

    @property
    def net_export_wh(self) -> int:
        """Export minus import (negative for a net consumer)."""
        return self.export_wh - self.import_wh


UNMEASURED_SLOT_FEE = 1
"""Minor units a household pays per unmeasured slot that a true-up covers."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Counter movement since a household's previous reading, over slots not measured one by one.

    ``slots`` counts the unmeasured slots it covers: the reading's own slot and every slot back
    to (not including) the slot of the previous reading."""

    slots: int
    import_wh: int
    export_wh: int


@dataclass(frozen=True, slots=True)
class HouseholdSettlement:
    """What one household traded, what its meter measured, and the difference, in one slot."""

    household: str
    measured: bool
    import_wh: int
    export_wh: int
    sold_wh: int
    bought_wh: int
    imbalance_wh: int
    """Metered minus contracted net export: > 0 sold to the grid, < 0 bought from it."""
    delivered_wh: int
    consumed_wh: int
    gap_slots: int = 0
    """Unmeasured slots whose counter movement this slot's reading trued up (0: none)."""
    gap_import_wh: int = 0
    gap_export_wh: int = 0

    @property
    def net_export_wh(self) -> int:
        """Metered export minus import."""
        return self.export_wh - self.import_wh


@dataclass(frozen=True, slots=True)
class Tariffs:
    """The grid's prices in minor units per kWh: the market's price floor and cap, and the
    grid fees on energy bought locally and imported from the grid."""

    feed_in: int
    retail: int
    local_fee: int = 0
    grid_fee: int = 0


def trade_transaction(trade: Trade) -> Transaction:
    """Money and energy transfers of one trade."""
    buyer, seller = household_account(trade.buyer), household_account(trade.seller)
    paid = money_for(trade.quantity_wh, trade.price)
    received = money_for(trade.quantity_wh, trade.sell_price)
    return transfer(
        "trade",
        trade.slot,
        trade.trade_id,
        [
            (seller, buyer, ENERGY, trade.quantity_wh),
            (buyer, seller, MONEY, received),
            (buyer, MARKET, MONEY, paid - received),
        ],
    )


def true_up_transaction(slot: int, household: str, gap: Gap, tariffs: Tariffs) -> Transaction:
    """The grid settlement of a :class:`Gap`: import at retail, export at the feed-in tariff,
    :data:`UNMEASURED_SLOT_FEE` per slot, rounded down to whole minor units."""
    account = household_account(household)
    thousandths = (
        gap.export_wh * tariffs.feed_in
        - gap.import_wh * tariffs.retail
        - 1000 * UNMEASURED_SLOT_FEE * gap.slots
    )
    money = thousandths // 1000  # floor: a fraction of a minor unit goes to the grid
    return transfer(
        "true_up",
        slot,
        household,
        [
            (GRID, account, ENERGY, gap.import_wh),
            (account, GRID, ENERGY, gap.export_wh),
            (GRID, account, MONEY, money) if money > 0 else (account, GRID, MONEY, -money),
        ],
    )


def fee_transactions(
    slot: int, household: str, bought_wh: int, grid_import_wh: int, tariffs: Tariffs
) -> list[Transaction]:
    """The grid fees one household pays for ``slot``: ``local_fee`` per kWh of ``bought_wh``
    (bought in the local market) and ``grid_fee`` per kWh of ``grid_import_wh`` (imported from
    the grid: negative imbalance plus true-up import), each to the ``network`` account. A fee
    that comes to zero makes no transaction (ledgers of grids without fees are unchanged)."""
    account = household_account(household)
    out = []
    for kind, energy_wh, price in (
        ("local_fee", bought_wh, tariffs.local_fee),
        ("grid_fee", grid_import_wh, tariffs.grid_fee),
    ):
        money = money_for(energy_wh, price)
        if money:
            out.append(transfer(kind, slot, household, [(account, NETWORK, MONEY, money)]))
    return out


def settle_slot(
    slot: int,
    trades: Iterable[Trade],
    households: Iterable[str],
    metered: Mapping[str, Metered],
    tariffs: Tariffs,
    gaps: Mapping[str, Gap] | None = None,
) -> tuple[list[Transaction], list[HouseholdSettlement]]:
    """Transactions and per-household settlements of ``slot``.

    ``households`` are all members, in a deterministic order (the engine sorts them);
    ``metered`` holds the households with a usable reading; ``gaps`` those whose reading closes
    a gap (never also in ``metered``). Transactions come in trade order, then each household's
    imbalance, true-up and fees in household order.
    """
    gaps = gaps or {}
    trade_list = list(trades)
    sold: dict[str, int] = {}
    bought: dict[str, int] = {}
    for t in trade_list:
        sold[t.seller] = sold.get(t.seller, 0) + t.quantity_wh
        bought[t.buyer] = bought.get(t.buyer, 0) + t.quantity_wh
    transactions = [trade_transaction(t) for t in trade_list]
    summaries: list[HouseholdSettlement] = []
    for did in households:
        m = metered.get(did)
        imp, exp = (m.import_wh, m.export_wh) if m is not None else (0, 0)
        s, b = sold.get(did, 0), bought.get(did, 0)
        net = exp - imp
        imbalance = net - (s - b)
        summaries.append(
            HouseholdSettlement(
                household=did,
                measured=m is not None,
                import_wh=imp,
                export_wh=exp,
                sold_wh=s,
                bought_wh=b,
                imbalance_wh=imbalance,
                delivered_wh=min(max(net, 0), s),
                consumed_wh=min(max(-net, 0), b),
                **_gap_fields(gaps.get(did)),
            )
        )
        account = household_account(did)
        if imbalance > 0:
            transactions.append(
                transfer(
                    "imbalance",
                    slot,
                    did,
                    [
                        (account, GRID, ENERGY, imbalance),
                        (GRID, account, MONEY, money_for(imbalance, tariffs.feed_in)),
                    ],
                )
            )
        elif imbalance < 0:
            transactions.append(
                transfer(
                    "imbalance",
                    slot,
                    did,
                    [
                        (GRID, account, ENERGY, -imbalance),
                        (account, GRID, MONEY, money_for(-imbalance, tariffs.retail)),
                    ],
                )
            )
        gap = gaps.get(did)
        if gap is not None:
            transactions.append(true_up_transaction(slot, did, gap, tariffs))
        grid_import = max(-imbalance, 0) + (gap.import_wh if gap is not None else 0)
        transactions.extend(fee_transactions(slot, did, b, grid_import, tariffs))
    return transactions, summaries


def _gap_fields(gap: Gap | None) -> dict[str, int]:
    if gap is None:
        return {}
    return {"gap_slots": gap.slots, "gap_import_wh": gap.import_wh, "gap_export_wh": gap.export_wh}
