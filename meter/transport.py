"""Blocking Modbus links (pymodbus sync clients) for TCP and RTU, with typed errors.

A :class:`ModbusLink` wraps one pymodbus client. Its methods block and are meant to run in a
worker thread (the reader calls them through ``trio.to_thread.run_sync``); a lock makes one
link safe to share, which is how several meters on one RS-485 bus share a serial port.
pymodbus's own retries are off: the reader retries with back-off and counts each attempt.
Exception responses are *returned* by pymodbus, not raised; this module turns them, timeouts
and connection failures into :mod:`meter.events` errors. After a timeout the connection is
closed, so a late answer can never be taken for the answer to the next request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from meter.events import (
    MeterError,
    MeterExceptionResponse,
    MeterProtocolError,
    MeterTimeout,
    MeterUnreachable,
)
from meter.profile import Function

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


@dataclass(frozen=True)
class TcpEndpoint:
    """A Modbus TCP server (meter or gateway)."""

    host: str
    port: int = 502

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class SerialEndpoint:
    """A Modbus RTU bus on a serial device."""

    device: str
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    def __str__(self) -> str:
        return f"rtu://{self.device}@{self.baudrate}"


Endpoint = TcpEndpoint | SerialEndpoint


class ModbusLink:
    """One blocking Modbus client; every method may block and is thread-safe."""

    def __init__(self, endpoint: Endpoint, timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.client: ModbusTcpClient | ModbusSerialClient
        if isinstance(endpoint, TcpEndpoint):
            self.client = ModbusTcpClient(
                endpoint.host, port=endpoint.port, timeout=timeout_s, retries=0,
                reconnect_delay=0.0,
            )
        else:
            self.client = ModbusSerialClient(
                endpoint.device, baudrate=endpoint.baudrate, parity=endpoint.parity,
                stopbits=endpoint.stopbits, bytesize=endpoint.bytesize, timeout=timeout_s,
                retries=0, reconnect_delay=0.0,
            )
        # We count and report failures ourselves; pymodbus would log each one as an error.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    def read(self, meter: str, function: Function, address: int, count: int,
             device_id: int) -> list[int]:
        """Read ``count`` registers; raise a typed :class:`MeterError` on any failure."""
        call = (self.client.read_input_registers if function == "input"
                else self.client.read_holding_registers)
        response = self._call(meter, address, device_id, f"reading {count} {function} "
                              f"registers at {address}",
                              lambda: call(address, count=count, device_id=device_id),
                              count=count, function=function)
        registers = list(getattr(response, "registers", []))
        if len(registers) < count:
            raise MeterProtocolError(meter, f"asked {count} registers at {address}, got "
                                     f"{len(registers)}", address=address)
        return registers[:count]

    def write(self, meter: str, address: int, values: list[int], device_id: int) -> None:
        """Write holding registers from ``address`` (FC06 for one, FC16 for several); raise a
        typed :class:`MeterError` on any failure or exception response."""
        if not values or len(values) > 123 or any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError("write 1..123 register values in 0..0xFFFF")
        if len(values) == 1:
            def call() -> object:
                return self.client.write_register(address, values[0], device_id=device_id)
        else:
            def call() -> object:
                return self.client.write_registers(address, values, device_id=device_id)
        self._call(meter, address, device_id, f"writing {len(values)} registers at {address}",
                   call, count=len(values), function="write")

    def _call(self, meter: str, address: int, device_id: int, what: str,
              call: Callable[[], Any], **context: Any) -> Any:
        """One request under the lock, its failures turned into typed errors."""
        with self._lock:
            try:
                if not self.client.connected and not self.client.connect():
                    raise MeterUnreachable(meter, f"cannot connect to {self.endpoint}",
                                           endpoint=str(self.endpoint))
                response = call()
            except MeterError:
                raise
            except ConnectionException as exc:
                self.client.close()
                raise MeterUnreachable(meter, f"connection to {self.endpoint} lost: {exc}",
                                       endpoint=str(self.endpoint)) from None
            except ModbusIOException as exc:
                self.client.close()
                if "uses" in str(exc) and "received" in str(exc):  # tid / device id mismatch
                    raise MeterProtocolError(meter, f"mismatched response from {self.endpoint}: "
                                             f"{exc}", endpoint=str(self.endpoint),
                                             address=address) from None
                raise MeterTimeout(meter, f"no answer from {self.endpoint} device {device_id} "
                                   f"within {self.timeout_s} s", endpoint=str(self.endpoint),
                                   address=address, detail=str(exc)) from None
            except (ModbusException, OSError) as exc:
                self.client.close()
                raise MeterProtocolError(meter, f"{type(exc).__name__}: {exc}",
                                         endpoint=str(self.endpoint)) from None
            if response.isError():
                code = int(getattr(response, "exception_code", 0))
                raise MeterExceptionResponse(
                    meter, f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) {what}",
                    code=code, address=address, **context,
                )
            return response

    def close(self) -> None:
        """Close the connection (it is reopened on the next read)."""
        with self._lock:
            self.client.close()
