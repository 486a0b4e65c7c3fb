"""A worker that only reports: it registers for a model in the state, residency and ETA it is
given and heartbeats them from its own thread, never answering a DISPATCH (the work sent to it
stays in flight). For what a coordinator shows of a cold start without running one."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from cicada.common.protocol import Heartbeat, Ready, Role, WorkerState, encode


class ReportingWorker:
    def __init__(
        self,
        address: str,
        name: str,
        model: str,
        *,
        interval: float,
        role: Role = Role.CLOUD,
        state: WorkerState = WorkerState.LOADING,
        resident_stages: int = 0,
        total_stages: int = 0,
        eta_s: float | None = None,
    ) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        ready = Ready(role=role, worker=name, models=[model], variant="reporting",
                      state=state, resident_stages=resident_stages,
                      total_stages=total_stages, eta_s=eta_s)  # fmt: skip
        self.sock.send_multipart(encode(ready))
        self._beat = encode(Heartbeat(state=state, resident_stages=resident_stages,
                                      total_stages=total_stages, eta_s=eta_s))  # fmt: skip
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reporting-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            while self.sock.poll(0):
                self.sock.recv_multipart()  # heartbeats and dispatches: never answered
            self.sock.send_multipart(self._beat)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> ReportingWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
