"""What the SDK's liveness check (cicada/liveness.py) costs per call, and saves when nobody
answers.

* **Per call**: `Client.invoke` round trips to an echo coordinator (a ROUTER thread in this
  process answering every REQUEST OK at once with its inputs), with the connection watch (the
  default) and without it (a `ZmqTransport` handed in, which skips the wait), in alternating
  rounds; reported as the ratio of the medians, watched / unwatched.
* **Nobody there**: how long a call to a port where nothing listens takes to fail, as a
  fraction of the call's timeout (before the watch, it waited the whole timeout).

    python3 -m benchmarks.client_liveness [--calls 300] [--rounds 5] [--timeout 30]

Prints one JSON object. Machines here are noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import numpy as np
import zmq

from cicada import Client
from cicada.client import ZmqTransport
from cicada.common.protocol import Reply, Request, Status, decode, encode
from cicada.errors import NoCoordinator
from cicada.testing import free_port


class EchoCoordinator:
    """A ROUTER on loopback that answers every REQUEST OK with its inputs, at once."""

    def __init__(self) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            request = decode(frames)
            if isinstance(request, Request):
                reply = Reply(request.id, Status.OK, outputs=request.inputs)
                self.sock.send_multipart([identity, *encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(linger=0)


def per_call_s(client: Client, calls: int, x: np.ndarray) -> float:
    """The median seconds of one invoke over `calls` calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.invoke("echo", x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(calls: int, rounds: int, timeout: float) -> dict[str, Any]:
    x = np.arange(16, dtype=np.float32)
    echo = EchoCoordinator()
    try:
        watched_c = Client(echo.address, timeout=timeout)
        bare_c = Client(echo.address, timeout=timeout, transport=ZmqTransport(echo.address))
        with watched_c, bare_c:
            per_call_s(watched_c, 10, x), per_call_s(bare_c, 10, x)  # connect and warm up
            watched, bare = [], []
            for _ in range(rounds):  # alternate, so drift in the machine hits both alike
                watched.append(per_call_s(watched_c, calls, x))
                bare.append(per_call_s(bare_c, calls, x))
    finally:
        echo.close()
    nobody = f"tcp://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    try:
        with Client(nobody, timeout=timeout) as client:
            client.invoke("echo", x)
    except NoCoordinator:
        failed_after = time.perf_counter() - start
    else:  # pragma: no cover - something answered on a free port
        raise SystemExit(f"something answered at {nobody}")
    w, b = statistics.median(watched), statistics.median(bare)
    return {
        "calls_per_round": calls,
        "rounds": rounds,
        "per_call_watched_s": w,
        "per_call_unwatched_s": b,
        "watched_over_unwatched": w / b,
        "no_coordinator_error_after_s": failed_after,
        "call_timeout_s": timeout,
        "error_after_over_timeout": failed_after / timeout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    print(json.dumps(run(args.calls, args.rounds, args.timeout), indent=1))


if __name__ == "__main__":
    main()
