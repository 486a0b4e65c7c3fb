"""The client SDK: status mapping and id matching on an in-memory transport, then real
sockets (a stand-in coordinator ROUTER in a thread), CURVE, and `cicada invoke`."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from click.testing import CliRunner

from cicada.cli import main as cli
from cicada.client import AsyncClient, Client, CurveConfig, InvokeResult, ZmqTransport
from cicada.common.errors import CicadaError
from cicada.common.protocol import (
    DEFAULT_LIMITS,
    Cancel,
    Partial,
    Reply,
    Request,
    Status,
    decode,
    encode,
)
from cicada.errors import (
    BadRequest,
    ClientError,
    Failed,
    KeyRefused,
    Rejected,
    Timeout,
    TransportError,
    Unavailable,
    WorkerHung,
    raise_for_reply,
)
from cicada.testing import AsyncMockTransport, MockTransport

ROOT = Path(__file__).resolve().parents[2]
SERVED_BY = {"role": "edge", "worker": "echo-1", "variant": "identity"}


def echo(request: Request) -> Reply:
    return Reply(
        request.id, Status.OK, outputs=request.inputs, served_by=SERVED_BY,
        timings={"queue_s": 0.001, "compute_s": 0.002, "total_s": 0.004},
    )  # fmt: skip


# -- in-memory transport ----------------------------------------------------------------------


def test_ok_returns_outputs_served_by_and_timings() -> None:
    def double(request: Request) -> Reply:
        x, y = request.inputs
        return Reply(
            request.id, Status.OK, outputs=[x * 2, y + 1], served_by=SERVED_BY,
            timings={"queue_s": 0.25, "compute_s": 0.5},
        )  # fmt: skip

    transport = MockTransport(double)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.array([1, 2, 3], dtype=np.int64)
    with Client(transport=transport) as client:
        result = client.invoke("double", [x, y])
    assert isinstance(result, InvokeResult)
    np.testing.assert_array_equal(result.output, x * 2)
    np.testing.assert_array_equal(result.outputs[1], y + 1)
    assert result.outputs[0].dtype == np.float32 and result.outputs[1].dtype == np.int64
    assert result.status is Status.OK
    assert result.served_by == SERVED_BY
    assert result.timings["queue_s"] == 0.25 and result.timings["compute_s"] == 0.5
    assert result.timings["client_s"] >= 0
    assert result.request_id == transport.requests[0].id
    assert transport.closed


def test_a_single_array_is_one_input() -> None:
    transport = MockTransport(echo)
    with Client(transport=transport) as client:
        result = client.invoke("m", np.ones((2, 2), dtype=np.float16))
    assert len(transport.requests[0].inputs) == 1
    np.testing.assert_array_equal(result.output, np.ones((2, 2), dtype=np.float16))


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (Status.TIMEOUT, WorkerHung),  # a reply that says where it ran: the worker hung
        (Status.REJECTED, Rejected),
        (Status.UNAVAILABLE, Unavailable),
        (Status.BAD_REQUEST, BadRequest),
        (Status.FAILED, Failed),
    ],
)
def test_each_status_raises_its_error(status: Status, error_type: type[ClientError]) -> None:
    def refuse(request: Request) -> Reply:
        return Reply(
            request.id, status, error="the reason", retry_after_ms=1500, served_by=SERVED_BY
        )

    transport = MockTransport(refuse)
    with Client(transport=transport) as client, pytest.raises(error_type) as caught:
        client.invoke("m", np.zeros(3))
    error = caught.value
    assert type(error) is error_type and isinstance(error, CicadaError)
    assert error.request_id == transport.requests[0].id
    assert error.status is status
    assert error.served_by == SERVED_BY
    assert "the reason" in str(error) and error.request_id in str(error)
    if isinstance(error, (Unavailable, Rejected)):
        assert error.retry_after == 1.5
    if isinstance(error, Timeout):
        assert error.side == "coordinator"


def test_a_timeout_that_names_no_worker_is_a_plain_timeout() -> None:
    def queued_too_long(request: Request) -> Reply:
        return Reply(request.id, Status.TIMEOUT, error="deadline passed while queued")

    with Client(transport=MockTransport(queued_too_long)) as client, pytest.raises(Timeout) as got:
        client.invoke("m", np.zeros(3))
    assert type(got.value) is Timeout and got.value.side == "coordinator"
    assert "retry with a larger deadline" in str(got.value)


def test_unavailable_without_retry_after() -> None:
    reply = Reply("abc", Status.UNAVAILABLE)
    with pytest.raises(Unavailable) as caught:
        raise_for_reply(reply)
    assert caught.value.retry_after is None and caught.value.served_by is None
    raise_for_reply(Reply("abc", Status.OK))  # OK: nothing raised


def test_a_reply_for_another_id_is_discarded_and_the_call_times_out() -> None:
    def wrong_id(request: Request) -> Reply:
        return Reply("not-" + request.id, Status.OK, outputs=request.inputs)

    with Client(transport=MockTransport(wrong_id)) as client, pytest.raises(Timeout) as caught:
        client.invoke("m", np.zeros(3))
    assert caught.value.side == "client"
    assert caught.value.status is Status.TIMEOUT


def test_a_late_reply_never_answers_the_next_call() -> None:
    transport = MockTransport(echo)
    # The reply to an earlier call that gave up, still in the socket's queue.
    transport.push(Reply("earlier-call", Status.OK, outputs=[np.full(3, -1.0)]))
    with Client(transport=transport) as client:
        result = client.invoke("m", np.arange(3.0))
    np.testing.assert_array_equal(result.output, np.arange(3.0))


def _bad_tensor(request_id: str) -> list[bytes]:
    good = [bytes(f) for f in encode(Reply(request_id, Status.OK, outputs=[np.zeros(4)]))]
    return [*good[:3], good[3][:-1]]  # one byte short of what dtype/shape say


@pytest.mark.parametrize(
    "malformed",
    [
        lambda rid: [b"CCD1", b"\x02", b"\xc1"],  # not msgpack
        lambda rid: [b"CCD9", *[bytes(f) for f in encode(Reply(rid, Status.OK))][1:]],
        lambda rid: [b"CCD1", b"\x02"],  # too few frames
        _bad_tensor,
    ],
    ids=["body", "signature", "frames", "tensor"],
)
def test_malformed_reply_raises_transport_error(malformed: Any) -> None:
    transport = MockTransport(lambda request: malformed(request.id))
    with Client(transport=transport) as client, pytest.raises(TransportError) as caught:
        client.invoke("m", np.zeros(3))
    assert caught.value.request_id == transport.requests[0].id
    assert caught.value.__cause__ is not None


def test_a_malformed_message_naming_another_request_is_discarded() -> None:
    transport = MockTransport(echo)
    transport.push(_bad_tensor("earlier-call"))
    with Client(transport=transport) as client:
        np.testing.assert_array_equal(client.invoke("m", np.ones(2)).output, np.ones(2))


def test_deadline_travels_as_timeout_ms_with_the_priority() -> None:
    transport = MockTransport(echo)
    with Client(transport=transport) as client:
        client.invoke("m", np.zeros(1), priority=0, deadline=1.5)
        client.invoke("m", np.zeros(1))
        client.invoke("m", np.zeros(1), deadline=60, timeout=2)
    first, second, third = transport.requests
    assert (first.model, first.priority, first.timeout_ms) == ("m", 0, 1500)
    # No deadline: the client's own timeout (30 s default) is the budget the coordinator sees.
    assert (second.priority, second.timeout_ms) == (1, 30_000)
    assert third.timeout_ms == 2000  # the tighter of deadline and timeout
    assert first.id != second.id and len(first.id) == 32


def test_arguments_are_checked_before_sending() -> None:
    transport = MockTransport(echo)
    with Client(transport=transport) as client:
        with pytest.raises(ValueError, match="priority"):
            client.invoke("m", np.zeros(1), priority=3)
        with pytest.raises(ValueError, match="deadline"):
            client.invoke("m", np.zeros(1), deadline=0)
        with pytest.raises(ValueError, match="timeout"):
            client.invoke("m", np.zeros(1), timeout=-1)
        with pytest.raises(BadRequest, match="not sent"):
            client.invoke("m", np.array([1 + 2j]))  # complex cannot travel
    assert transport.requests == []
    with pytest.raises(RuntimeError, match="closed"):
        client.invoke("m", np.zeros(1))


def test_the_sync_client_refuses_concurrent_use() -> None:
    def reentrant(request: Request) -> Reply:
        client.invoke("m", np.zeros(1))  # while the outer call holds the socket
        return echo(request)

    client = Client(transport=MockTransport(reentrant))
    with client, pytest.raises(RuntimeError, match="one thread"):
        client.invoke("m", np.zeros(1))


class CancelRecording(MockTransport):
    """A MockTransport that also records the CANCELs a client sends (by request id)."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler)
        self.cancels: list[str] = []

    def send(self, frames: Sequence[Any]) -> None:
        message = decode([bytes(f) for f in frames])
        if isinstance(message, Cancel):
            self.cancels.append(message.id)
        else:
            super().send(frames)


class AsyncCancelRecording(AsyncMockTransport):
    def __init__(self, handler: Any) -> None:
        super().__init__(handler)
        self.cancels: list[str] = []

    async def send(self, frames: Sequence[Any]) -> None:
        message = decode([bytes(f) for f in frames])
        if isinstance(message, Cancel):
            self.cancels.append(message.id)
        else:
            await super().send(frames)


def first_piece_only(request: Request) -> Reply | list[bytes]:
    """A generation that streams one token and never finishes; anything else is echoed."""
    if "max_new_tokens" not in request.options:
        return echo(request)
    piece = Partial(request.id, 0, outputs=[np.array([7], np.int64)], served_by=SERVED_BY)
    return [bytes(f) for f in encode(piece)]


PROMPT = np.zeros((1, 3), np.int64)


def test_leaving_a_stream_early_cancels_the_request_and_frees_the_client() -> None:
    transport = CancelRecording(first_piece_only)
    with Client(transport=transport, timeout=5) as client:
        with client.stream("gpt2", PROMPT, max_new_tokens=8) as stream:
            assert next(stream).tokens.tolist() == [7]
        # The same thread calls again at once (no "called from two threads").
        np.testing.assert_array_equal(client.invoke("m", np.ones(2)).output, np.ones(2))
        s = client.stream("gpt2", PROMPT, max_new_tokens=8)
        next(s)
        s.close()
        s.close()  # idempotent
        for _ in client.stream("gpt2", PROMPT, max_new_tokens=8):
            break  # the dropped stream is closed with the loop
        client.invoke("m", np.ones(2))
        # Streams read to their end, or never started, cancel nothing.
        with client.stream("m", np.ones(2)) as finished:
            assert list(finished) == [] and finished.result is not None
        client.stream("gpt2", PROMPT, max_new_tokens=8).close()
    generations = [r.id for r in transport.requests if "max_new_tokens" in r.options]
    assert len(generations) == 3 and transport.cancels == generations


def test_leaving_an_async_stream_early_cancels_the_request() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        transport = AsyncCancelRecording(first_piece_only)
        async with AsyncClient(transport=transport, timeout=5) as client:
            async with client.stream("gpt2", PROMPT, max_new_tokens=8) as stream:
                async for piece in stream:
                    assert piece.tokens.tolist() == [7]
                    break
            assert client._pending == {}  # nobody waits for that request any more
            result = await client.invoke("m", np.ones(2))
            np.testing.assert_array_equal(result.output, np.ones(2))
            s = client.stream("gpt2", PROMPT, max_new_tokens=8)
            await s.__anext__()
            await s.aclose()
            await s.aclose()  # idempotent
            async with client.stream("m", np.ones(2)) as finished:
                assert [p async for p in finished] == [] and finished.result is not None
        ids = [r.id for r in transport.requests if "max_new_tokens" in r.options]
        return ids, transport.cancels

    generations, cancels = asyncio.run(scenario())
    assert len(generations) == 2 and cancels == generations


def test_curve_config_checks_keys_and_hides_the_secret() -> None:
    public, secret = zmq.curve_keypair()
    config = CurveConfig(public.decode(), public, secret)
    assert secret.decode() not in repr(config)
    with pytest.raises(ValueError, match="secret_key"):
        CurveConfig(public, public, b"too short")


def test_async_client_on_the_mock_transport() -> None:
    def slow_second(request: Request) -> Reply | None:
        return None if request.model == "silent" else echo(request)

    async def scenario() -> tuple[list[InvokeResult], Timeout, TransportError]:
        transport = AsyncMockTransport(slow_second)
        transport.push(Reply("earlier-call", Status.OK, outputs=[np.zeros(1)]))
        async with AsyncClient(transport=transport, timeout=5) as client:
            results = await asyncio.gather(*(client.invoke("m", np.full(2, i)) for i in range(5)))
            with pytest.raises(Timeout) as timed_out:
                await client.invoke("silent", np.zeros(1), timeout=0.05)
            transport.handler = lambda request: _bad_tensor(request.id)
            with pytest.raises(TransportError) as malformed:
                await client.invoke("m", np.zeros(1))
        assert transport.closed
        return results, timed_out.value, malformed.value

    results, timed_out, malformed = asyncio.run(scenario())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.output, np.full(2, i))
    assert timed_out.side == "client"
    assert malformed.request_id is not None


def test_import_cicada_is_lazy() -> None:
    code = (
        "import sys, cicada; "
        "assert not {'numpy', 'zmq', 'torch'} & set(sys.modules), 'eager import'; "
        "from cicada import Client, Timeout, __all__; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert all(hasattr(cicada, name) for name in __all__); "
        "assert Timeout.__module__ == 'cicada.errors'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    import cicada

    with pytest.raises(AttributeError):
        cicada.NoSuchThing  # noqa: B018


# -- real sockets -----------------------------------------------------------------------------


class StandInCoordinator:
    """A ROUTER on a random loopback port, answering in a thread: echoes inputs as outputs
    (status OK), or answers `status`, or never answers; `shuffle` answers batches out of order.
    """

    def __init__(
        self,
        *,
        answer: bool = True,
        status: Status = Status.OK,
        shuffle: bool = False,
        curve_secret_key: bytes | None = None,
    ) -> None:
        self.answer, self.status, self.shuffle = answer, status, shuffle
        self.requests: list[Request] = []
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve_secret_key is not None:
            self.socket.curve_server = True
            self.socket.curve_secretkey = curve_secret_key
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        rng = random.Random(0)
        while not self._stop.is_set():
            if not self.socket.poll(20):
                continue
            time.sleep(0.005)  # let a burst gather, so shuffling has something to reorder
            batch: list[list[bytes]] = []
            while True:
                try:
                    batch.append(self.socket.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            if self.shuffle:
                rng.shuffle(batch)
            for identity, *frames in batch:
                self._answer(identity, frames)

    def _answer(self, identity: bytes, frames: Sequence[bytes]) -> None:
        request = decode(frames)
        assert isinstance(request, Request)
        self.requests.append(request)
        if not self.answer:
            return
        ok = self.status is Status.OK
        reply = Reply(
            request.id, self.status, outputs=request.inputs if ok else [],
            error="" if ok else "stand-in says no", retry_after_ms=None if ok else 250,
            served_by=SERVED_BY, timings={"queue_s": 0.0, "compute_s": 0.0, "total_s": 0.0},
        )  # fmt: skip
        self.socket.send_multipart([identity, *encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close(linger=0)


@pytest.fixture
def coordinator() -> Iterator[StandInCoordinator]:
    stand_in = StandInCoordinator(shuffle=True)
    yield stand_in
    stand_in.close()


def test_sockets_are_bounded() -> None:
    transport = ZmqTransport("tcp://127.0.0.1:9")  # connect is lazy: nothing needs to listen
    socket = transport._socket
    try:
        assert socket.getsockopt(zmq.TYPE) == zmq.DEALER
        assert socket.getsockopt(zmq.LINGER) == 0
        assert socket.getsockopt(zmq.SNDHWM) == socket.getsockopt(zmq.RCVHWM) == 1000
        assert socket.getsockopt(zmq.MAXMSGSIZE) == DEFAULT_LIMITS.max_message_bytes
    finally:
        transport.close()


def test_sync_client_round_trip(coordinator: StandInCoordinator) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    ids = np.arange(10, dtype=np.int64)
    with Client(coordinator.address, timeout=10) as client:
        for _ in range(3):
            result = client.invoke("echo", [x, ids], deadline=5)
            np.testing.assert_array_equal(result.outputs[0], x)
            np.testing.assert_array_equal(result.outputs[1], ids)
            assert result.served_by == SERVED_BY
    assert [r.timeout_ms for r in coordinator.requests] == [5000] * 3


def test_async_client_many_concurrent_invokes(coordinator: StandInCoordinator) -> None:
    inputs = [np.full((2, 3), i, dtype=np.float32) for i in range(50)]

    async def scenario() -> list[InvokeResult]:
        async with AsyncClient(coordinator.address, timeout=10) as client:
            return await asyncio.gather(*(client.invoke("echo", x) for x in inputs))

    results = asyncio.run(scenario())
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.output, x)
    assert len({result.request_id for result in results}) == 50
    assert {r.id for r in coordinator.requests} == {result.request_id for result in results}


def test_a_silent_coordinator_ends_in_a_client_timeout() -> None:
    silent = StandInCoordinator(answer=False)
    try:
        with Client(silent.address, timeout=0.3) as client, pytest.raises(Timeout) as caught:
            client.invoke("echo", np.zeros(2))
        assert caught.value.side == "client"

        async def scenario() -> None:
            async with AsyncClient(silent.address, timeout=0.3) as client:
                await client.invoke("echo", np.zeros(2))

        with pytest.raises(Timeout):
            asyncio.run(scenario())
    finally:
        silent.close()


def test_curve_client_with_the_right_server_key_is_answered() -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    secure = StandInCoordinator(curve_secret_key=server_secret)
    try:
        curve = CurveConfig(server_public, client_public, client_secret)
        with Client(secure.address, timeout=10, curve=curve) as client:
            result = client.invoke("echo", np.arange(4))
        np.testing.assert_array_equal(result.output, np.arange(4))

        wrong = CurveConfig(zmq.curve_keypair()[0], client_public, client_secret)
        # The handshake fails, so nothing is delivered: the client says so instead of waiting
        # out its timeout, and points at the server key.
        with (
            Client(secure.address, timeout=60, curve=wrong) as client,
            pytest.raises(KeyRefused, match="--server-key") as caught,
        ):
            client.invoke("echo", np.arange(4))
        assert caught.value.request_id is not None
        assert len(secure.requests) == 1
    finally:
        secure.close()


# -- cicada invoke ----------------------------------------------------------------------------


def _cicada(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cicada", "invoke", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_cli_invoke_writes_the_output(coordinator: StandInCoordinator, tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    done = _cicada(
        "echo", "--input", str(tmp_path / "x.npy"), "--coordinator", coordinator.address,
        "--out", str(out), "--priority", "0", "--deadline", "5", "--timeout", "20",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(out), x)
    assert "served by edge worker echo-1" in done.stdout and "client " in done.stdout
    assert (coordinator.requests[0].priority, coordinator.requests[0].timeout_ms) == (0, 5000)

    y = np.ones(3, dtype=np.float32)
    np.save(tmp_path / "y_in.npy", y)
    done = _cicada(
        "echo", "--input", str(tmp_path / "x.npy"), "--input", str(tmp_path / "y_in.npy"),
        "--coordinator", coordinator.address, "--out", str(tmp_path / "o.npy"), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "OK" and summary["served_by"] == SERVED_BY
    assert [o["shape"] for o in summary["outputs"]] == [[3, 4], [3]]
    np.testing.assert_array_equal(np.load(tmp_path / "o_1.npy"), y)


def test_cli_invoke_exit_status_for_a_failed_call(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(2))
    busy = StandInCoordinator(status=Status.UNAVAILABLE)
    try:
        done = _cicada("m", "--input", str(tmp_path / "x.npy"), "--coordinator", busy.address,
                       "--json")  # fmt: skip
    finally:
        busy.close()
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "stand-in says no" in done.stderr
    assert json.loads(done.stdout)["retry_after"] == 0.25


def test_cli_invoke_usage_errors_exit_2(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(2))
    runner = CliRunner()
    x = str(tmp_path / "x.npy")
    assert runner.invoke(cli, ["invoke", "m", "--input", x, "--priority", "3"]).exit_code == 2
    assert runner.invoke(cli, ["invoke", "m"]).exit_code == 2
    (tmp_path / "bad.npy").write_text("not an array")
    bad = runner.invoke(cli, ["invoke", "m", "--input", str(tmp_path / "bad.npy")])
    assert bad.exit_code == 2 and "bad.npy" in bad.output
    wrong = runner.invoke(cli, ["invoke", "m", "--input", x, "--address", "nowhere"])
    assert wrong.exit_code == 2 and "nowhere" in wrong.output
