"""Is a coordinator there? The client's connection, followed through libzmq's monitor events.

A DEALER connects in the background and queues what it is given, so without help a call to
an endpoint where nothing listens waits its whole timeout and then blames a timeout. The
ZMTP handshake already says more, and costs nothing extra on the wire (docs/PROTOCOL.md
section 7, "Clients and liveness"):

    handshake succeeded          a ZeroMQ peer with our security mechanism answers: go on
    handshake failed (auth)      the coordinator's ZAP handler refused our CURVE key
    handshake failed (other)     with CURVE: the server key is not the coordinator's; without:
                                 the peer wants CURVE, or is not a ZeroMQ peer at all
    connect refused / retried    nothing listens at the endpoint

`ConnectionWatch.wait_connected` returns at once once the handshake has succeeded (the usual
case: one non-blocking read of pending events per call) and otherwise waits at most its
timeout for it, raising `NoCoordinator` or `KeyRefused` with the next step in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import zmq

from cicada.errors import KeyRefused, NoCoordinator

_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_DELAYED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class ConnectionWatch:
    """The connection state of one socket (connected to one endpoint), from its monitor."""

    def __init__(self, socket: zmq.Socket[Any], address: str, curve: bool) -> None:
        self.address = address
        self.curve = curve
        self.connected = False  # the handshake succeeded and no disconnect came since
        self.tcp_seen = False  # a TCP connection was made at least once
        self.refused = False  # a connection attempt failed (nothing listens)
        self.failure: int | None = None  # the last handshake failure's event
        monitor_address = f"inproc://cicada-monitor-{uuid.uuid4().hex}"
        socket.monitor(monitor_address, _EVENTS)
        # A plain socket on the same libzmq context: read without an event loop (inproc
        # needs the same context, which an asyncio socket's shadow shares).
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(socket.context.underlying)
        self._pair: zmq.Socket[bytes] = context.socket(zmq.PAIR)
        self._pair.setsockopt(zmq.LINGER, 0)
        self._pair.connect(monitor_address)
        self._socket = socket

    def drain(self) -> None:
        """Take in every event waiting, without blocking."""
        try:
            # Asking for EVENTS costs less than a receive that raises Again, once per call.
            while int(self._pair.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frames = self._pair.recv_multipart(zmq.NOBLOCK)
                self._on(int.from_bytes(frames[0][:2], "little"), frames[0][2:6])
        except zmq.ZMQError:  # closed
            return

    def _on(self, event: int, value: bytes) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.failure, self.refused = True, None, False
        elif event == zmq.EVENT_CONNECTED:
            self.tcp_seen = True
        elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            self.connected = False
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.refused = not self.connected
        elif event in (*_FAILED, zmq.EVENT_HANDSHAKE_FAILED_AUTH):
            self.connected = False
            self.failure = event

    def problem(self) -> NoCoordinator | KeyRefused | None:
        """The error that says why no coordinator can be talked to now, or None: connected,
        or nothing known yet (still connecting)."""
        if self.connected:
            return None
        if self.failure == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return KeyRefused(
                f"the coordinator at {self.address} refused this client's CURVE key "
                "(handshake failed: not on its allow-list); add the client's public key "
                "(NAME.key from `cicada keys`) to the coordinator's --allow directory"
            )
        if self.failure is not None and self.curve:
            return KeyRefused(
                f"the CURVE handshake with {self.address} failed: the server key given "
                "(--server-key) is not that coordinator's public key, or it does not use "
                "CURVE; check both"
            )
        if self.failure is not None:
            return KeyRefused(
                f"the ZeroMQ handshake with {self.address} failed: the coordinator there "
                "wants CURVE keys (give --curve-key and --server-key, or CurveConfig), or "
                "what listens is not a coordinator"
            )
        return None

    def give_up(self) -> NoCoordinator | KeyRefused:
        """The error once the wait is over and no handshake succeeded."""
        found = self.problem()
        if found is not None:
            return found
        if self.tcp_seen and self.curve:  # a CURVE server drops a HELLO it cannot decrypt
            return KeyRefused(
                f"the CURVE handshake with {self.address} never completed: the server key "
                "given (--server-key) is probably not that coordinator's public key"
            )
        if self.refused and not self.tcp_seen:
            why = "connection refused: nothing listens there"
        elif self.tcp_seen:
            why = "a peer accepted the connection but never completed the ZeroMQ handshake"
        else:
            why = "no connection could be made"
        return NoCoordinator(
            f"no coordinator answers at {self.address} ({why}); start one (`cicada "
            "coordinator`) or give the right endpoint (--coordinator / Client(address))"
        )

    def _verdict(self, give_up: float) -> bool:
        """True once connected; raises once it is known that no coordinator answers."""
        self.drain()
        if self.connected:
            return True
        found = self.problem()
        if found is not None:
            raise found
        if time.monotonic() >= give_up:
            raise self.give_up()
        return False

    def wait_connected(self, timeout: float) -> None:
        """Return once the handshake has succeeded; raise at once for a refused key, and
        after `timeout` seconds for an endpoint where no coordinator answers."""
        give_up = time.monotonic() + timeout
        while not self._verdict(give_up):
            self._pair.poll(max(1, round((give_up - time.monotonic()) * 1000)))

    async def wait_connected_async(self, timeout: float) -> None:
        """As `wait_connected`, without blocking the event loop."""
        give_up = time.monotonic() + timeout
        while not self._verdict(give_up):
            await asyncio.sleep(0.01)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):  # already closed
            self._socket.disable_monitor()
        self._pair.close(linger=0)
