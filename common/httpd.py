"""Small HTTP endpoints that idle or slow clients cannot exhaust: the coordinator's /metrics and
the cloud worker's /ready and /healthz.

`http.server` (and prometheus_client's server, built on it) gives every connection a thread
that waits, with no timeout, for a request: 400 idle connections hold 400 threads forever.
Here a connection costs a descriptor, not a thread, until its request has arrived:

* one thread (the *door*) holds every new connection and reads it without blocking until the
  request head (request line and headers, at most MAX_HEAD bytes) is complete; a connection
  that has not sent one within `idle_timeout` seconds of being accepted is closed;
* at most `max_connections` are held; one more drops the oldest still waiting (so a flood of
  idle connections cannot keep a real request out);
* a few handler threads then answer complete requests from the buffered head; writing the
  answer is bounded by the same timeout.

The endpoints take GET requests without a body (probes, scrapes): the head is all a handler
reads. Torch-free and numpy-free (the coordinator imports it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger("cicada.http")

IDLE_TIMEOUT_S = 5.0  # a connection must send its request (and take its answer) within this
MAX_CONNECTIONS = 256  # connections held at once, waiting for their request or answered
HANDLER_THREADS = 4
MAX_HEAD = 16 * 1024  # request line and headers; a probe or a scrape sends a few hundred bytes


class _HeadFromBuffer(BaseHTTPRequestHandler):
    """Reads the request from the head the door buffered instead of from the socket."""

    server: GuardedServerMixin  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's reader: the head was already read off the socket
        self.rfile = io.BytesIO(self.server._local.head)


class GuardedServerMixin:
    """A socketserver.TCPServer whose connections wait for their request at the door (module
    docstring). `start()` serves on daemon threads; `shutdown()` stops and closes it all."""

    idle_timeout = IDLE_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    handler_threads = HANDLER_THREADS
    request_queue_size = 128  # the listen backlog: a burst of connects is not dropped
    allow_reuse_address = True

    # What TCPServer gives the mixin.
    address_family: int
    serve_forever: Callable[..., None]
    finish_request: Callable[..., None]
    shutdown_request: Callable[..., None]
    server_close: Callable[[], None]

    def __init__(self, address: tuple[str, int], handler: type[Any], **kwargs: Any) -> None:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
        self.address_family = infos[0][0]  # IPv6 hosts too
        handler = type(handler.__name__, (_HeadFromBuffer, handler), {})
        super().__init__(address, handler, **kwargs)  # type: ignore[call-arg]
        self._local = threading.local()
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, Any]] = []
        self._ready: queue.Queue[tuple[socket.socket, Any, bytes] | None] = queue.Queue()
        self._busy = 0  # handed to a handler thread, not yet answered
        self._closing = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads: list[threading.Thread] = []

    def start(self, name: str) -> None:
        targets = [(self.serve_forever, name), (self._door, f"{name}-door")]
        targets += [(self._handle, f"{name}-{i}") for i in range(self.handler_threads)]
        for target, thread_name in targets:
            thread = threading.Thread(target=target, name=thread_name, daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- socketserver hooks ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """An accepted connection: to the door, which holds it until its request is in."""
        with self._lock:
            self._incoming.append((request, client_address))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"c")

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def shutdown(self) -> None:
        """Stop serving and close everything: the listener, held connections, the threads."""
        super().shutdown()  # type: ignore[misc]
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for _ in range(self.handler_threads):
            self._ready.put(None)
        for thread in self._threads[1:]:
            thread.join(timeout=self.idle_timeout + 1)
        self.server_close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the door ------------------------------------------------------------------------------

    def _door(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        held: dict[socket.socket, tuple[Any, float, bytearray]] = {}  # oldest first

        def drop(sock: socket.socket) -> None:
            held.pop(sock, None)
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

        try:
            while not self._closing.is_set():
                now = time.monotonic()
                soonest = min((d for _, d, _ in held.values()), default=now + 1.0)
                for key, _ in selector.select(max(0.0, min(1.0, soonest - now))):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._admit(selector, held, drop)
                        continue
                    assert isinstance(sock, socket.socket)
                    self._read(sock, held, drop, selector)
                now = time.monotonic()
                for sock, (_, deadline, _) in list(held.items()):
                    if now > deadline:
                        drop(sock)  # silent past the timeout
        finally:
            for sock in list(held):
                drop(sock)
            with self._lock:
                incoming, self._incoming = self._incoming, []
            for sock, _ in incoming:
                sock.close()
            selector.close()

    def _admit(
        self,
        selector: selectors.BaseSelector,
        held: dict[socket.socket, tuple[Any, float, bytearray]],
        drop: Callable[[socket.socket], None],
    ) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, address in incoming:
            with self._lock:
                full = len(held) + self._busy >= self.max_connections
            if full and held:
                drop(next(iter(held)))  # the oldest still waiting makes room
            elif full:
                sock.close()  # every slot is being answered: refuse this one
                continue
            sock.setblocking(False)
            held[sock] = (address, time.monotonic() + self.idle_timeout, bytearray())
            selector.register(sock, selectors.EVENT_READ)

    def _read(
        self,
        sock: socket.socket,
        held: dict[socket.socket, tuple[Any, float, bytearray]],
        drop: Callable[[socket.socket], None],
        selector: selectors.BaseSelector,
    ) -> None:
        address, _, buf = held[sock]
        try:
            chunk = sock.recv(MAX_HEAD + 1 - len(buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buf += chunk
        if not chunk or len(buf) > MAX_HEAD:
            drop(sock)  # closed before a whole request, or a head no probe sends
            return
        if b"\r\n\r\n" not in buf and b"\n\n" not in buf:
            return
        held.pop(sock)
        selector.unregister(sock)
        with self._lock:
            self._busy += 1
        self._ready.put((sock, address, bytes(buf)))

    # -- handler threads ------------------------------------------------------------------------

    def _handle(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            sock, address, head = item
            try:
                sock.setblocking(True)
                sock.settimeout(self.idle_timeout)  # a client that does not read its answer
                self._local.head = head
                self.finish_request(sock, address)
            except Exception:
                self.handle_error(sock, address)
            finally:
                self.shutdown_request(sock)
                with self._lock:
                    self._busy -= 1


class GuardedHTTPServer(GuardedServerMixin, HTTPServer):
    """For a BaseHTTPRequestHandler (the cloud worker's health endpoint)."""


class GuardedWSGIServer(GuardedServerMixin, WSGIServer):
    """For a WSGI app (prometheus_client's /metrics app)."""


class QuietWSGIHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the log


def serve_http(host: str, port: int, handler: type[BaseHTTPRequestHandler],
               name: str) -> GuardedHTTPServer:  # fmt: skip
    server = GuardedHTTPServer((host, port), handler)
    server.start(name)
    return server


def serve_wsgi(host: str, port: int, app: Any, name: str) -> GuardedWSGIServer:
    server = GuardedWSGIServer((host, port), QuietWSGIHandler)
    server.set_app(app)
    server.start(name)
    return server
