"""The Cicada client SDK: call a model through the coordinator, get arrays back.

    with Client("tcp://127.0.0.1:5555") as client:
        result = client.invoke("gpt2", ids, priority=0, deadline=0.5)
        result.output, result.served_by, result.timings

    async with AsyncClient() as client:
        results = await asyncio.gather(*(client.invoke("gpt2", x) for x in batch))

    with client.stream("gpt2", prompt_ids, max_new_tokens=32) as stream:   # generation
        for piece in stream:                     # each token as it comes, and who made it
            print(piece.tokens, piece.role)      # (leaving early cancels the request)

    with client.stream("gpt2", prompt_ids, max_new_tokens=32, exact=True) as stream:
        for piece in stream:                     # the large model's own greedy decode, with
            render(stream.tokens)                # the edge's tokens shown (provisional) while
        stream.result.generation.exact           # the cloud is cold; a rewind replaces them

    client.invoke("minilm", text=["a sentence"])  # text, for models packaged with a tokenizer

A call sends one REQUEST and waits for the REPLY with its id (docs/PROTOCOL.md); a status
other than OK raises the matching `cicada.errors.ClientError`. Every call is bounded by the
client's own timeout (30 s unless told otherwise) and, when a `deadline` is given, by that
deadline plus a small grace, so a coordinator that dies mid-call ends the call with
`Timeout(side="client")`, never a hang. A reply that arrives after its call gave up is
recognised by its id and discarded.

Nobody there is said in seconds, not after the call's timeout: before it sends, a call waits
at most `connect_timeout` (2 s) for the ZeroMQ handshake with the coordinator and raises
`NoCoordinator` (nothing answers at the address) or `KeyRefused` (the CURVE handshake failed)
instead (cicada/liveness.py; docs/PROTOCOL.md section 7). A `TIMEOUT` for a request that ran
on a worker is `WorkerHung`, naming the worker. The address may be given as HOST:PORT
(taken as tcp://HOST:PORT).

Both clients share `BaseClient` (the address, timeouts, and building the request) and
`InvokeOptions` (a call's keywords, validated in one place).

Both clients talk through a `Transport` (`AsyncTransport`): a ZeroMQ DEALER by default, or an
in-memory `cicada.testing.MockTransport` in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, Unpack

import msgpack
import numpy as np
import zmq
import zmq.asyncio
import zmq.utils.z85

from cicada.common.defaults import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    MAX_NEW_TOKENS,
    NORMAL,
    PRIORITIES,
)
from cicada.common.endpoints import zmq_endpoint
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    Cancel,
    Limits,
    Partial,
    ProtocolError,
    Reply,
    Request,
    Status,
    decode,
    encode,
)
from cicada.common.sockets import HWM
from cicada.common.sockets import configure as configure_socket
from cicada.errors import (
    BadRequest,
    CallError,
    EndpointError,
    Timeout,
    TransportError,
    raise_for_reply,
)
from cicada.liveness import ConnectionWatch

log = logging.getLogger(__name__)

# How long a call waits for the coordinator's handshake before it says nobody answers (the
# call's own timeout, if shorter): seconds, not the call's whole timeout.
CONNECT_TIMEOUT_S = 2.0
# Waiting past a deadline by this much lets the coordinator's own TIMEOUT reply arrive (it
# says more than silence does) before the client gives up by itself.
DEADLINE_GRACE_S = 0.5

Frame = bytes | memoryview
Inputs = np.ndarray | Sequence[np.ndarray]


# -- configuration and results --------------------------------------------------------------


@dataclass(frozen=True)
class CurveConfig:
    """CURVE keys (Z85 text, 40 characters each, bytes or str), as `cicada keys` writes them:
    the coordinator's public key and this client's key pair (listed on the coordinator)."""

    server_public_key: bytes | str
    public_key: bytes | str
    secret_key: bytes | str = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("server_public_key", "public_key", "secret_key"):
            key = _z85(getattr(self, name))
            try:
                valid = len(key) == 40 and len(zmq.utils.z85.decode(key)) == 32
            except (ValueError, KeyError, IndexError, TypeError):
                valid = False
            if not valid:
                raise ValueError(f"CurveConfig.{name} is not a 40-character Z85 CURVE key")

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make `socket` a CURVE client of the coordinator (before it connects)."""
        if not zmq.has("curve"):
            raise TransportError("this libzmq was built without CURVE; encryption unavailable")
        socket.curve_serverkey = _z85(self.server_public_key)
        socket.curve_publickey = _z85(self.public_key)
        socket.curve_secretkey = _z85(self.secret_key)


def _z85(key: bytes | str) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else bytes(key)


@dataclass(frozen=True)
class InvokeResult:
    """A successful call: the outputs, who computed them, and where the time went."""

    outputs: list[np.ndarray]
    served_by: dict[str, Any]  # {"role": "edge"|"cloud", "worker": str, "variant": str}
    timings: dict[str, float]  # the coordinator's (queue_s, compute_s, ...) plus client_s
    request_id: str
    status: Status = Status.OK
    generation: GenerationInfo | None = None  # an exact generation's outcome

    @property
    def output(self) -> np.ndarray:
        """The first output (most models have exactly one)."""
        if not self.outputs:
            raise IndexError(f"request {self.request_id} returned no outputs")
        return self.outputs[0]

    @property
    def token_sources(self) -> list[str]:
        """For a generation: the role ("edge"/"cloud") that produced each token, in order."""
        return [
            str(segment.get("role", ""))
            for segment in self.served_by.get("segments", [])
            for _ in range(int(segment.get("tokens", 0)))
        ]


@dataclass(frozen=True)
class GenerationInfo:
    """How an exact generation (`exact=True`) ended: `exact` when every output token is the
    cloud model's own greedy decode (made or verified by a cloud worker); `kept` of them were
    made by an edge agent and verified; `rewound` tokens streamed were replaced."""

    exact: bool
    kept: int
    rewound: int

    @classmethod
    def parse(cls, body: Mapping[str, Any] | None) -> GenerationInfo | None:
        """From a REPLY's `generation` map; None if absent or not as documented."""
        if not isinstance(body, Mapping):
            return None
        exact, kept, rewound = body.get("exact"), body.get("kept"), body.get("rewound")
        if not isinstance(exact, bool) or not all(
            type(v) is int and v >= 0 for v in (kept, rewound)
        ):
            return None
        return cls(exact, int(kept), int(rewound))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Piece:
    """One streamed piece of a generation: new tokens, and the worker that produced them.

    In an exact generation (`exact=True`) a piece's tokens may be `provisional` (an edge
    agent's, shown while the cloud is cold), and a piece with `rewind` set carries no tokens:
    the first `rewind` tokens stand (now the cloud's), every later one is replaced by what
    follows. `position` is the index of the piece's first token in the generation."""

    outputs: list[np.ndarray]
    seq: int
    served_by: dict[str, Any]
    position: int | None = None
    provisional: bool = False
    rewind: int | None = None

    @property
    def tokens(self) -> np.ndarray:
        return self.outputs[0] if self.outputs else np.zeros(0, dtype=np.int64)

    @property
    def role(self) -> str:
        return str(self.served_by.get("role", ""))


# -- transports -------------------------------------------------------------------------------


class Transport(Protocol):
    """How the sync `Client` moves frames; one instance serves one client."""

    def send(self, frames: Sequence[Frame]) -> None:
        """Queue one multipart message; raise `TransportError` if it cannot be queued now."""

    def recv(self, timeout: float) -> list[Frame] | None:
        """The next message, or None if none arrives within `timeout` seconds."""

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """How `AsyncClient` moves frames: `recv` waits (cancellably) for the next message."""

    async def send(self, frames: Sequence[Frame]) -> None: ...

    async def recv(self) -> list[Frame]: ...

    def close(self) -> None: ...


def _configure(socket: zmq.Socket[Any], curve: CurveConfig | None, limits: Limits) -> None:
    # LINGER=0 (close never blocks on unsent requests), SNDHWM/RCVHWM, and MAXMSGSIZE (an
    # oversized reply drops the connection before it is buffered), as every role sets them.
    configure_socket(socket, limits)
    if curve is not None:
        curve.apply(socket)


def _connect(socket: zmq.Socket[Any], address: str) -> None:
    try:
        socket.connect(address)
    except zmq.ZMQError as exc:
        raise ValueError(
            f"cannot connect to {address!r}: {exc}; give an endpoint like tcp://HOST:PORT"
        ) from None


def _watched(
    socket: zmq.Socket[Any], address: str, curve: CurveConfig | None, limits: Limits
) -> ConnectionWatch:
    """Configure `socket`, watch its connection (from before it starts) and connect it."""
    watch: ConnectionWatch | None = None
    try:
        _configure(socket, curve, limits)
        watch = ConnectionWatch(socket, address, curve is not None)
        _connect(socket, address)
    except Exception:
        if watch is not None:
            watch.close()
        socket.close(linger=0)
        raise
    return watch


class ZmqTransport:
    """One DEALER socket connected to the coordinator (sync)."""

    def __init__(
        self, address: str, *, curve: CurveConfig | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.watch = _watched(self._socket, address, curve, limits)

    def wait_connected(self, timeout: float) -> None:
        """Raise `NoCoordinator` / `KeyRefused` unless a coordinator answers (liveness.py)."""
        self.watch.wait_connected(timeout)

    def send(self, frames: Sequence[Frame]) -> None:
        try:
            # Never block: the queue fills only when the coordinator has been gone a while.
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise TransportError(
                f"the send queue is full ({HWM} messages): the coordinator is not reading; "
                "check that it is running at this address"
            ) from None

    def recv(self, timeout: float) -> list[Frame] | None:
        if not self._socket.poll(max(1, round(timeout * 1000)), zmq.POLLIN):
            return None
        return [frame.buffer for frame in self._socket.recv_multipart(copy=False)]

    def close(self) -> None:
        self.watch.close()
        self._socket.close(linger=0)


class AsyncZmqTransport:
    """One DEALER socket connected to the coordinator (asyncio)."""

    def __init__(
        self, address: str, *, curve: CurveConfig | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self._socket: zmq.asyncio.Socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.watch = _watched(self._socket, address, curve, limits)

    async def wait_connected(self, timeout: float) -> None:
        """As `ZmqTransport.wait_connected`, awaitable."""
        await self.watch.wait_connected_async(timeout)

    async def send(self, frames: Sequence[Frame]) -> None:
        await self._socket.send_multipart(frames, copy=False)

    async def recv(self) -> list[Frame]:
        return [frame.buffer for frame in await self._socket.recv_multipart(copy=False)]

    def close(self) -> None:
        self.watch.close()
        self._socket.close(linger=0)


# -- shared call logic --------------------------------------------------------------------------


class CallKeywords(TypedDict, total=False):
    """The keywords of every call (`invoke` and `stream`, sync and async), defined once; they
    make an `InvokeOptions`, whose fields say what each means."""

    text: str | Sequence[str] | None
    max_new_tokens: int | None
    priority: int
    deadline: float | None
    timeout: float | None
    options: Mapping[str, Any] | None
    exact: bool


@dataclass(frozen=True)
class InvokeOptions:
    """How one call is made: everything but the model and its inputs, checked on creation.

    `Client` and `AsyncClient` build one from their keywords (see `Client.invoke`); it is
    the one place a call's arguments are validated and turned into a request.
    """

    text: str | Sequence[str] | None = None
    max_new_tokens: int | None = None
    priority: int = NORMAL
    deadline: float | None = None
    timeout: float | None = None  # None: the client's own timeout
    options: Mapping[str, Any] | None = None  # passed to the worker untouched
    exact: bool = False  # the cloud model's own greedy decode (needs max_new_tokens)

    def __post_init__(self) -> None:
        if self.text is not None:
            texts = [self.text] if isinstance(self.text, str) else list(self.text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
        n = self.max_new_tokens
        if n is not None and (
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS
        ):
            raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True or False, got {self.exact!r}")
        if self.exact and n is None:
            raise ValueError("exact is a generation option: give max_new_tokens too")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.deadline is not None and not 0 < self.deadline < math.inf:
            raise ValueError(
                f"deadline must be a positive number of seconds, got {self.deadline!r}"
            )

    def request_options(self) -> dict[str, Any]:
        """The REQUEST's `options` map (docs/PROTOCOL.md section 4)."""
        out = dict(self.options or {})
        if self.text is not None:
            out["text"] = [self.text] if isinstance(self.text, str) else list(self.text)
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        if self.exact:
            out["exact"] = True
        return out


@dataclass
class _Call:
    """One invoke's request, encoded, and how long its caller waits for the reply."""

    request_id: str
    frames: list[Frame]
    wait_s: float


class BaseClient:
    """What `Client` and `AsyncClient` share: the address, the default timeout, the limits,
    and turning a call into an encoded request (`_prepare`)."""

    def __init__(self, address: str, timeout: float, connect_timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not connect_timeout > 0:
            raise ValueError(
                f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}"
            )
        try:
            self.address = zmq_endpoint(address)  # HOST:PORT means tcp://HOST:PORT
        except EndpointError as exc:
            raise ValueError(f"{exc}; give the coordinator's endpoint") from None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._limits = DEFAULT_LIMITS
        self._closed = False

    def _prepare(self, model: str, inputs: Inputs | None, call: InvokeOptions) -> _Call:
        """The encoded REQUEST for one call, and how long to wait for its REPLY."""
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")
        options = call.request_options()
        if inputs is None and "text" not in options:
            raise ValueError("give inputs (arrays) or text")
        wait_s = self.timeout if call.timeout is None else call.timeout
        # Without a deadline the client's own timeout is the budget: the coordinator should
        # never keep working (or wait for a cold start) for a caller that has already given up.
        timeout_ms = round(wait_s * 1000)
        if call.deadline is not None:
            timeout_ms = min(timeout_ms, round(call.deadline * 1000))
            wait_s = min(wait_s, call.deadline + DEADLINE_GRACE_S)
        if inputs is None:
            arrays: list[np.ndarray] = []
        elif isinstance(inputs, np.ndarray):
            arrays = [inputs]
        else:
            arrays = [np.asarray(a) for a in inputs]
        request_id = uuid.uuid4().hex
        request = Request(
            request_id, model, arrays, priority=call.priority, timeout_ms=timeout_ms,
            options=options,
        )  # fmt: skip
        try:
            frames = encode(request)
        except ProtocolError as exc:
            raise BadRequest(
                f"request {request_id} not sent: {exc}",
                request_id=request_id,
                status=Status.BAD_REQUEST,
            ) from exc
        size = sum(len(f) for f in frames)
        limits = self._limits
        if len(frames) > limits.max_frames or size > limits.max_message_bytes:
            raise BadRequest(
                f"request {request_id} not sent: {len(arrays)} inputs of {size} bytes in all "
                f"exceed the protocol limits ({limits.max_frames - 3} tensors, "
                f"{limits.max_message_bytes} bytes); send smaller batches",
                request_id=request_id,
                status=Status.BAD_REQUEST,
            )
        return _Call(request_id, frames, wait_s)

    def _connect_wait(self, call: _Call) -> float:
        return min(self.connect_timeout, call.wait_s)

    def _client_timeout(self, call: _Call, watch: ConnectionWatch | None = None) -> CallError:
        if watch is not None:  # the coordinator went away during the call?
            watch.drain()
            if not watch.connected:
                gone = watch.give_up()
                gone.request_id = call.request_id
                return gone
        return Timeout(
            f"no reply to request {call.request_id} within {call.wait_s:g} s (client-side "
            f"timeout): is the coordinator at {self.address} running? If it is busy, allow a "
            "longer timeout",
            side="client",
            request_id=call.request_id,
        )


def _cancel(call: _Call) -> list[Frame]:
    """The CANCEL that withdraws a call its caller left early (docs/PROTOCOL.md section 4)."""
    return list(encode(Cancel(id=call.request_id, reason="the client stopped reading")))


def _peek_id(frames: Sequence[Frame], limits: Limits) -> str | None:
    """The id in a message that failed to decode, if its body can still be read."""
    if len(frames) < 3 or len(frames[2]) > limits.max_body_bytes:
        return None
    try:
        body = msgpack.unpackb(
            bytes(frames[2]), raw=False, max_str_len=limits.max_str_len,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )  # fmt: skip
    except Exception:  # msgpack raises several unrelated types on bad input
        return None
    request_id = body.get("id") if isinstance(body, dict) else None
    return request_id if isinstance(request_id, str) else None


def _read_reply(frames: Sequence[Frame], limits: Limits) -> Reply | Partial | None:
    """Decode one incoming message: a Reply or Partial, or None for what a client ignores."""
    message = decode(frames, limits)  # ProtocolError: the caller decides whose call failed
    if not isinstance(message, Reply | Partial):
        log.debug("ignoring %s from the coordinator", type(message).__name__)
        return None
    return message


def _piece(partial: Partial) -> Piece:
    return Piece(
        outputs=partial.outputs,
        seq=partial.seq,
        served_by=dict(partial.served_by),
        position=partial.position,
        provisional=partial.provisional is True,
        rewind=partial.rewind,
    )


def _result(reply: Reply, client_s: float) -> InvokeResult:
    raise_for_reply(reply)
    return InvokeResult(
        outputs=reply.outputs,
        served_by=dict(reply.served_by),
        timings={**reply.timings, "client_s": client_s},
        request_id=reply.id,
        status=reply.status,
        generation=GenerationInfo.parse(reply.generation),
    )


class TokenSequence:
    """A generation's tokens as they stand after each piece: what a terminal or a web page
    renders again after every piece (a rewind takes tokens back). `stable`: how many of them
    are final (not provisional)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.stable = 0

    def apply(self, piece: Piece) -> None:
        if piece.rewind is not None:
            del self.tokens[piece.rewind :]
            self.stable = len(self.tokens)
            return
        at = len(self.tokens) if piece.position is None else piece.position
        del self.tokens[at:]  # (a piece at an earlier position replaces what followed)
        self.tokens.extend(int(t) for t in piece.tokens.reshape(-1))
        if not piece.provisional:
            self.stable = len(self.tokens)


def _malformed(request_id: str, exc: ProtocolError) -> TransportError:
    return TransportError(
        f"malformed reply to request {request_id}: {exc}; is the peer a CCD/1 coordinator?",
        request_id=request_id,
    )


# -- the clients ------------------------------------------------------------------------------


class _SequenceView:
    """What both token streams show of the generation so far."""

    _sequence: TokenSequence

    @property
    def tokens(self) -> list[int]:
        """The generation so far, after every piece read (rewinds applied); a copy."""
        return list(self._sequence.tokens)

    @property
    def stable(self) -> int:
        """How many of `tokens` are final: the rest are provisional (exact=True)."""
        return self._sequence.stable


class TokenStream(_SequenceView):
    """Iterates over a call's streamed `Piece`s; `.result` holds the final `InvokeResult`.

    Use it as a context manager (`with client.stream(...) as stream:`) or call `close()`:
    leaving before the final reply withdraws the request (CANCEL: the worker stops) and frees
    the client for its next call.
    """

    def __init__(self, messages: Generator[Piece | InvokeResult]) -> None:
        self._messages = messages
        self._sequence = TokenSequence()
        self.result: InvokeResult | None = None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Piece:
        for message in self._messages:
            if isinstance(message, InvokeResult):
                self.result = message
                self.close()  # run the call's clean-up now
                break
            self._sequence.apply(message)
            return message
        raise StopIteration

    def close(self) -> None:
        """Stop the call: a request still running is cancelled. Idempotent."""
        self._messages.close()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTokenStream(_SequenceView):
    """Async iteration over a call's streamed `Piece`s; `.result` holds the final result.

    `async with client.stream(...) as stream:` or `await stream.aclose()`: leaving before the
    final reply withdraws the request (CANCEL) and stops waiting for it.
    """

    def __init__(self, messages: AsyncGenerator[Piece | InvokeResult]) -> None:
        self._messages = messages
        self._sequence = TokenSequence()
        self.result: InvokeResult | None = None

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> Piece:
        async for message in self._messages:
            if isinstance(message, InvokeResult):
                self.result = message
                await self.aclose()  # run the call's clean-up now
                break
            self._sequence.apply(message)
            return message
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the call: a request still running is cancelled. Idempotent."""
        await self._messages.aclose()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Client(BaseClient):
    """A synchronous client on one DEALER socket.

    Use it from one thread at a time (ZeroMQ sockets are not thread-safe; a concurrent
    `invoke` raises RuntimeError): give each thread its own Client, or use `AsyncClient` for
    many calls in flight at once.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        curve: CurveConfig | None = None,
        transport: Transport | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(address, timeout, connect_timeout)
        self._zmq: ZmqTransport | None = None
        if transport is None:
            transport = self._zmq = ZmqTransport(self.address, curve=curve)
        self._transport: Transport = transport
        self._busy = threading.Lock()

    def invoke(
        self,
        model: str,
        inputs: Inputs | None = None,
        **call: Unpack[CallKeywords],
    ) -> InvokeResult:
        """Run `model` on `inputs` (an array or a list of arrays) and return its outputs.

        `text`: a string or list of strings instead of arrays, for a model packaged with a
        tokenizer. `max_new_tokens`: generate that many tokens greedily from the prompt ids in
        `inputs` (the result's output is the new tokens; `token_sources` says who made each;
        `stream` yields them as they come). `priority`: 0 latency-critical, 1 normal, 2
        quality-seeking. `exact`: with `max_new_tokens`, the result's tokens are exactly the
        cloud model's own greedy decode (`result.generation` says whether they are: not when
        the edge finished first); the edge's tokens stream meanwhile, provisional, and a
        rewind piece replaces those the cloud disagrees with. `deadline`: seconds the result
        is still useful (sent as the request's budget; the coordinator answers TIMEOUT
        rather than run it late). `timeout`: how long this call waits at most (default: the
        client's). `options`: passed to the worker untouched. The keywords make an
        `InvokeOptions`. Raises a `ClientError` for any status but OK, `TransportError` if
        the connection lets the call down.
        """
        return _last(self._stream(model, inputs, InvokeOptions(**call)))

    def stream(
        self,
        model: str,
        inputs: Inputs | None = None,
        **call: Unpack[CallKeywords],
    ) -> TokenStream:
        """As `invoke`, but iterate over the `Piece`s streamed before the final reply (one per
        generated token); the final `InvokeResult` is then in `.result`. The request is sent
        when iteration starts; errors are raised from the iteration. Close the stream (or use
        it in a `with` block) to leave early: the request is cancelled."""
        return self._stream(model, inputs, InvokeOptions(**call))

    def _stream(self, model: str, inputs: Inputs | None, options: InvokeOptions) -> TokenStream:
        return TokenStream(self._locked_round_trip(self._prepare(model, inputs, options)))

    def _locked_round_trip(self, call: _Call) -> Generator[Piece | InvokeResult]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "Client.invoke called from two threads at once: a Client is for one thread; "
                "use one per thread, or AsyncClient"
            )
        try:
            yield from self._round_trip(call)
        finally:
            self._busy.release()

    def _round_trip(self, call: _Call) -> Generator[Piece | InvokeResult]:
        start = time.perf_counter()
        give_up = time.monotonic() + call.wait_s
        watch = None if self._zmq is None else self._zmq.watch
        try:
            if self._zmq is not None:  # nobody there, or the key refused: say so now
                self._zmq.wait_connected(self._connect_wait(call))
            self._transport.send(call.frames)
        except TransportError as exc:
            exc.request_id = exc.request_id or call.request_id
            raise
        answered = False
        try:
            while (remaining := give_up - time.monotonic()) > 0:
                frames = self._transport.recv(remaining)
                if frames is None:
                    break
                try:
                    reply = _read_reply(frames, self._limits)
                except ProtocolError as exc:
                    other = _peek_id(frames, self._limits)
                    if other is not None and other != call.request_id:
                        log.warning("discarding a malformed message for request %s: %s", other, exc)
                        continue
                    answered = True  # the call ends here: nothing left to cancel
                    raise _malformed(call.request_id, exc) from exc
                if reply is None:
                    continue
                if reply.id != call.request_id:  # e.g. the late reply to a call that timed out
                    log.debug("discarding a reply for request %s (not waiting for it)", reply.id)
                    continue
                if isinstance(reply, Partial):
                    yield _piece(reply)
                    continue
                answered = True
                yield _result(reply, time.perf_counter() - start)
                return
            answered = True  # the deadline sent with the request ends it at the coordinator
            raise self._client_timeout(call, watch)
        finally:
            if not answered:  # left early (close, break, an exception in the caller's loop)
                self._send_cancel(call)

    def _send_cancel(self, call: _Call) -> None:
        try:
            self._transport.send(_cancel(call))
        except Exception as exc:  # best effort: an uncancelled request costs only worker time
            log.debug("could not cancel request %s: %s", call.request_id, exc)

    def close(self) -> None:
        """Close the socket (unsent requests are dropped). Idempotent."""
        if not self._closed:
            self._closed = True
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _last(stream: TokenStream) -> InvokeResult:
    """Run a call to its end: its final result (the pieces streamed before it are dropped)."""
    with stream:
        for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


class AsyncClient(BaseClient):
    """An asyncio client on one DEALER socket; any number of `invoke`s may be in flight.

    One reader task routes each reply to the call waiting for its id. Use the client from
    the event loop it was first used in.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        curve: CurveConfig | None = None,
        transport: AsyncTransport | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(address, timeout, connect_timeout)
        self._zmq: AsyncZmqTransport | None = None
        if transport is None:
            transport = self._zmq = AsyncZmqTransport(self.address, curve=curve)
        self._transport: AsyncTransport = transport
        # Each call's incoming messages (PARTIALs, then its REPLY)
        # (or the exception that ends it), by request id.
        self._pending: dict[str, asyncio.Queue[Reply | Partial | BaseException]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._broken: TransportError | None = None  # set when the reader stopped for good

    async def invoke(
        self,
        model: str,
        inputs: Inputs | None = None,
        **call: Unpack[CallKeywords],
    ) -> InvokeResult:
        """As `Client.invoke`, awaitable; concurrent calls share the socket."""
        stream = self._stream(model, inputs, InvokeOptions(**call))
        async with stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        model: str,
        inputs: Inputs | None = None,
        **call: Unpack[CallKeywords],
    ) -> AsyncTokenStream:
        """As `Client.stream`: `async with client.stream(...) as s: async for piece in s`."""
        return self._stream(model, inputs, InvokeOptions(**call))

    def _stream(
        self, model: str, inputs: Inputs | None, options: InvokeOptions
    ) -> AsyncTokenStream:
        return AsyncTokenStream(self._round_trip(self._prepare(model, inputs, options)))

    async def _round_trip(self, call: _Call) -> AsyncGenerator[Piece | InvokeResult]:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._broken is not None:
            raise self._broken
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        inbox: asyncio.Queue[Reply | Partial | BaseException] = asyncio.Queue()
        self._pending[call.request_id] = inbox
        start = time.perf_counter()
        give_up = time.monotonic() + call.wait_s
        sent = answered = False
        watch = None if self._zmq is None else self._zmq.watch
        try:
            if self._zmq is not None:  # nobody there, or the key refused: say so now
                try:
                    await self._zmq.wait_connected(self._connect_wait(call))
                except TransportError as exc:
                    exc.request_id = call.request_id
                    raise
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps each await in a
            # task of its own (benchmarks/gateway.py: overhead p50 1.32 -> 1.16 ms here).
            async with asyncio.timeout(call.wait_s):
                await self._transport.send(call.frames)
            sent = True
            while True:
                try:
                    if inbox.empty():
                        async with asyncio.timeout(give_up - time.monotonic()):
                            message = await inbox.get()
                    else:
                        message = inbox.get_nowait()
                except TimeoutError:
                    answered = True  # the deadline sent with the request ends it there
                    raise self._client_timeout(call, watch) from None
                if isinstance(message, BaseException):
                    answered = True
                    raise message
                if isinstance(message, Partial):
                    yield _piece(message)
                    continue
                answered = True
                yield _result(message, time.perf_counter() - start)
                return
        except TimeoutError:  # the send itself waited past the timeout
            raise self._client_timeout(call) from None
        finally:
            self._pending.pop(call.request_id, None)
            if sent and not answered and not self._closed:  # left early: withdraw it
                await self._send_cancel(call)

    async def _send_cancel(self, call: _Call) -> None:
        try:
            await asyncio.wait_for(self._transport.send(_cancel(call)), DEADLINE_GRACE_S)
        except Exception as exc:  # best effort: an uncancelled request costs only worker time
            log.debug("could not cancel request %s: %s", call.request_id, exc)

    async def _read_replies(self) -> None:
        while True:
            try:
                frames = await self._transport.recv()
            except Exception as exc:  # the socket is gone: every waiting call fails now
                self._stop_reading(exc)
                return
            try:
                reply = _read_reply(frames, self._limits)
            except ProtocolError as exc:
                self._route_malformed(frames, exc)
                continue
            if reply is None:
                continue
            inbox = self._pending.get(reply.id)
            if inbox is None:  # e.g. the late reply to a call that timed out
                log.debug("discarding a reply for request %s (not waiting for it)", reply.id)
            else:
                inbox.put_nowait(reply)

    def _stop_reading(self, exc: Exception) -> None:
        broken = TransportError(f"the connection to {self.address} failed: {exc}")
        self._broken = broken
        self._fail_pending(lambda request_id: broken)

    def _route_malformed(self, frames: Sequence[Frame], exc: ProtocolError) -> None:
        """Fail the call a malformed reply was for; if it names none, every waiting call
        (the peer is broken or speaks another version: failing fast beats timing out)."""
        request_id = _peek_id(frames, self._limits)
        if request_id is None:
            log.warning("malformed message with no readable id: %s", exc)
            self._fail_pending(lambda rid: _malformed(rid, exc))
        elif (inbox := self._pending.pop(request_id, None)) is not None:
            inbox.put_nowait(_malformed(request_id, exc))
        else:
            log.warning("discarding a malformed message for request %s: %s", request_id, exc)

    def _fail_pending(self, error_for: Callable[[str], BaseException]) -> None:
        pending, self._pending = self._pending, {}
        for request_id, inbox in pending.items():
            inbox.put_nowait(error_for(request_id))

    async def aclose(self) -> None:
        """Stop the reader, fail calls still waiting, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_pending(
            lambda request_id: TransportError(
                f"the client was closed while request {request_id} waited",
                request_id=request_id,
            )
        )
        self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
