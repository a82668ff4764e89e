"""Who gossips records (docs/network.md): a node that is not subscribed to the record topics
(a Raft learner) still reaches every subscribed peer it is connected to with its own records
(flood publish), receives and forwards nobody's, and can join or leave while running. Real
libp2p hosts on 127.0.0.1, in process."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.net.host import NetNode
from node.net.wire import TopicKind
from node.setup.genesis import load_genesis
from node.testing.harness import make_grid
from tests.net.test_membership_gate import Grid, connected, order, running, until

pytestmark = pytest.mark.slow


def subscribed_peers(node: NetNode, kind: TopicKind = TopicKind.ORDERS) -> set[str]:
    """The peers ``node`` believes are subscribed to ``kind``."""
    return {str(p) for p in node.pubsub.peer_topics.get(node.topics[kind], ())}


async def test_a_learner_publishes_to_the_voters_hears_nothing_and_can_join_and_leave(
    tmp_path: Path,
) -> None:
    specs, _, path = make_grid(tmp_path, 3)
    grid = Grid(load_genesis(path))
    s1, s2, sl = specs
    v1 = grid.node(s1, [])
    v2 = grid.node(s2, [s1])
    learner = grid.node(sl, [s1, s2], subscribe=False)
    async with running(grid.nodes):
        assert not learner.subscribed and v1.subscribed and v2.subscribed
        await until(lambda: connected(learner, v1) and connected(learner, v2), 20)
        await until(lambda: str(v2.peer_id) in subscribed_peers(v1), 20)
        await until(lambda: str(v1.peer_id) in subscribed_peers(learner)
                    and str(v2.peer_id) in subscribed_peers(learner), 20)  # fmt: skip
        assert str(learner.peer_id) not in subscribed_peers(v1) | subscribed_peers(v2)

        # its own record reaches both voters directly
        await learner.publish(TopicKind.ORDERS, [order(learner.identity, grid.genesis, 1)])
        await until(lambda: 1 in grid.got(v1, learner) and 1 in grid.got(v2, learner), 10)
        # a voter's record reaches the other voter, not the learner
        await v1.publish(TopicKind.ORDERS, [order(v1.identity, grid.genesis, 1)])
        await until(lambda: 1 in grid.got(v2, v1), 10)
        await trio.sleep(1.0)
        assert grid.records(learner, TopicKind.ORDERS) == []

        # promoted: it joins, and hears the voters' records
        assert await learner.subscribe_records(True)
        assert not await learner.subscribe_records(True)  # nothing to change
        await until(lambda: str(learner.peer_id) in subscribed_peers(v1), 10)
        await v1.publish(TopicKind.ORDERS, [order(v1.identity, grid.genesis, 2)])
        await until(lambda: 2 in grid.got(learner, v1), 10)

        # demoted: it leaves, hears nothing more, and still reaches the voters
        assert await learner.subscribe_records(False)
        await until(lambda: str(learner.peer_id) not in subscribed_peers(v1), 10)
        await v1.publish(TopicKind.ORDERS, [order(v1.identity, grid.genesis, 3)])
        await until(lambda: 3 in grid.got(v2, v1), 10)
        await learner.publish(TopicKind.ORDERS, [order(learner.identity, grid.genesis, 2)])
        await until(lambda: 2 in grid.got(v1, learner) and 2 in grid.got(v2, learner), 10)
        await trio.sleep(1.0)
        assert 3 not in grid.got(learner, v1)
        assert not v1.penalties.score(str(learner.peer_id))
        assert not v2.penalties.score(str(learner.peer_id))
