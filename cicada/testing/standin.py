"""A bare ROUTER playing coordinator to one real `cicada cloud` (or edge) process, so that the
worker's own answer to a DISPATCH can be seen (the real coordinator answers TIMEOUT itself and
discards what the worker sends back late)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from cicada.common.protocol import Heartbeat, decode, encode


class StandInCoordinator:
    """Binds a random loopback port (`port`); the first peer to speak becomes `identity`."""

    def __init__(self, heartbeat: float = 0.2) -> None:
        self.heartbeat = heartbeat
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port: int = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.identity: bytes | None = None

    def recv(self, until: float) -> Any:
        """The next message from the worker (heartbeating it meanwhile), or None at `until`."""
        while time.monotonic() < until:
            if self.identity is not None:
                self.send(Heartbeat())
            if self.sock.poll(int(self.heartbeat * 1000)):
                frames = self.sock.recv_multipart()
                self.identity = frames[0]
                return decode(frames[1:])
        return None

    def expect(self, kind: type, until: float, where: Callable[[Any], bool] = bool) -> Any:
        while (m := self.recv(until)) is not None:
            if isinstance(m, kind) and where(m):
                return m
        raise AssertionError(f"no {kind.__name__} from the worker in time")

    def send(self, message: Any) -> None:
        assert self.identity is not None
        self.sock.send_multipart([self.identity, *encode(message)])

    def close(self) -> None:
        self.sock.close(linger=0)
