"""What a user sees when something is off: typed endpoints, taken ports, no coordinator, a
refused key, a hung worker, a mistyped model name (cicada/cli/, cicada/liveness.py).

Real processes on loopback: one coordinator with an edge agent for the tiny GPT-2 (registered
as "gpt2") and a slow one ("slow", a token every few seconds), shared by the module; every
command runs as `python -m cicada ...`, as a user runs it, and the test reads its exit status
and its stderr. A CURVE coordinator is started only by the test that needs one.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cicada import AsyncClient, Client
from cicada.client import CurveConfig
from cicada.errors import BadRequest, KeyRefused, NoCoordinator, Timeout, WorkerHung
from cicada.testing import Stack, free_port
from cicada.testing.stack import ROOT


def cicada(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m cicada ARGS`; the timeout only bounds a hang (the tests say what's due)."""
    return subprocess.run(
        [sys.executable, "-m", "cicada", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single stderr line of a failed command, checked to name `words` (no traceback)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> Iterator[Stack]:
    """A coordinator, an edge agent for "gpt2" given its endpoint without tcp:// (HOST:PORT
    is normalised), and a slow edge agent for "slow"."""
    with Stack(tmp_path_factory.mktemp("cli-errors")) as stack:
        stack.coordinator()
        plain = stack.address.removeprefix("tcp://")
        stack.start("edge", "edge", "--model", "gpt2", "--onnx", str(tiny_package["edge"]),
                    "--coordinator", plain, "--heartbeat", "0.2")  # fmt: skip
        stack.edge("slow", tiny_package["edge"], "slow", "--token-interval", "3")
        stack.wait_workers("edge", 2)
        yield stack


@pytest.fixture
def x(tiny_package: dict[str, Path]) -> str:
    return str(tiny_package["input"])


# -- endpoints as typed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["coordinator", "--bind", "127.0.0.1"], "--bind"),
        (["coordinator", "--bind", "udp://127.0.0.1:5555"], "--bind"),
        (["coordinator", "--metrics", "127.0.0.1:http"], "--metrics"),
        (["edge", "--model", "m", "--onnx", ".", "--coordinator", "127.0.0.1:55x"],
         "--coordinator"),
        (["cloud", "--model", "m", "--package", ".", "--coordinator", "http://h:1"],
         "--coordinator"),
        (["invoke", "m", "--text", "hi", "--coordinator", "nowhere"], "--coordinator"),
        (["status", "--metrics", "localhost"], "--metrics"),
    ],
)  # fmt: skip
def test_an_endpoint_typo_is_one_line_naming_the_option(args: list[str], option: str) -> None:
    done = cicada(*args)
    assert done.returncode == 2
    one_line_error(done, option, "HOST:PORT")


def test_host_port_without_a_scheme_means_tcp(served: Stack, x: str) -> None:
    # The "gpt2" agent was started with --coordinator HOST:PORT and registered; so does a
    # client given HOST:PORT.
    with Client(served.address.removeprefix("tcp://"), timeout=60) as client:
        result = client.invoke("gpt2", np.load(x))
    assert result.served_by["role"] == "edge" and client.address == served.address


# -- ports already taken ------------------------------------------------------------------------


def test_a_taken_zmq_port_is_one_line_and_exit_1(served: Stack) -> None:
    done = cicada("coordinator", "--bind", served.address, "--metrics", "off")
    assert done.returncode == 1
    one_line_error(done, "--bind", str(served.port), "already in use")


def test_a_taken_metrics_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cicada("coordinator", "--bind", f"127.0.0.1:{free_port()}", "--metrics",
                      f"http://127.0.0.1:{port}/metrics")  # fmt: skip
    assert done.returncode == 1
    one_line_error(done, "--metrics", str(port), "already in use")


def test_a_taken_health_port_stops_the_cloud_worker_before_it_starts(
    tiny_package: dict[str, Path],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cicada("cloud", "--model", "gpt2", "--package", str(tiny_package["package"]),
                      "--coordinator", f"127.0.0.1:{free_port()}",
                      "--health-port", str(port))  # fmt: skip
    assert done.returncode == 1
    one_line_error(done, "--health-port", str(port), "already in use")


def test_a_pool_socket_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    done = cicada("pool", "--socket", str(tmp_path / "nope" / "pool.sock"))
    assert done.returncode == 2
    one_line_error(done, "--socket", "does not exist")


def test_a_pool_socket_where_a_pool_listens_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "pool.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:  # as a running pool
        live.bind(str(path))
        live.listen()
        done = cicada("pool", "--socket", str(path))
        assert done.returncode == 1
        one_line_error(done, "--socket", "a pool already listens there")
        assert path.exists()  # not unlinked and rebound under the live one


# -- nobody there, the key refused, a worker hung -------------------------------------------------


def test_no_coordinator_is_said_in_seconds_not_after_the_timeout(x: str) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    # --timeout 600 and a subprocess bound of 120 s: only a fast answer can pass.
    done = cicada("invoke", "gpt2", "--input", x, "--coordinator", nobody, "--timeout", "600")
    assert done.returncode == 1
    one_line_error(done, "no coordinator answers at tcp://" + nobody, "connection refused")
    with Client(nobody, timeout=600) as client, pytest.raises(NoCoordinator) as caught:
        client.invoke("gpt2", np.load(x))
    assert not isinstance(caught.value, Timeout) and caught.value.request_id

    async def call() -> None:
        async with AsyncClient(nobody, timeout=600) as client:
            await client.invoke("gpt2", np.load(x))

    with pytest.raises(NoCoordinator, match="connection refused"):
        asyncio.run(call())


def test_a_key_the_coordinator_does_not_list_is_refused(
    tmp_path: Path, tiny_package: dict[str, Path], x: str
) -> None:
    keys = tmp_path / "keys"
    made = cicada("keys", "--out", str(keys), "--name", "coordinator", "--name", "client",
                  "--name", "stranger")  # fmt: skip
    assert made.returncode == 0, made.stderr
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    with Stack(tmp_path) as stack:
        stack.coordinator("--curve-secret", str(keys / "coordinator.key_secret"),
                          "--allow", str(allowed))  # fmt: skip
        stranger = ["--curve-key", str(keys / "stranger.key_secret"),
                    "--server-key", str(keys / "coordinator.key")]  # fmt: skip
        done = cicada("invoke", "gpt2", "--input", x, "--coordinator", stack.address,
                      "--timeout", "600", *stranger)  # fmt: skip
        assert done.returncode == 1
        one_line_error(done, "refused this client's CURVE key", "--allow")

        plain = cicada("invoke", "gpt2", "--input", x, "--coordinator", stack.address,
                       "--timeout", "600")  # fmt: skip
        assert plain.returncode == 1
        one_line_error(plain, "wants CURVE keys")

        known = cicada("invoke", "gpt2", "--input", x, "--coordinator", stack.address,
                       "--curve-key", str(keys / "client.key_secret"),
                       "--server-key", str(keys / "coordinator.key"))  # fmt: skip
        # Let in, and told the truth: nobody serves gpt2 at this coordinator.
        assert known.returncode == 1 and "unknown model 'gpt2'" in known.stderr

        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(keys / "stranger.key_secret"))
        server = zmq.auth.load_certificate(str(keys / "coordinator.key"))[0]
        assert secret is not None
        curve = CurveConfig(server, public, secret)
        client = Client(stack.address, timeout=600, curve=curve)
        with client, pytest.raises(KeyRefused, match="allow-list"):
            client.invoke("gpt2", np.load(x))


def test_a_worker_that_does_not_finish_in_time_is_named(served: Stack, x: str) -> None:
    prompt = np.load(x)
    with Client(served.address, timeout=60) as client, pytest.raises(WorkerHung) as caught:
        client.invoke("slow", prompt, max_new_tokens=8, deadline=1.0)
    error = caught.value
    assert error.side == "coordinator" and error.served_by is not None
    assert error.served_by["worker"] == "slow" and "edge worker slow" in str(error)

    done = cicada("invoke", "slow", "--input", x, "--max-new-tokens", "8", "--deadline", "1",
                  "--coordinator", served.address)  # fmt: skip
    assert done.returncode == 1
    one_line_error(done, "TIMEOUT", "while running on edge worker slow", "hung")


# -- a mistyped model name --------------------------------------------------------------------


def test_an_unknown_model_is_told_what_is_served_and_never_to_retry(served: Stack, x: str) -> None:
    with Client(served.address, timeout=60) as client, pytest.raises(BadRequest) as caught:
        client.invoke("gtp2", np.load(x))
    message = str(caught.value)
    assert "this coordinator serves: 'gpt2', 'slow'" in message
    assert "did you mean 'gpt2'?" in message and "retry" not in message

    done = cicada("invoke", "gpt-2", "--input", x, "--coordinator", served.address)
    assert done.returncode == 1
    line = one_line_error(done, "BAD_REQUEST", "did you mean 'gpt2'?")
    assert "retry" not in line

    far = cicada("invoke", "resnet", "--input", x, "--coordinator", served.address)
    assert far.returncode == 1 and "did you mean" not in far.stderr


# -- what invoke prints ---------------------------------------------------------------------------


def test_invoke_prints_seconds_for_times_and_counts_for_tokens(served: Stack, x: str) -> None:
    done = cicada("invoke", "gpt2", "--input", x, "--max-new-tokens", "3",
                  "--coordinator", served.address)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (timings,) = [line for line in done.stdout.splitlines() if line.startswith("timings: ")]
    shown = dict(item.split(" ", 1) for item in timings.removeprefix("timings: ").split(", "))
    assert shown["worker_tokens"] == "3"  # a count, not "3.0000 s"
    assert shown["total"].endswith(" s") and float(shown["total"].removesuffix(" s")) > 0
    assert all(v.endswith(" s") for k, v in shown.items() if "tokens" not in k), shown
