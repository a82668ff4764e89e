"""Misbehaving servers that no simulator fault covers: garbage bytes, a wrong transaction id,
a short register count, a connection closed mid-request, nothing listening. The reader
returns a typed error every time and never crashes."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import trio

from meter.events import MeterProtocolError, MeterTimeout, MeterUnreachable
from meter.reader import MeterConfig, MeterReader
from meter.transport import TcpEndpoint
from tests.meter.conftest import HOST

Responder = Callable[[bytes], bytes | None]


@pytest.fixture
def fake_server() -> Iterator[Callable[[Responder], int]]:
    """Start raw TCP servers that answer each request with ``responder(request)``."""
    sockets: list[socket.socket] = []

    def start(responder: Responder) -> int:
        srv = socket.create_server((HOST, 0))
        sockets.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    while True:
                        try:
                            request = conn.recv(260)
                        except OSError:
                            break
                        if not request:
                            break
                        answer = responder(request)
                        if answer is None:
                            break  # close the connection instead of answering
                        conn.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    for s in sockets:
        s.close()


def mbap(request: bytes, pdu: bytes, tid_delta: int = 0) -> bytes:
    """A Modbus TCP frame answering ``request`` with ``pdu``."""
    tid, _, _, unit = struct.unpack(">HHHB", request[:7])
    return struct.pack(">HHHB", (tid + tid_delta) & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


async def poll_once(port: int) -> MeterReader:
    reader = MeterReader([MeterConfig("m", "sdm630", TcpEndpoint(HOST, port), 1)],
                         timeout_s=0.3, retries=1, backoff_s=0.01)
    return reader


@pytest.mark.parametrize(("responder", "expected"), [
    # garbage: pymodbus finds no frame and waits: a timeout
    (lambda req: b"\xde\xad\xbe\xef" * 8, MeterTimeout),
    # an answer to another transaction: pymodbus drops it and waits: a timeout
    (lambda req: mbap(req, bytes([req[7], 4]) + b"\x00" * 4, tid_delta=1), MeterTimeout),
    # fewer registers than asked for
    (lambda req: mbap(req, bytes([req[7], 2, 0, 1])), MeterProtocolError),
    # the server hangs up instead of answering
    (lambda req: None, MeterUnreachable),
])
async def test_misbehaving_server_gives_typed_error(
    fake_server: Callable[[Responder], int], responder: Responder,
    expected: type,
) -> None:
    reader = await poll_once(fake_server(responder))
    try:
        with trio.fail_after(10):
            result = await reader.poll("m")
    finally:
        reader.close()
    assert result.sample is None and isinstance(result.error, expected), result.error
    assert reader.stats["m"].attempts == 2


async def test_nothing_listening() -> None:
    with socket.create_server((HOST, 0)) as s:
        port = s.getsockname()[1]
    reader = await poll_once(port)
    try:
        with trio.fail_after(10):
            result = await reader.poll("m")
    finally:
        reader.close()
    assert isinstance(result.error, MeterUnreachable)
    assert [e.kind for e in result.events] == ["rejected", "offline"]
