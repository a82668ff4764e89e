"""``microgrid statement`` and :mod:`node.ledger.statement`: a household's energy and money over a
range of settled slots reconcile with the ledger, and the grid-only comparison is what the
engine would have settled without the local market.

Real engine, real SQLite: two ledgers of the market simulation, one as ``market_sim.run``
records it (every reading sent, slots 0..47: night and morning) and one over slots 36..51 with
some readings withheld (unmeasured slots and true-ups). Figures the tests compare against are
computed here from the raw tables with sqlite3, not with the module under test.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from market import MeterReading, Rejected, State, apply
from market.models import MemberRole
from market.schedule import Schedule
from node.cli import main
from node.cli.statement import money
from node.ledger import LedgerStore
from node.ledger.statement import Statement, StatementError, household_statement
from node.ledger.store import make_engine
from node.setup.genesis import create_genesis, write_genesis
from node.tools import market_sim

HOUSEHOLDS, SEED = 4, 5
FIRST_SLOT, SLOTS = 36, 16
"""The withheld ledger: slots 36..51 (09:00 to 13:00 on 1970-01-01: PV exports, trades)."""
WITHHELD = frozenset({(3, 38), (1, 40), (1, 41), (2, 44), (0, 46), (0, 47), (0, 48)})
"""(household index, slot) readings never sent: true-ups in slots 39, 42, 45 and 49."""
PLAIN_SLOTS = 48
FEED_IN, RETAIL = 8, 32
"""The market simulation's tariffs."""
DAY = "1970-01-01"


@dataclass(frozen=True)
class Ledger:
    """A recorded simulation: its database and household DIDs (by simulation index)."""

    path: Path
    dids: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def rows(self, sql: str, *params: object) -> list[tuple[int, ...]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql, params).fetchall()

    def one(self, sql: str, *params: object) -> int:
        return int(self.rows(sql, *params)[0][0] or 0)


def withheld_ledger(path: Path) -> Ledger:
    """The market simulation over slots 36..51 without the :data:`WITHHELD` readings."""
    sim = market_sim.build(HOUSEHOLDS, SEED)
    index_of = {h.signer.did: h.index for h in sim.households}
    state = State.initial(sim.config)
    with LedgerStore(f"sqlite:///{path}") as store:
        store.init_genesis(sim.config)
        commands = market_sim.commands(sim, SLOTS, first_slot=FIRST_SLOT)
        for index, command in enumerate(commands, start=1):
            if isinstance(command, MeterReading) and (
                (index_of[command.household], command.slot) in WITHHELD
            ):
                continue
            state, events = apply(state, command)
            assert not any(isinstance(ev, Rejected) for ev in events), events
            store.record(events, applied_index=index)
    return Ledger(path, tuple(h.signer.did for h in sim.households))


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ledger]:
    """Both ledgers, read only (no schedule in meta: ``market_sim`` records none)."""
    tmp = tmp_path_factory.mktemp("statement")
    (tmp / "plain").mkdir()
    plain = tmp / "plain" / "ledger.db"
    market_sim.run(households=HOUSEHOLDS, slots=PLAIN_SLOTS, seed=SEED, db=f"sqlite:///{plain}")
    sim = market_sim.build(HOUSEHOLDS, SEED)
    return {
        "plain": Ledger(plain, tuple(h.signer.did for h in sim.households)),
        "withheld": withheld_ledger(tmp / "withheld.db"),
    }


@pytest.fixture(params=["plain", "withheld"])
def ledger(request: pytest.FixtureRequest, ledgers: dict[str, Ledger]) -> Ledger:
    return ledgers[request.param]


@pytest.fixture
def scheduled(tmp_path: Path, ledgers: dict[str, Ledger]) -> Ledger:
    """A copy of the withheld ledger with the grid's schedule in meta (as a node writes it)."""
    src = ledgers["withheld"]
    path = tmp_path / "ledger.db"
    shutil.copy(src.path, path)
    with LedgerStore(f"sqlite:///{path}") as store:
        store.record_schedule(Schedule())
    return Ledger(path, src.dids)


def statement(ledger: Ledger, did: str, first: int = 0, last: int = 10**6) -> Statement:
    engine = make_engine(ledger.url, read_only=True)
    try:
        return household_statement(engine, did, first, last)
    finally:
        engine.dispose()


def half_up(wh: int, price: int) -> int:
    return (wh * price + 500) // 1000


def expected_grid_only(ledger: Ledger, did: str, first: int = 0, last: int = 10**6) -> int:
    """What the household's metered energy costs at the grid's prices, from the raw rows:
    each measured slot's net flow (export at feed-in, import at retail, half up), each true-up
    as the engine settles it (rounded down, one minor unit per unmeasured slot)."""
    cost = 0
    for imp, exp in ledger.rows(
        "SELECT import_wh, export_wh FROM settlements WHERE household = ? AND measured "
        "AND slot BETWEEN ? AND ?", did, first, last
    ):  # fmt: skip
        net = exp - imp
        cost += -half_up(net, FEED_IN) if net > 0 else half_up(-net, RETAIL)
    for slots, imp, exp in ledger.rows(
        "SELECT slots, import_wh, export_wh FROM true_ups WHERE household = ? "
        "AND slot BETWEEN ? AND ?", did, first, last
    ):  # fmt: skip
        cost -= (exp * FEED_IN - imp * RETAIL - 1000 * slots) // 1000
    return cost


def money_postings(ledger: Ledger, did: str, first: int = 0, last: int = 10**6) -> int:
    return ledger.one(
        "SELECT SUM(p.amount) FROM postings p JOIN transactions x ON p.transaction_id = x.id "
        "WHERE p.account = ? AND p.asset = 'money' AND x.slot BETWEEN ? AND ?",
        f"household:{did}", first, last,
    )  # fmt: skip


# --- the query module ----------------------------------------------------------------------


def test_the_net_bill_is_the_households_money_balance_change(ledger: Ledger) -> None:
    for did in ledger.dids:
        s = statement(ledger, did)
        balance = ledger.one(
            "SELECT amount FROM balances WHERE account = ? AND asset = 'money'", f"household:{did}"
        )
        assert s.money_change == balance == money_postings(ledger, did)
        assert s.net_bill == -balance
        assert s.settled_slots == ledger.one("SELECT COUNT(*) FROM blocks")


def test_local_trades_are_the_households_trades(ledger: Ledger) -> None:
    traded = False
    for did in ledger.dids:
        s = statement(ledger, did)
        bought = ledger.rows("SELECT quantity_wh, price FROM trades WHERE buyer = ?", did)
        sold = ledger.rows("SELECT quantity_wh, sell_price FROM trades WHERE seller = ?", did)
        assert s.totals["local_bought_wh"] == sum(q for q, _ in bought)
        assert s.totals["local_paid"] == sum(half_up(q, p) for q, p in bought)
        assert s.totals["local_sold_wh"] == sum(q for q, _ in sold)
        assert s.totals["local_received"] == sum(half_up(q, p) for q, p in sold)
        traded = traded or bool(bought)
    assert traded, "the simulation should trade"
    statements = [statement(ledger, did) for did in ledger.dids]
    assert sum(s.totals["local_bought_wh"] for s in statements) == sum(
        s.totals["local_sold_wh"] for s in statements
    )


def test_grid_flows_are_the_imbalances_and_true_ups(ledger: Ledger) -> None:
    for did in ledger.dids:
        s = statement(ledger, did)
        imbalances = [r[0] for r in ledger.rows(
            "SELECT imbalance_wh FROM settlements WHERE household = ?", did)]  # fmt: skip
        ups = ledger.rows(
            "SELECT COUNT(*), SUM(slots), SUM(import_wh), SUM(export_wh) FROM true_ups "
            "WHERE household = ?", did
        )[0]  # fmt: skip
        n, gap_slots, up_imp, up_exp = (int(v or 0) for v in ups)
        assert s.totals["grid_import_wh"] == sum(-i for i in imbalances if i < 0) + up_imp
        assert s.totals["grid_export_wh"] == sum(i for i in imbalances if i > 0) + up_exp
        assert s.totals["grid_import_paid"] == sum(half_up(-i, RETAIL) for i in imbalances if i < 0)
        assert s.totals["grid_export_received"] == sum(
            half_up(i, FEED_IN) for i in imbalances if i > 0
        )
        assert (s.totals["true_ups"], s.totals["true_up_slots"]) == (n, gap_slots)
        unmeasured = ledger.one(
            "SELECT COUNT(*) FROM settlements WHERE household = ? AND NOT measured", did
        )
        assert s.unmeasured_slots == unmeasured
    if ledger.path.name == "withheld.db":
        assert sum(statement(ledger, did).totals["true_ups"] for did in ledger.dids) == 4


def test_savings_are_the_grid_only_bill_minus_the_net_bill(ledger: Ledger) -> None:
    saved = 0
    for did in ledger.dids:
        s = statement(ledger, did)
        grid_only = expected_grid_only(ledger, did)
        assert s.grid_only_bill == grid_only
        assert s.savings == grid_only + money_postings(ledger, did)
        if not ledger.one("SELECT COUNT(*) FROM trades WHERE buyer = ? OR seller = ?", did, did):
            assert s.savings == 0, "without trades the bill is the grid-only bill"
        saved += s.savings
    assert saved > 0, "the local market should save the grid something in the simulation"


def test_a_range_gives_the_figures_of_its_slots(ledgers: dict[str, Ledger]) -> None:
    ledger = ledgers["withheld"]
    middle = FIRST_SLOT + SLOTS // 2
    for did in ledger.dids:
        whole = statement(ledger, did)
        first = statement(ledger, did, FIRST_SLOT, middle - 1)
        second = statement(ledger, did, middle, 10**6)
        assert first.slots == whole.slots[: SLOTS // 2]
        assert second.slots == whole.slots[SLOTS // 2 :]
        assert first.money_change == money_postings(ledger, did, FIRST_SLOT, middle - 1)
        assert first.grid_only_bill == expected_grid_only(ledger, did, FIRST_SLOT, middle - 1)
        for name, total in whole.totals.items():
            assert first.totals[name] + second.totals[name] == total, name
        assert first.savings + second.savings == whole.savings


def test_an_unknown_household_or_an_empty_range_is_refused(ledgers: dict[str, Ledger]) -> None:
    ledger = ledgers["withheld"]
    did = ledger.dids[0]
    with pytest.raises(StatementError, match="no household"):
        statement(ledger, "did:key:z6Mknobody")
    with pytest.raises(StatementError, match="no settled slot"):
        statement(ledger, did, 0, FIRST_SLOT - 1)
    with pytest.raises(StatementError, match="empty range"):
        statement(ledger, did, 50, 40)


# --- the command ---------------------------------------------------------------------------


def test_the_command_prints_the_totals_and_writes_a_csv_that_sums_to_them(
    scheduled: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    did = scheduled.dids[2]  # a buyer with a true-up
    out_csv = tmp_path / "statement.csv"
    argv = ["statement", "--db", scheduled.url, "--household", did, "--from", DAY, "--to", DAY]
    assert main([*argv, "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    s = statement(scheduled, did)
    assert s.totals["local_bought_wh"] and s.totals["true_ups"]
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line[:2] == "  "}
    assert lines["bought locally"].split()[-3:] == [
        str(s.totals["local_bought_wh"]), "Wh", money(-s.totals["local_paid"], True)
    ]  # fmt: skip
    imported = lines["imported from the grid"].split()
    assert imported[-3:-1] == [str(s.totals["grid_import_wh"]), "Wh"]
    assert lines["net bill"].split()[-2:] == [money(abs(s.net_bill)), "paid"]
    assert lines["savings"].split()[-1] == money(s.savings)
    assert not any("fee" in label for label in lines), "no grid fees in the rules yet"
    assert f"{s.settled_slots} settled slots" in out and "(slots 36..51)" in out
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slot"]) for r in rows] == list(range(FIRST_SLOT, FIRST_SLOT + SLOTS))
    assert rows[0]["start_utc"] == "1970-01-01T09:00:00+00:00"
    for name, total in s.totals.items():
        column = [Decimal(r[name]) for r in rows]
        if "." in rows[0][name]:  # money: currency units
            assert sum(column) * 100 == total, name
        else:
            assert sum(column) == total, name
    assert sum(Decimal(r["net_bill"]) for r in rows) * 100 == s.net_bill
    assert sum(Decimal(r["savings"]) for r in rows) * 100 == s.savings


def test_a_day_range_selects_its_slots(
    scheduled: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A later day has no settled slot; the ledger's schedule turns days into slots."""
    did = scheduled.dids[0]
    argv = ["statement", "--db", scheduled.url, "--household", did]
    assert main([*argv, "--from", "1969-12-31", "--to", DAY]) == 0
    assert "16 settled slots" in capsys.readouterr().out
    assert main([*argv, "--from", "1970-01-02", "--to", "1970-01-02"]) == 2
    assert capsys.readouterr().err == "statement: no settled slot in 96..191\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--household", "did:key:z6Mknobody", "--from", DAY, "--to", DAY], "no household"),
        (["--household", "H", "--from", "1970-01-02", "--to", DAY], "is after --to"),
        (["--household", "H", "--from", "1970-13-01", "--to", DAY], "not an ISO date"),
        (["--from", DAY, "--to", DAY], "give --config, or --db with --household"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    scheduled: Ledger, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [scheduled.dids[0] if word == "H" else word for word in extra]
    assert main(["statement", "--db", scheduled.url, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_ledger_or_schedule_exits_2(
    ledgers: dict[str, Ledger], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = ledgers["withheld"]
    argv = ["--household", ledger.dids[0], "--from", DAY, "--to", DAY]
    assert main(["statement", "--db", f"sqlite:///{tmp_path / 'none.db'}", *argv]) == 2
    assert "cannot read the ledger" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert main(["statement", "--db", ledger.url, *argv]) == 2
    assert "records no schedule" in capsys.readouterr().err


def test_the_config_gives_the_ledger_the_household_and_the_schedule(
    ledgers: dict[str, Ledger], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config``: the node's ledger (data_dir/ledger.db), its key's DID, and the genesis
    schedule for a ledger that records none."""
    ledger = ledgers["plain"]
    home = ledger.path.parent.parent / "home"
    home.mkdir(exist_ok=True)
    sim = market_sim.build(HOUSEHOLDS, SEED)
    me = sim.households[1]
    key = home / "node.key"
    key.write_bytes(me.signer.seed())
    os.chmod(key, 0o600)
    members = [(h.signer.did, h.meter_serial, MemberRole.VOTER) for h in sim.households]
    write_genesis(create_genesis(sim.operator, sim.config, members), home / "genesis.json")
    (home / "microgrid.toml").write_text(f'data_dir = "{ledger.path.parent}"\n')
    argv = ["statement", "--config", str(home / "microgrid.toml"), "--from", DAY, "--to", DAY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"statement of {me.signer.did}" in out
    assert f"{PLAIN_SLOTS} settled slots" in out
    s = statement(ledger, me.signer.did)
    assert f"{money(abs(s.net_bill))} {'paid' if s.net_bill >= 0 else 'received'}" in out
    assert main([*argv, "--db", ledger.url]) == 2
    assert "not both" in capsys.readouterr().err
