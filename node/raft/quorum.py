"""Majority arithmetic: committed index and election outcome over a voter set."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class VoteResult(enum.Enum):
    """Outcome of counting votes."""

    PENDING = 0
    LOST = 1
    WON = 2


def majority(n: int) -> int:
    """Smallest majority of ``n`` voters."""
    return n // 2 + 1


def committed_index(voters: Iterable[str], match: Mapping[str, int]) -> int:
    """Largest index replicated on a majority of ``voters`` (``match`` maps id -> index)."""
    idx = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not idx:
        return 0
    return idx[majority(len(idx)) - 1]


def vote_result(voters: Iterable[str], votes: Mapping[str, bool]) -> VoteResult:
    """WON with a majority of grants, LOST once a majority is out of reach, else PENDING."""
    vs = list(voters)
    if not vs:
        return VoteResult.WON
    granted = sum(1 for v in vs if votes.get(v) is True)
    rejected = sum(1 for v in vs if votes.get(v) is False)
    q = majority(len(vs))
    if granted >= q:
        return VoteResult.WON
    if granted + (len(vs) - granted - rejected) >= q:
        return VoteResult.PENDING
    return VoteResult.LOST
