"""Endpoints as users type them, checked before any socket sees them.

ZeroMQ endpoints (the coordinator's `--bind`, everyone's `--coordinator`):

    tcp://HOST:PORT     as is (HOST a name, an IPv4 address, [IPv6] or * to bind all)
    HOST:PORT           the same as tcp://HOST:PORT (the only scheme a HOST:PORT can mean)
    ipc://PATH          a Unix socket path, as is
    inproc://NAME       as is (one process only: tests)

HTTP listeners and their URLs (the coordinator's `--metrics`, `cicada status --metrics`):
HOST:PORT, or a URL `http://HOST:PORT[/path]`; both name the same listener.

Anything else is an `EndpointError` whose message says what was expected: a typo never
reaches libzmq, whose own error ("Invalid argument") names neither the option nor the fix.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from cicada.common.errors import EndpointError

ENDPOINT_RULE = "tcp://HOST:PORT (or HOST:PORT), ipc://PATH"
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(?P<port>[^:]*)")


def zmq_endpoint(value: str) -> str:
    """`value` as a ZeroMQ endpoint (HOST:PORT becomes tcp://HOST:PORT), or EndpointError."""
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise EndpointError(f"{value!r} names no {scheme} path; expected {ENDPOINT_RULE}")
        return f"{scheme}://{rest}"
    if scheme != "tcp":
        raise EndpointError(
            f"{value!r}: scheme {scheme!r} is not one ZeroMQ speaks here; expected {ENDPOINT_RULE}"
        )
    host, port = _split(rest, value, ENDPOINT_RULE, wildcard=True)
    return f"tcp://{host}:{port}"


def http_listener(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """(host, port) of an HTTP listener given as HOST:PORT, :PORT or http://HOST:PORT[/…]."""
    text = value.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme != "http" or not parts.netloc:
            raise EndpointError(f"{value!r} is not HOST:PORT or an http://HOST:PORT URL")
        text = parts.netloc
    if text.startswith(":"):
        text = default_host + text
    host, port = _split(text, value, "HOST:PORT or http://HOST:PORT", wildcard=False)
    return host.strip("[]"), port


def http_url(value: str, path: str = "/metrics") -> str:
    """The URL of `path` on a listener given as HOST:PORT or a URL (a URL's own path wins)."""
    host, port = http_listener(value)
    given = urlsplit(value.strip()).path if "://" in value else ""
    where = f"[{host}]" if ":" in host else host
    return f"http://{where}:{port}{given or path}"


def endpoint_port(endpoint: str) -> str:
    """The port of a tcp:// endpoint (for messages), or the endpoint itself."""
    match = _HOST_PORT.fullmatch(endpoint.removeprefix("tcp://"))
    return match.group("port") if match else endpoint


def _split(text: str, original: str, rule: str, *, wildcard: bool) -> tuple[str, int]:
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        raise EndpointError(f"{original!r} is not HOST:PORT; expected {rule}")
    host, port = match.group("host"), match.group("port")
    if host == "*" and not wildcard:
        raise EndpointError(f"{original!r}: give an address to listen on, e.g. 0.0.0.0")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EndpointError(f"{original!r}: the port must be a number 0..65535; expected {rule}")
    return host, int(port)
