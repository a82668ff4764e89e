"""Dashboard benchmark (issue 7): callback time and payload size on a year of 15-minute slots
for 100 households.

The ledger: 365 days × 96 slots = 35,040 slots and 100 households, written straight into the
ledger tables with bulk ``executemany`` inserts (sqlite3, journal off during generation) from a
seeded ``random.Random``. Rows are synthetic but consistent with each other the way the
dashboard reads them: per household and slot a PV/load profile gives metered import/export and
an order on the side of its forecast; per slot asks and bids are matched pro rata at one uniform
price between the tariffs (clearings, trades with buyer/seller prices, settlements with
sold/bought and imbalance = metered net export − contracted net export), one block per slot with
``tx_count`` as the engine would write it, ``balances`` and ``households``. Hashes and signatures
are random hex of the real lengths, so the ledger does not verify: verification is switched off
for the timed views (it runs in a background thread in the app, never inside a callback).
``transactions`` and ``postings`` are written for the last 7 days only — no view scans them (the
ledger view reads the newest 15 by primary key and sums ``tx_count`` from the block headers), so
their bulk would add generation time, not query time. The file is kept in the temp directory and
reused by the next run (``--fresh`` regenerates it).

What is timed: the real Dash callbacks, through the Flask test client (``POST
/_dash-update-component``, JSON encoding included), as the browser calls them: the head poll,
market (7 days, 30 days, the whole year), order book of one slot, households (one household over
7 days and the year), community, ledger, alerts, consensus (no API). ``cold`` is the first call
of a fresh app (the per-slot cache is filled from the whole year here), ``warm`` the median of
repeats with nothing new, ``+1 slot`` the refresh after one more slot was appended. Payload is
the size of the JSON response the browser receives.

Run: ``python -m bench.dashboard_bench [--days 365] [--households 100] [--fresh]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from dashboard.app import create_app
from dashboard.views import Context
from node.ledger import schema as t

FEED_IN, RETAIL = 8, 32
SLOTS_PER_DAY = 96
TX_DAYS = 7
BUDGET_S = 600
"""Time budget of the measurements (after the ledger exists)."""


def _sun(sod: int) -> float:
    hour = sod / 4 + 0.125
    return max(math.sin(math.pi * (hour - 6) / 13), 0.0) ** 1.5 if 6 <= hour <= 19 else 0.0


def _peak(sod: int) -> float:
    hour = sod / 4 + 0.125
    return (
        1 + 1.2 * math.exp(-(((hour - 7.5) / 1.2) ** 2)) + 2 * math.exp(-(((hour - 19) / 2) ** 2))
    )


SUN = [_sun(s) for s in range(SLOTS_PER_DAY)]
PEAK = [_peak(s) for s in range(SLOTS_PER_DAY)]


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


class Generator:
    """Writes a synthetic but consistent ledger of ``days`` × 96 slots for ``households``."""

    def __init__(self, path: Path, days: int, households: int, seed: int = 7) -> None:
        self.path = path
        self.slots = days * SLOTS_PER_DAY
        self.n = households
        self.rng = random.Random(seed)
        self.dids = [f"did:key:z6MkBench{i:05d}{_hex(self.rng, 28)}" for i in range(households)]
        self.pv_peak = [
            self.rng.randrange(3000, 9000) if i % 3 != 2 else 0 for i in range(households)
        ]
        self.base = [self.rng.randrange(250, 700) for _ in range(households)]
        self.sig = _hex(self.rng, 128)
        self.tx_from = self.slots - TX_DAYS * SLOTS_PER_DAY

    def profile(self, i: int, slot: int, cloud: float) -> tuple[int, int]:
        """(pv Wh, load Wh) of household i in slot (same shapes as node/tools/market_sim.py)."""
        sod = slot % SLOTS_PER_DAY
        pv = int(self.pv_peak[i] * SUN[sod] * cloud / 4)
        load = int(self.base[i] * PEAK[sod] * self.rng.uniform(0.7, 1.4) / 4)
        return pv, load

    def run(self) -> None:
        """Create the tables and write every row."""
        engine = create_engine(f"sqlite:///{self.path}")
        t.metadata.create_all(engine)
        engine.dispose()
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        cfg = {
            "grid": "bench-grid",
            "feed_in_tariff": FEED_IN,
            "retail_price": RETAIL,
            "mechanism": "uniform",
        }
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("schema_version", str(t.SCHEMA_VERSION)),
                ("grid", "bench-grid"),
                ("genesis_hash", _hex(self.rng, 64)),
                ("config", json.dumps(cfg, sort_keys=True)),
                ("applied_index", "0"),
            ],
        )
        balances: dict[tuple[str, str], int] = {}
        counters = [[0, 0] for _ in range(self.n)]
        rep = [[0, 0, 0, 0] for _ in range(self.n)]
        prev = _hex(self.rng, 64)
        tx_id = posting_id = 0
        batch: dict[str, list[tuple[Any, ...]]] = {
            k: []
            for k in (
                "blocks",
                "clearings",
                "orders",
                "trades",
                "readings",
                "settlements",
                "tx",
                "postings",
            )
        }
        sql = {
            "blocks": "INSERT INTO blocks (height, slot, hash, prev_hash, tx_root, trade_root, "
            "reading_root, state_hash, tx_count) VALUES (?,?,?,?,?,?,?,?,?)",
            "clearings": "INSERT INTO clearings VALUES (?,?,?,?,?,?,?,?)",
            # the nullable columns added after the first release (schema.ADDED_COLUMNS) stay NULL
            "orders": "INSERT INTO orders (slot, order_id, position, household, side, "
            "quantity_wh, price, nonce, signature) VALUES (?,?,?,?,?,?,?,?,?)",
            "trades": "INSERT INTO trades (slot, position, buy_id, sell_id, buyer, seller, "
            "quantity_wh, price, sell_price) VALUES (?,?,?,?,?,?,?,?,?)",
            "readings": "INSERT INTO readings VALUES (?,?,?,?,?,?,?,?,?)",
            "settlements": "INSERT INTO settlements VALUES (?,?,?,?,?,?,?,?,?,?)",
            "tx": "INSERT INTO transactions VALUES (?,?,?,?,?,?,?)",
            "postings": "INSERT INTO postings VALUES (?,?,?,?,?,?)",
        }
        for slot in range(self.slots):
            cloud = self.rng.uniform(0.35, 1.0)
            price = self.rng.randrange(14, 26)
            asks: list[tuple[int, int]] = []
            bids: list[tuple[int, int]] = []
            metered = []
            for i in range(self.n):
                pv, load = self.profile(i, slot, cloud)
                imp, exp = max(load - pv, 0), max(pv - load, 0)
                metered.append((imp, exp))
                forecast = int((pv - load) * self.rng.uniform(0.8, 1.1))
                if forecast > 20:
                    asks.append((i, int(forecast * 0.9)))
                elif forecast < -20:
                    bids.append((i, -forecast))
            ask_vol = sum(q for _, q in asks)
            bid_vol = sum(q for _, q in bids)
            volume = min(ask_vol, bid_vol)
            fa = volume / ask_vol if ask_vol else 0.0
            fb = volume / bid_vol if bid_vol else 0.0
            sold = dict.fromkeys(range(self.n), 0)
            bought = dict.fromkeys(range(self.n), 0)
            for pos, (i, q) in enumerate(asks + bids):
                side = "sell" if pos < len(asks) else "buy"
                lim = price - 3 if side == "sell" else price + 3
                batch["orders"].append(
                    (slot, f"{slot}-{i}", pos, self.dids[i], side, q, lim, slot + 1, self.sig)
                )
            for i, q in asks:
                sold[i] = int(q * fa)
            for i, q in bids:
                bought[i] = int(q * fb)
            # pair sellers with buyers in order for the trade rows
            sellers = [[i, sold[i]] for i, _ in asks if sold[i] > 0]
            buyers = [[i, bought[i]] for i, _ in bids if bought[i] > 0]
            pos = si = bi = 0
            trades = []
            while si < len(sellers) and bi < len(buyers):
                q = min(sellers[si][1], buyers[bi][1])
                if q > 0:
                    s, b = sellers[si][0], buyers[bi][0]
                    trades.append((s, b, q))
                    batch["trades"].append(
                        (
                            slot,
                            pos,
                            f"{slot}-{b}",
                            f"{slot}-{s}",
                            self.dids[b],
                            self.dids[s],
                            q,
                            price,
                            price,
                        )
                    )
                    pos += 1
                sellers[si][1] -= q
                buyers[bi][1] -= q
                if sellers[si][1] == 0:
                    si += 1
                if bi < len(buyers) and buyers[bi][1] == 0:
                    bi += 1
            participants = len({i for i, _ in asks} | {i for i, _ in bids})
            batch["clearings"].append(
                (
                    slot,
                    "uniform",
                    price if volume else None,
                    volume,
                    bid_vol,
                    ask_vol,
                    len(asks) + len(bids),
                    participants,
                )
            )
            imbalances = []
            for i, (imp, exp) in enumerate(metered):
                counters[i][0] += imp
                counters[i][1] += exp
                imb = (exp - imp) - (sold[i] - bought[i])
                imbalances.append((i, imb))
                delivered = min(max(exp - imp, 0), sold[i])
                taken = min(max(imp - exp, 0), bought[i])
                r = rep[i]
                r[0] += sold[i]
                r[1] += delivered
                r[2] += bought[i]
                r[3] += taken
                batch["readings"].append(
                    (
                        slot,
                        self.dids[i],
                        i,
                        "bench-grid",
                        f"BENCH{i:05d}",
                        counters[i][0],
                        counters[i][1],
                        slot + 2,
                        self.sig,
                    )
                )
                batch["settlements"].append(
                    (slot, self.dids[i], True, imp, exp, sold[i], bought[i], imb, delivered, taken)
                )
                acct = f"household:{self.dids[i]}"
                money = (-imb * RETAIL if imb < 0 else -imb * FEED_IN) // 1000
                money += (sold[i] - bought[i]) * price // 1000
                balances[(acct, "money")] = balances.get((acct, "money"), 0) + money
                balances[(acct, "energy")] = balances.get((acct, "energy"), 0) + imp - exp
            n_tx = len(trades) + sum(1 for _, imb in imbalances if imb)
            block_hash = _hex(self.rng, 64)
            batch["blocks"].append(
                (
                    slot + 1,
                    slot,
                    block_hash,
                    prev,
                    _hex(self.rng, 64),
                    _hex(self.rng, 64),
                    _hex(self.rng, 64),
                    _hex(self.rng, 64),
                    n_tx,
                )
            )
            prev = block_hash
            if slot >= self.tx_from:
                position = 0
                for s, b, q in trades:
                    tx_id += 1
                    batch["tx"].append(
                        (
                            tx_id,
                            slot + 1,
                            position,
                            _hex(self.rng, 64),
                            "trade",
                            slot,
                            f"{slot}:{slot}-{b}:{slot}-{s}",
                        )
                    )
                    position += 1
                    m = q * price // 1000
                    for acct, asset, amt in (
                        (f"household:{self.dids[b]}", "money", -m),
                        (f"household:{self.dids[s]}", "money", m),
                        (f"household:{self.dids[s]}", "energy", -q),
                        (f"household:{self.dids[b]}", "energy", q),
                    ):
                        posting_id += 1
                        batch["postings"].append((posting_id, tx_id, posting_id, acct, asset, amt))
                for i, imb in imbalances:
                    if not imb:
                        continue
                    tx_id += 1
                    batch["tx"].append(
                        (
                            tx_id,
                            slot + 1,
                            position,
                            _hex(self.rng, 64),
                            "imbalance",
                            slot,
                            self.dids[i],
                        )
                    )
                    position += 1
                    m = abs(imb) * (FEED_IN if imb > 0 else RETAIL) // 1000
                    sign = 1 if imb > 0 else -1
                    for acct, asset, amt in (
                        (f"household:{self.dids[i]}", "money", sign * m),
                        ("grid", "money", -sign * m),
                        (f"household:{self.dids[i]}", "energy", -imb),
                        ("grid", "energy", imb),
                    ):
                        posting_id += 1
                        batch["postings"].append((posting_id, tx_id, posting_id, acct, asset, amt))
            if slot % SLOTS_PER_DAY == SLOTS_PER_DAY - 1 or slot == self.slots - 1:
                for key, rows in batch.items():
                    if rows:
                        db.executemany(sql[key], rows)
                        rows.clear()
                db.commit()
                if (slot + 1) % (30 * SLOTS_PER_DAY) == 0:
                    print(f"  generated {slot + 1} slots", flush=True)
        grid_money = -sum(v for (a, s), v in balances.items() if s == "money")
        grid_energy = -sum(v for (a, s), v in balances.items() if s == "energy")
        db.executemany(
            "INSERT INTO balances VALUES (?,?,?)",
            [(a, s, v) for (a, s), v in balances.items()]
            + [("grid", "money", grid_money), ("grid", "energy", grid_energy)],
        )
        db.executemany(
            "INSERT INTO households VALUES (?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    self.dids[i],
                    f"BENCH{i:05d}",
                    "voter" if i < 5 else "learner",
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    self.slots,
                    0,
                    (1000 * (r[1] + r[3]) // (r[0] + r[2])) if r[0] + r[2] else 1000,
                )
                for i, r in enumerate(rep)
            ],
        )
        db.execute("INSERT INTO meta VALUES ('bench_complete', ?)", (str(self.slots),))
        db.commit()
        db.execute("PRAGMA journal_mode=WAL")
        db.close()

    def append_slot(self) -> None:
        """One more settled slot (its clearing, settlements and block), as a node would add."""
        db = sqlite3.connect(self.path)
        slot = db.execute("SELECT max(slot) FROM blocks").fetchone()[0] + 1
        height = db.execute("SELECT max(height) FROM blocks").fetchone()[0] + 1
        prev = db.execute("SELECT hash FROM blocks WHERE height = ?", (height - 1,)).fetchone()[0]
        db.execute(
            "INSERT INTO clearings VALUES (?,?,?,?,?,?,?,?)",
            (slot, "uniform", 20, 1000, 1500, 1200, 10, 10),
        )
        db.executemany(
            "INSERT INTO settlements VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(slot, d, True, 100, 50, 0, 0, -50, 0, 0) for d in self.dids],
        )
        db.execute(
            "INSERT INTO blocks (height, slot, hash, prev_hash, tx_root, trade_root, reading_root, "
            "state_hash, tx_count) VALUES (?,?,?,?,?,?,?,?,?)",
            (height, slot, _hex(self.rng, 64), prev, *(_hex(self.rng, 64) for _ in range(4)), 100),
        )
        db.commit()
        db.close()


class Caller:
    """Calls the app's Dash callbacks through the Flask test client, as the browser does."""

    def __init__(self, ctx: Context) -> None:
        self.app = create_app(ctx)
        self.client = self.app.server.test_client()
        self.client.get("/")
        deps = json.loads(self.client.get("/_dash-dependencies").data)
        self.deps = {d["output"]: d for d in deps}

    def call(
        self, output_key: str, inputs: dict[str, Any], state: dict[str, Any] | None = None
    ) -> tuple[float, int, Any]:
        """POST one callback; returns (seconds, response bytes, decoded response)."""
        dep = self.deps[output_key]
        values = {**inputs, **(state or {})}

        def spec(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = []
            for item in items:
                key = f"{item['id']}.{item['property']}"
                out.append(
                    {"id": item["id"], "property": item["property"], "value": values.get(key)}
                )
            return out

        outputs = [
            {"id": o.split(".")[0], "property": o.split(".")[1]}
            for o in output_key.strip(".").split("...")
        ]
        body = {
            "output": output_key,
            "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": spec(dep["inputs"]),
            "state": spec(dep["state"]),
            "changedPropIds": [next(iter(inputs))],
        }
        start = time.perf_counter()
        resp = self.client.post("/_dash-update-component", json=body)
        elapsed = time.perf_counter() - start
        if resp.status_code not in (200, 204):
            raise RuntimeError(f"{output_key}: HTTP {resp.status_code}: {resp.data[:300]!r}")
        return elapsed, len(resp.data), json.loads(resp.data) if resp.data else None


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:,.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the ledger, then time every view's callback."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--households", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fresh", action="store_true", help="regenerate the ledger")
    p.add_argument("--db", default=None, help="where to keep the generated ledger")
    args = p.parse_args(argv)
    started = time.monotonic()
    path = Path(
        args.db
        or os.path.join(
            tempfile.gettempdir(), f"microgrid-dashboard-bench-{args.days}d-{args.households}h.db"
        )
    )
    gen = Generator(path, args.days, args.households)
    complete = False
    if path.exists() and not args.fresh:
        try:
            with sqlite3.connect(path) as db:
                row = db.execute("SELECT value FROM meta WHERE key='bench_complete'").fetchone()
                complete = row is not None
        except sqlite3.Error:
            complete = False
    if not complete:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        print(
            f"generating {args.days} days × 96 slots × {args.households} households into {path}",
            flush=True,
        )
        t0 = time.monotonic()
        gen.run()
        print(f"generated in {time.monotonic() - t0:.1f} s", flush=True)
    with sqlite3.connect(path) as db:
        sizes = {
            name: db.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            for name in (
                "blocks",
                "clearings",
                "orders",
                "trades",
                "readings",
                "settlements",
                "transactions",
                "postings",
            )
        }
    print(
        f"ledger {path} ({path.stat().st_size / 2**20:,.0f} MiB): "
        + ", ".join(f"{k} {v:,}" for k, v in sizes.items()),
        flush=True,
    )

    started = time.monotonic()
    url = f"sqlite:///{path}"
    ctx = Context.open(url, None, verify_enabled=False)
    caller = Caller(ctx)
    with sqlite3.connect(path) as db:
        did = db.execute("SELECT did FROM households ORDER BY did LIMIT 1 OFFSET 7").fetchone()[0]
        book_slot = db.execute("SELECT max(slot) FROM clearings WHERE volume_wh > 0").fetchone()[0]
    head: dict[str, Any] = {}

    def poll() -> Any:
        nonlocal head
        _, _, resp = caller.call("head.data", {"tick.n_intervals": 1}, {"head.data": None})
        head = resp["response"]["head"]["data"]
        return head

    cases: list[tuple[str, Callable[[], tuple[float, int, Any]]]] = [
        (
            "head poll (every tick)",
            lambda: caller.call("head.data", {"tick.n_intervals": 1}, {"head.data": head}),
        ),
        (
            "market, 7 days",
            lambda: caller.call("market-graph.figure", {"head.data": head, "window.value": "7d"}),
        ),
        (
            "market, 30 days",
            lambda: caller.call("market-graph.figure", {"head.data": head, "window.value": "30d"}),
        ),
        (
            "market, whole year",
            lambda: caller.call("market-graph.figure", {"head.data": head, "window.value": "all"}),
        ),
        (
            "order book, one slot",
            lambda: caller.call(
                "..book-graph.figure...book-summary.children..",
                {"head.data": head, "slot-input.value": book_slot},
            ),
        ),
        (
            "households, 7 days",
            lambda: caller.call(
                "..household-graph.figure...household-table.children...household.options"
                "...household.value..",
                {"head.data": head, "household.value": did, "window.value": "7d"},
            ),
        ),
        (
            "households, whole year",
            lambda: caller.call(
                "..household-graph.figure...household-table.children...household.options"
                "...household.value..",
                {"head.data": head, "household.value": did, "window.value": "all"},
            ),
        ),
        (
            "community, 7 days",
            lambda: caller.call(
                "..community-kpis.children...community-graph.figure..",
                {"head.data": head, "window.value": "7d"},
            ),
        ),
        (
            "community, whole year",
            lambda: caller.call(
                "..community-kpis.children...community-graph.figure..",
                {"head.data": head, "window.value": "all"},
            ),
        ),
        (
            "ledger",
            lambda: caller.call(
                "..ledger-summary.children...ledger.children..", {"head.data": head}
            ),
        ),
        ("alerts", lambda: caller.call("alerts.children", {"head.data": head, "api.data": None})),
        (
            "consensus (no API)",
            lambda: caller.call(
                "..network-kpis.children...invalid-graph.figure...lag-graph.figure..",
                {"api.data": {"configured": False}},
            ),
        ),
    ]
    t0 = time.perf_counter()
    poll()
    cold_fill = time.perf_counter() - t0
    print(
        f"\ncold: first head poll (fills the per-slot cache from {sizes['blocks']:,} slots): "
        f"{cold_fill * 1000:,.0f} ms\n",
        flush=True,
    )
    print(f"{'view':<26} {'cold ms':>9} {'warm ms':>9} {'+1 slot ms':>11} {'payload':>12}")
    results = []
    for name, fn in cases:
        if time.monotonic() - started > BUDGET_S:
            print(f"{name:<26} skipped: time budget of {BUDGET_S} s used up")
            continue
        cold, size, _ = fn()
        warm = statistics.median(fn()[0] for _ in range(args.repeats))
        results.append([name, cold, warm, size])
    # one more slot reaches the ledger: the poll and every view refresh once
    gen.append_slot()
    t0 = time.perf_counter()
    poll()
    new_poll = time.perf_counter() - t0
    for row, (_name, fn) in zip(results, cases, strict=False):
        row.append(fn()[0])
    for name, cold, warm, size, after in results:
        print(
            f"{name:<26} {cold * 1000:>9.1f} {warm * 1000:>9.1f} {after * 1000:>11.1f} "
            f"{_fmt_bytes(size):>12}"
        )
    total = sum(r[4] for r in results[1:] if "whole year" not in r[0] and "30 days" not in r[0])
    print(f"\nhead poll that finds 1 new slot (incremental cache update): {new_poll * 1000:.1f} ms")
    print(f"one refresh of the default page (7-day window, every view): {total * 1000:.0f} ms")
    print(f"load average while measuring: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"total bench time {time.monotonic() - started:.0f} s")
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
