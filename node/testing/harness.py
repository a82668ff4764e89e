"""Scripted node processes for multi-process tests and benchmarks on 127.0.0.1.

The child (``python -m node.testing.harness --seed HEX --genesis PATH --listen ADDR``) runs one
:class:`~node.net.host.NetNode` and speaks JSON lines: commands on stdin, events on stdout.

Commands: ``publish`` (hex batch, validated like production), ``publish_raw`` (hex bytes
published without our own validation: a misbehaving peer), ``raft`` (send a heartbeat to a DID),
``raft_forged`` (write a frame whose ``frm`` is someone else), ``stats``, ``stop``.
Events: ``ready``, ``gossip`` (per delivered batch, with record nonces and receive time),
``raft`` (per accepted Raft message), ``stats``, ``published``, ``error``.

The parent side is :class:`NodeProc` (trio) and :func:`make_grid` (keys, ports, genesis).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from market.models import MemberRole
from market.signing import Signer
from market.state import MarketConfig
from node.tools.ports import free_ports

SEED_PREFIX = b"microgrid-test-"


def named_seed(name: str) -> bytes:
    """A deterministic 32-byte seed for a named test identity."""
    import hashlib

    return hashlib.sha256(SEED_PREFIX + name.encode()).digest()


@dataclass
class NodeSpec:
    """One test household: its seed, listen address and identity strings."""

    name: str
    seed: bytes
    port: int
    did: str
    peer_id: str

    @property
    def listen(self) -> str:
        """Listen multiaddr."""
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    @property
    def addr(self) -> str:
        """Dialable multiaddr with /p2p/."""
        return f"{self.listen}/p2p/{self.peer_id}"

    @property
    def signer(self) -> Signer:
        """The household's record signer."""
        return Signer.from_seed(self.seed)


def make_grid(
    directory: Path, members: int, *, outsiders: int = 0, grid: str = "test-grid",
    slot_seconds: int = 900,
) -> tuple[list[NodeSpec], list[NodeSpec], Path]:
    """Create ``members`` member households (+ ``outsiders``) and a signed genesis file."""
    from node.setup.genesis import create_genesis, write_genesis
    from node.setup.keyfile import NodeIdentity

    ports = free_ports(members + outsiders)
    specs = []
    for i in range(members + outsiders):
        name = f"{'h' if i < members else 'x'}{i}"
        seed = named_seed(f"{grid}/{name}")
        ident = NodeIdentity.from_seed(seed)
        specs.append(NodeSpec(name, seed, ports[i], ident.did, str(ident.peer_id)))
    operator = Signer.from_seed(named_seed(f"{grid}/operator"))
    market = MarketConfig(grid=grid, operator=operator.did, feed_in_tariff=8, retail_price=30)
    genesis = create_genesis(
        operator,
        market,
        [
            (s.did, f"meter-{s.name}", MemberRole.VOTER if i < 3 else MemberRole.LEARNER)
            for i, s in enumerate(specs[:members])
        ],
        slot_seconds=slot_seconds,
        gate_closure_lead_seconds=0,
        bootstrap=[s.addr for s in specs[:members]],
    )
    path = directory / "genesis.json"
    write_genesis(genesis, path, overwrite=True)
    return specs[:members], specs[members:], path


# ---------------------------------------------------------------------------------------
# a hostile member, in process (tests/net/test_hostile.py)


def pubsub_message(identity: Any, topic: str, data: bytes, seqno: int, *,
                   from_id: bytes | None = None, key: bytes | None = None,
                   signature: bytes | None = None) -> Any:  # fmt: skip
    """A gossipsub message signed by ``identity`` as libp2p signs it (strict signing); the
    keyword arguments replace fields after signing (a forged or broken message)."""
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX

    msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=identity.peer_id.to_bytes(),
                          seqno=seqno.to_bytes(8, "big"))  # fmt: skip
    payload = PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
    msg.signature = identity.key_pair.private_key.sign(payload)
    msg.key = identity.key_pair.public_key.serialize()
    if from_id is not None:
        msg.from_id = from_id
    if key is not None:
        msg.key = key
    if signature is not None:
        msg.signature = signature
    return msg


def rpc_frame(*messages: Any) -> bytes:
    """A varint-prefixed pubsub RPC publishing ``messages``."""
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.utils.varint import encode_uvarint

    body = rpc_pb2.RPC(publish=list(messages)).SerializeToString()
    return bytes(encode_uvarint(len(body))) + body


async def raw_stream(node: Any, peer: str, protocol: str, timeout: float = 5.0) -> Any:
    """Open a stream from ``node`` to ``peer`` (base58) speaking ``protocol``, for writing
    whatever a hostile peer would."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    with trio.fail_after(timeout):
        return await node.host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])


# ---------------------------------------------------------------------------------------
# parent side


class NodeProc:
    """A child node process driven over JSON lines (trio)."""

    def __init__(self, spec: NodeSpec, genesis: Path, *, extra_args: Sequence[str] = ()) -> None:
        self.spec = spec
        self.genesis = genesis
        self.extra_args = list(extra_args)
        self.proc: trio.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr_tail: list[str] = []

    async def start(self, nursery: trio.Nursery) -> None:
        """Spawn the child and start reading its output (tasks live in ``nursery``)."""
        self.events = []
        cmd = [
            sys.executable, "-m", "node.testing.harness", "--seed", self.spec.seed.hex(),
            "--genesis", str(self.genesis), "--listen", self.spec.listen, *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await trio.lowlevel.open_process(
            cmd, stdin=-1, stdout=-1, stderr=-1, env=env,  # -1 == subprocess.PIPE
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        nursery.start_soon(self._read_stdout, self.proc)
        nursery.start_soon(self._read_stderr, self.proc)

    async def _read_stdout(self, proc: trio.Process) -> None:
        buf = b""
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.stderr_tail.append(line.decode(errors="replace"))

    async def _read_stderr(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            self.stderr_tail.extend(chunk.decode(errors="replace").splitlines())
            del self.stderr_tail[:-200]

    async def send(self, **command: Any) -> None:
        """Send one command."""
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps(command) + "\n").encode())

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` satisfying ``pred``; fails after ``timeout``."""
        with trio.fail_after(timeout):
            i = start
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.spec.name} exited {self.proc.returncode}: "
                        + "\n".join(self.stderr_tail[-30:])
                    )
                await trio.sleep(0.02)

    async def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the ``ready`` event."""
        return await self.wait_for(lambda e: e.get("ev") == "ready", timeout)

    async def stats(self, timeout: float = 10.0, metrics: bool = False) -> dict[str, Any]:
        """Ask for and return a fresh ``stats`` event (with the Prometheus text if asked)."""
        mark = len(self.events)
        await self.send(cmd="stats", metrics=metrics)
        return await self.wait_for(lambda e: e.get("ev") == "stats", timeout, start=mark)

    def gossip_events(self) -> list[dict[str, Any]]:
        """Every delivered batch so far."""
        return [e for e in self.events if e.get("ev") == "gossip"]

    def kill(self) -> None:
        """SIGKILL the child."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the child to stop; SIGKILL it if it does not exit within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.send(cmd="stop")
            with trio.move_on_after(timeout):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.kill()
                with trio.move_on_after(5):
                    await self.proc.wait()
        return self.proc.returncode


async def wait_mesh(procs: Sequence[NodeProc], minimum: int, timeout: float = 60.0) -> float:
    """Wait until every node has ``minimum`` mesh peers on both topics; returns seconds."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while True:
            ok = True
            for p in procs:
                s = await p.stats()
                if min(s["mesh_orders"], s["mesh_readings"]) < minimum:
                    ok = False
                    break
            if ok:
                return time.monotonic() - start
            await trio.sleep(0.1)


async def wait_pubsub_session(a: NodeProc, b: NodeProc, kind: str = "orders",
                              timeout: float = 30.0) -> float:  # fmt: skip
    """Wait until ``a`` and ``b`` each have a pubsub stream to the other and know that the
    other subscribes to ``kind``; returns seconds.

    From then on each one's own publications reach the other directly (a node floods its own
    messages to every subscribed peer, mesh or not). After a (re)connection that takes the
    pubsub hello exchange on the new connection, a few milliseconds on an idle machine.
    """
    start = time.monotonic()
    with trio.fail_after(timeout):
        while True:
            sa, sb = await a.stats(), await b.stats()
            if (
                b.spec.peer_id in sa["pubsub_peers"]
                and b.spec.peer_id in sa["subscribed_peers"][kind]
                and a.spec.peer_id in sb["pubsub_peers"]
                and a.spec.peer_id in sb["subscribed_peers"][kind]
            ):
                return time.monotonic() - start
            await trio.sleep(0.05)


# ---------------------------------------------------------------------------------------
# child side


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


async def _child(args: argparse.Namespace) -> None:
    from libp2p.peer.id import ID

    from node.net.host import NetNode, NetSettings, PublishError, configure_logging
    from node.net.raft_transport import RAFT_PROTOCOL_ID
    from node.net.wire import TopicKind, decode_batch, frame
    from node.raft import Message, MessageType, decode_message, encode_message
    from node.setup.genesis import load_genesis
    from node.setup.keyfile import NodeIdentity

    configure_logging(args.log_level)
    identity = NodeIdentity.from_seed(bytes.fromhex(args.seed))
    genesis = load_genesis(args.genesis)
    settings = NetSettings(
        listen=args.listen,
        peers=[a for a in genesis.bootstrap if not a.endswith(str(identity.peer_id))]
        + list(args.peer),
        rate_per_origin=args.rate,
        burst_per_origin=args.rate * 5,
        ban_seconds=args.ban_seconds,
    )

    def on_gossip(kind: TopicKind, records: tuple[Any, ...], origin: str) -> None:
        _emit(ev="gossip", kind=kind.value, origin=origin, t=time.time(),
              nonces=[r.nonce for r in records], n=len(records))  # fmt: skip

    def on_raft(msg: Any) -> None:
        _emit(ev="raft", frm=msg.frm, to=msg.to, type=int(msg.type), term=msg.term, t=time.time())

    node = NetNode(
        identity, genesis, settings, on_gossip=on_gossip,
        slot_policy=(lambda r: None) if args.no_slot_policy else None,
        raft_codec=(encode_message, decode_message), on_raft=on_raft,
    )  # fmt: skip

    async def flood(cmd: dict[str, Any]) -> None:
        """Publish ``count`` batches of ``per_batch`` fresh orders, ``interval`` s apart."""
        from market.models import Order, Side

        count, per, nonce = int(cmd["count"]), int(cmd.get("per_batch", 1)), int(cmd["nonce"])
        # an open slot inside the horizon, so the slot policy (if on) lets the orders through
        slot = genesis.schedule.open_slot(time.time()) + 2
        batches = [
            [
                Order(grid=genesis.grid, nonce=nonce + i * per + j, id=f"f{nonce + i * per + j}",
                      household=identity.did, side=Side.SELL, slot=slot, quantity_wh=100,
                      price=10).signed_by(identity.signer)
                for j in range(per)
            ]
            for i in range(count)
        ]
        errors = 0
        start = time.time()
        for i, records in enumerate(batches):
            try:
                await node.publish(TopicKind.ORDERS, records)
            except PublishError:
                errors += 1
            if cmd.get("each"):
                _emit(ev="pub", i=i, t=time.time(), nonce=records[0].nonce)
            await trio.sleep(float(cmd.get("interval", 0.0)))
        _emit(ev="flooded", start=start, end=time.time(), count=count, errors=errors,
              tag=cmd.get("tag"))  # fmt: skip

    async def commands() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buf = b""
        async for chunk in stdin:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    await handle(json.loads(line))
        node.stop()  # parent went away

    async def handle(cmd: dict[str, Any]) -> None:
        name = cmd["cmd"]
        if name == "stop":
            node.stop()
        elif name == "stats":
            v = node.validator
            _emit(
                ev="stats",
                peers=[str(p) for p in node.connected_peers()],
                mesh_orders=len(node.mesh_peers(TopicKind.ORDERS)),
                mesh_readings=len(node.mesh_peers(TopicKind.READINGS)),
                accepted=v.accepted,
                rejected=dict(v.rejected),
                rejected_by_peer={f"{p}|{r}": n for (p, r), n in v.rejected_by_peer.items()},
                delivered=node.delivered,
                delivered_records=node.delivered_records,
                refused=node.refused,
                banned=sorted(node.penalties.banned_until),
                pubsub_peers=sorted(str(p) for p in node.pubsub.peers),
                subscribed_peers={
                    k.value: sorted(str(p) for p in node.pubsub.peer_topics.get(t, ()))
                    for k, t in node.topics.items()
                },
                blacklisted=sorted(str(p) for p in node.pubsub.blacklisted_peers),
                mesh=node.mesh_peers(TopicKind.ORDERS),
                raft_sent=node.raft.sent if node.raft else 0,
                raft_received=node.raft.received if node.raft else 0,
                raft_rejected=node.raft.rejected if node.raft else {},
                raft_dropped=node.raft.dropped if node.raft else {},
                metrics=node.metrics.render().decode() if cmd.get("metrics") else "",
                rss_kb=_rss_kb(),
                cpu_s=time.process_time(),
            )
        elif name in ("publish", "publish_raw"):
            kind = TopicKind(cmd["kind"])
            data = bytes.fromhex(cmd["hex"])
            try:
                if name == "publish":
                    await node.publish(kind, decode_batch(data, kind))
                else:
                    await node.publish_raw(kind, data)
                _emit(ev="published", tag=cmd.get("tag"), t=time.time())
            except PublishError as exc:
                _emit(ev="error", tag=cmd.get("tag"), reason=exc.verdict.reason)
        elif name == "flood":
            await flood(cmd)
        elif name == "raft":
            assert node.raft is not None
            msg = Message(
                type=MessageType.HEARTBEAT, to=cmd["to"], frm=identity.did,
                term=int(cmd.get("term", 1)), commit=int(cmd.get("commit", 0)),
            )  # fmt: skip
            ok = node.raft.send(msg)
            _emit(ev="raft_sent", ok=ok, to=cmd["to"])
        elif name == "raft_forged":
            from node.setup.keyfile import peer_id_from_did

            msg = Message(type=MessageType.HEARTBEAT, to=cmd["to"], frm=cmd["frm"], term=7)
            try:
                with trio.fail_after(5):
                    stream = await node.host.new_stream(
                        ID.from_base58(str(peer_id_from_did(cmd["to"]))), [RAFT_PROTOCOL_ID]
                    )
                    await stream.write(frame(encode_message(msg)))
                _emit(ev="raft_forged_sent")
            except Exception as exc:
                _emit(ev="error", reason=f"raft_forged: {exc}")

    async def announce() -> None:
        await node.started.wait()
        _emit(ev="ready", peer_id=str(identity.peer_id), did=identity.did,
              addrs=node.listen_addrs, t=time.time())  # fmt: skip
        await commands()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce)
        await node.run()
        nursery.cancel_scope.cancel()
    _emit(ev="stopped")


def _rss_kb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a child node process."""
    parser = argparse.ArgumentParser(prog="python -m node.testing.harness")
    parser.add_argument("--seed", required=True)
    parser.add_argument("--genesis", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--ban-seconds", type=float, default=30.0)
    parser.add_argument("--no-slot-policy", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--profile", default=None, help="write cProfile stats here at exit")
    args = parser.parse_args(argv)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        try:
            profiler.runcall(trio.run, _child, args)
        finally:
            profiler.dump_stats(args.profile)
    else:
        trio.run(_child, args)


if __name__ == "__main__":
    main()
