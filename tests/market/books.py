"""Hypothesis strategies and helpers for order books."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class Bid:
    """Minimal order: exactly the attributes ``clear`` reads."""

    id: str
    side: str
    quantity_wh: int
    price: int


def book(
    max_orders: int = 12, max_qty: int = 5000, price_lo: int = 8, price_hi: int = 32
) -> st.SearchStrategy[list[Bid]]:
    """Books with unique ids, random sides, positive quantities and prices in a band."""

    @st.composite
    def _book(draw: st.DrawFn) -> list[Bid]:
        n = draw(st.integers(0, max_orders))
        return [
            Bid(
                id=f"o{i}",
                side=draw(st.sampled_from(["buy", "sell"])),
                quantity_wh=draw(st.integers(1, max_qty)),
                price=draw(st.integers(price_lo, price_hi)),
            )
            for i in range(n)
        ]

    return _book()
