"""Members learn and keep each other's addresses (``/microgrid/addrs/1.0.0``).

The static dial list names the genesis bootstrap and the config's peers only; a household
admitted at runtime that dialled one member must still end up connected to every member (a Raft
leader anywhere must reach it), also after a member restarts, and a removed member is not
redialled. The real-host test runs NetNodes (py-libp2p) in process on 127.0.0.1; the others
feed hostile address books to a node that is not started.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from node.net.host import ADDRS_MAX_ENTRIES, NetNode, NetSettings, dialable_address
from node.net.validator import PeerFault
from node.setup.genesis import Genesis, load_genesis
from node.setup.keyfile import NodeIdentity
from node.testing.harness import NodeSpec, make_grid

PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
OTHER = "12D3KooWBnext1nJmuB4uTkDDtJzZxDrdHqnLqVYV9mqtQ3o5DkS"


def node(spec: NodeSpec, genesis: Genesis, peers: Sequence[NodeSpec] = (), **kw: Any) -> NetNode:
    """A NetNode for ``spec`` dialling ``peers`` (quick back-off for the test)."""
    settings = NetSettings(listen=spec.listen, peers=[p.addr for p in peers],
                           reconnect_max=1.0, **kw)  # fmt: skip
    return NetNode(NodeIdentity.from_seed(spec.seed), genesis, settings,
                   slot_policy=lambda r: None)  # fmt: skip


def connected(a: NetNode, b: NetNode) -> bool:
    """``a`` has a connection to ``b``."""
    return str(b.peer_id) in {str(p) for p in a.connected_peers()}


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``pred()`` holds; fails naming ``what`` after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout} s: {what}")


# --- address validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "loopback", "expected"),
    [
        ("/ip4/192.0.2.7/tcp/4001", False, "/ip4/192.0.2.7/tcp/4001"),
        (f"/ip4/192.0.2.7/tcp/4001/p2p/{PEER}", False, "/ip4/192.0.2.7/tcp/4001"),
        (f"/ip4/192.0.2.7/tcp/4001/p2p/{OTHER}", False, None),  # names another peer
        ("/ip4/10.1.2.3/tcp/04001", False, "/ip4/10.1.2.3/tcp/4001"),
        ("/ip6/2001:db8:0:0::1/tcp/4001", False, "/ip6/2001:db8::1/tcp/4001"),
        ("/dns4/node.example.org/tcp/4001", False, "/dns4/node.example.org/tcp/4001"),
        ("/ip4/127.0.0.1/tcp/4001", False, None),
        ("/ip4/127.0.0.1/tcp/4001", True, "/ip4/127.0.0.1/tcp/4001"),
        ("/dns/localhost/tcp/4001", False, None),
        ("/ip4/0.0.0.0/tcp/4001", True, None),
        ("/ip4/224.0.0.1/tcp/4001", False, None),
        ("/ip4/169.254.1.1/tcp/4001", False, None),
        ("/ip6/fe80::1/tcp/4001", False, None),
        ("/ip4/255.255.255.255/tcp/4001", False, None),
        ("/ip4/192.0.2.7/tcp/0", False, None),
        ("/ip4/192.0.2.7/tcp/65536", False, None),
        ("/ip4/192.0.2.7/tcp/+80", False, None),
        ("/ip4/192.0.2.7/udp/4001/quic-v1", False, None),
        (f"/ip4/192.0.2.7/tcp/4001/p2p/{OTHER}/p2p-circuit/p2p/{PEER}", False, None),
        ("/ip4/192.0.2.7/tcp/4001/ws", False, None),
        ("/ip4/999.0.2.7/tcp/4001", False, None),
        ("/dns4/-bad-.example/tcp/4001", False, None),
        ("/dns4/" + "a" * 300 + "/tcp/1", False, None),
        ("ip4/192.0.2.7/tcp/4001", False, None),
        ("", False, None),
    ],
)
def test_dialable_address(addr: str, loopback: bool, expected: str | None) -> None:
    """Only TCP over an IP or DNS name we would dial; normalised, without /p2p/."""
    assert dialable_address(addr, peer=PEER, loopback=loopback) == expected


def test_an_unspecified_address_takes_the_observed_ip() -> None:
    """A node listening on 0.0.0.0 reports that: its own report takes the connection's IP."""
    got = dialable_address("/ip4/0.0.0.0/tcp/4001", peer=PEER, loopback=False,
                           observed_ip="198.51.100.4")  # fmt: skip
    assert got == "/ip4/198.51.100.4/tcp/4001"
    assert dialable_address("/ip4/0.0.0.0/tcp/4001", peer=PEER, loopback=False,
                            observed_ip="0.0.0.0") is None  # fmt: skip


def test_a_hostile_address_book_is_bounded(tmp_path: Path) -> None:
    """Garbage is a fault; entries about non-members are skipped; at most ``max_peer_addrs``
    per member; hearsay never displaces a member's own report, and takes the place only of
    hearsay whose last dial failed; a removed member's addresses are forgotten."""
    specs, outsiders, path = make_grid(tmp_path, 3, outsiders=1)
    genesis = load_genesis(path)
    sa, sb, sc = specs
    (sx,) = outsiders
    a = node(sa, genesis, allow_loopback_addrs=False, max_peer_addrs=2)
    b_id, c_id = NodeIdentity.from_seed(sb.seed).peer_id, NodeIdentity.from_seed(sc.seed).peer_id
    b, c = str(b_id), str(c_id)

    def book(entries: dict[str, Any]) -> bytes:
        return json.dumps({"v": 1, "addrs": entries}).encode()

    for garbage in (b"\xff\x00", b"[]", b'{"addrs": []}', book({c: "x"}),
                    book({f"p{i}": [] for i in range(ADDRS_MAX_ENTRIES + 1)})):  # fmt: skip
        with pytest.raises(PeerFault) as exc:
            a._learn_addrs(b_id, garbage, None)
        assert exc.value.protocol == "addrs" and exc.value.reason == "malformed"

    many = [f"/ip4/192.0.2.{i}/tcp/4001" for i in range(1, 200)]
    assert a._learn_addrs(b_id, book({sx.peer_id: many, c: ["/ip4/127.0.0.1/tcp/1", *many],
                                      b: ["/ip4/198.51.100.1/tcp/1", 7, None]}), None)  # fmt: skip
    assert a.known_addrs(sx.peer_id) == []  # not a member
    assert a.known_addrs(c) == many[:2]  # loopback refused here, then the cap
    assert a.known_addrs(b) == ["/ip4/198.51.100.1/tcp/1"]  # its own report; junk skipped
    # nothing new: not "learned" again
    assert not a._learn_addrs(b_id, book({c: many[:2]}), None)
    # hearsay cannot displace, until one of its addresses failed to dial
    a._learn_addrs(b_id, book({c: many[5:7]}), None)
    assert a.known_addrs(c) == many[:2]
    a._dialled(c, many[0], ok=False)
    a._learn_addrs(b_id, book({c: many[5:6]}), None)
    assert a.known_addrs(c) == [many[1], many[5]]
    # the member's own report comes first and is replaced by its next one
    a._learn_addrs(c_id, book({c: ["/ip4/203.0.113.9/tcp/9"]}), None)
    assert a.known_addrs(c)[0] == "/ip4/203.0.113.9/tcp/9"
    a._learn_addrs(c_id, book({c: ["/ip4/203.0.113.10/tcp/9"]}), None)
    assert a.known_addrs(c)[0] == "/ip4/203.0.113.10/tcp/9"
    assert "/ip4/203.0.113.9/tcp/9" not in a.known_addrs(c)
    assert len(a._encode_book()) < 4096
    a.update_members([sa.did, sb.did])  # c removed
    assert a.known_addrs(c) == [] and c not in a.address_book()


# --- real hosts on 127.0.0.1 -------------------------------------------------------------------


@pytest.mark.slow
async def test_a_member_admitted_at_runtime_reaches_every_member_and_after_a_restart(
    tmp_path: Path,
) -> None:
    """A, B, C are the genesis members (A dials B and C, B dials C); N, admitted at runtime,
    dials B only. Once every node lists N: N is connected to A and C too (their addresses
    came from B; N's reached A and C through B). C restarts (its new process dials A and B
    only): N and C are connected again. N removed: nobody keeps a loop for it or its
    addresses (N itself still dials them and is refused at their gates)."""
    specs, outsiders, path = make_grid(tmp_path, 3, outsiders=1)
    genesis = load_genesis(path)
    sa, sb, sc = specs
    (sn,) = outsiders
    a, b = node(sa, genesis, [sb, sc]), node(sb, genesis, [sc])
    c = node(sc, genesis)
    n = node(sn, genesis, [sb])
    members = [*genesis.member_dids, sn.did]
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for x in (a, b, c, n):
                await nursery.start(x.run)
            await until(lambda: b.refused.get("non_member", 0) >= 1, 15, "B refused N")
            started = trio.current_time()
            for x in (a, b, c, n):
                x.update_members(members)
            nodes = {"A": a, "B": b, "C": c}
            await until(lambda: all(connected(n, x) and connected(x, n) for x in nodes.values()),
                        30, "N connected to A, B and C")  # fmt: skip
            print(f"\nN connected to every member {trio.current_time() - started:.1f} s after "
                  "its admission")  # fmt: skip
            # and each keeps a loop for the other (the exchange on the new connection)
            await until(lambda: all(str(n.peer_id) in x._dial_loops and str(x.peer_id)
                                    in n._dial_loops for x in (a, c)), 10,
                        "A and C keep a loop for N, N for them")  # fmt: skip

            # C restarts with the same key and port; its static list does not name N
            c.stop()
            await until(lambda: not connected(n, c) and not connected(a, c), 15, "C down")
            await trio.sleep(1.5)  # a few of N's redials fail meanwhile
            c2 = node(sc, genesis, [sa, sb])
            c2.update_members(members)
            restarted = trio.current_time()
            await nursery.start(c2.run)
            await until(lambda: connected(n, c2) and connected(c2, n), 30, "N and C reconnected")
            print(f"N and the restarted C reconnected in {trio.current_time() - restarted:.1f} s")
            await until(lambda: bool(c2.known_addrs(str(n.peer_id))), 10,
                        "the restarted C learned N's address")  # fmt: skip

            # N removed: disconnected, its addresses forgotten, its learned loops end
            for x in (a, b, c2):
                x.update_members(genesis.member_dids)
            key = str(n.peer_id)
            await until(lambda: all(key not in x._dial_loops for x in (a, c2)), 15,
                        "learned loops for N ended")  # fmt: skip
            assert all(not x.known_addrs(key) and key not in x.address_book() for x in (a, b, c2))
            for x in (a, b, c2, n):
                x.stop()
