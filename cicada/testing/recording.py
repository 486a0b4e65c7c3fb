"""The SDK's ZeroMQ transports, noting the id of every REPLY that reaches the socket (also the
late ones the client discards), so that a request answered twice cannot go unseen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cicada.client import AsyncZmqTransport, ZmqTransport
from cicada.common.protocol import ProtocolError, Reply, decode


def reply_id(frames: Sequence[Any]) -> str | None:
    """The id of the REPLY in `frames`; None for anything else or anything unreadable."""
    try:
        message = decode(frames)
    except ProtocolError:
        return None
    return message.id if isinstance(message, Reply) else None


class RecordingTransport:
    """A `ZmqTransport` for `Client` that appends every REPLY's id to `reply_ids`."""

    def __init__(self, address: str) -> None:
        self.inner = ZmqTransport(address)
        self.reply_ids: list[str] = []

    def send(self, frames: Sequence[Any]) -> None:
        self.inner.send(frames)

    def recv(self, timeout: float) -> list[Any] | None:
        frames = self.inner.recv(timeout)
        if frames is not None and (rid := reply_id(frames)) is not None:
            self.reply_ids.append(rid)
        return frames

    def close(self) -> None:
        self.inner.close()


class RecordingAsyncTransport:
    """An `AsyncZmqTransport` for `AsyncClient` that appends every REPLY's id to `reply_ids`."""

    def __init__(self, address: str) -> None:
        self.inner = AsyncZmqTransport(address)
        self.reply_ids: list[str] = []

    async def send(self, frames: Sequence[Any]) -> None:
        await self.inner.send(frames)

    async def recv(self) -> list[Any]:
        frames = await self.inner.recv()
        if (rid := reply_id(frames)) is not None:
            self.reply_ids.append(rid)
        return frames

    def close(self) -> None:
        self.inner.close()
