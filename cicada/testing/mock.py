"""In-memory transports for testing code that uses the client, with no sockets at all.

    def handler(request: Request) -> Reply:
        return Reply(request.id, Status.OK, outputs=[request.inputs[0] * 2])

    with Client(transport=MockTransport(handler)) as client:
        client.invoke("double", np.ones(3)).output          # array([2., 2., 2.])

Requests really are encoded by the client and decoded here with `cicada.common.protocol.decode`,
and replies encoded here and decoded by the client, so a test exercises the client's whole
wire path. A handler returns a `Reply`, raw frames (to send something malformed), or None
(to never answer). `push` delivers a message nobody asked for, e.g. a late reply.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence

from cicada.client import Frame
from cicada.common.protocol import Reply, Request, decode, encode

Answer = Reply | Sequence[bytes] | None
Handler = Callable[[Request], Answer]


def _wire(frames: Sequence[Frame]) -> list[bytes]:
    return [bytes(frame) for frame in frames]  # what a socket would deliver: plain copies


class _Mock:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []  # every request received, decoded, in order
        self.closed = False

    def _answer(self, frames: Sequence[Frame]) -> list[bytes] | None:
        request = decode(_wire(frames))
        if not isinstance(request, Request):
            raise TypeError(f"a client sent {type(request).__name__}, not a Request")
        self.requests.append(request)
        return self._frames(self.handler(request))

    @staticmethod
    def _frames(answer: Answer) -> list[bytes] | None:
        if answer is None:
            return None
        if isinstance(answer, Reply):
            return _wire(encode(answer))
        return _wire(answer)


class MockTransport(_Mock):
    """A `Transport` for `Client` that answers each request with `handler(request)`."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(handler)
        self._inbox: collections.deque[list[bytes]] = collections.deque()

    def push(self, answer: Reply | Sequence[bytes]) -> None:
        """Queue a message for the client as if the coordinator had sent it."""
        frames = self._frames(answer)
        if frames is not None:
            self._inbox.append(frames)

    def send(self, frames: Sequence[Frame]) -> None:
        answer = self._answer(frames)
        if answer is not None:
            self._inbox.append(answer)

    def recv(self, timeout: float) -> list[Frame] | None:
        # Single-threaded: what is not queued now never arrives, so there is nothing to wait for.
        return list(self._inbox.popleft()) if self._inbox else None

    def close(self) -> None:
        self.closed = True


class AsyncMockTransport(_Mock):
    """An `AsyncTransport` for `AsyncClient` that answers each request with `handler(request)`."""

    def __init__(self, handler: Handler) -> None:
        super().__init__(handler)
        self._inbox: asyncio.Queue[list[bytes]] = asyncio.Queue()

    def push(self, answer: Reply | Sequence[bytes]) -> None:
        """Queue a message for the client as if the coordinator had sent it."""
        frames = self._frames(answer)
        if frames is not None:
            self._inbox.put_nowait(frames)

    async def send(self, frames: Sequence[Frame]) -> None:
        answer = self._answer(frames)
        if answer is not None:
            self._inbox.put_nowait(answer)

    async def recv(self) -> list[Frame]:
        return list(await self._inbox.get())

    def close(self) -> None:
        self.closed = True
