"""Endpoints as users type them (common/endpoints.py): what is normalised, what is refused."""

from __future__ import annotations

import pytest

from cicada.common.endpoints import http_listener, http_url, zmq_endpoint
from cicada.common.errors import EndpointError


@pytest.mark.parametrize(
    ("typed", "endpoint"),
    [
        ("127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("TCP://host.example:80", "tcp://host.example:80"),
        ("  localhost:7000 ", "tcp://localhost:7000"),
        ("[::1]:5555", "tcp://[::1]:5555"),
        ("tcp://*:5555", "tcp://*:5555"),
        ("127.0.0.1:0", "tcp://127.0.0.1:0"),
        ("ipc:///run/cicada/c.sock", "ipc:///run/cicada/c.sock"),
        ("inproc://x", "inproc://x"),
    ],
)
def test_endpoints_that_can_only_mean_one_thing(typed: str, endpoint: str) -> None:
    assert zmq_endpoint(typed) == endpoint


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        ("127.0.0.1", "is not HOST:PORT"),
        ("5555", "is not HOST:PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:99999", "port must be a number"),
        ("127.0.0.1:55x", "port must be a number"),
        ("http://127.0.0.1:5555", "scheme 'http'"),
        ("udp://127.0.0.1:5555", "scheme 'udp'"),
        ("ipc://", "names no ipc path"),
        ("tcp://a:b:c", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
    ],
)
def test_typos_are_refused_saying_what_was_expected(typed: str, says: str) -> None:
    with pytest.raises(EndpointError, match=says) as caught:
        zmq_endpoint(typed)
    assert "tcp://HOST:PORT" in str(caught.value) or "ipc" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("typed", "listener", "url"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464), "http://127.0.0.1:9464/metrics"),
        (":9464", ("127.0.0.1", 9464), "http://127.0.0.1:9464/metrics"),
        ("http://10.0.0.5:9464/metrics", ("10.0.0.5", 9464), "http://10.0.0.5:9464/metrics"),
        ("http://h:1", ("h", 1), "http://h:1/metrics"),
        ("http://h:1/other", ("h", 1), "http://h:1/other"),
        ("[::1]:9464", ("::1", 9464), "http://[::1]:9464/metrics"),
    ],
)
def test_http_listeners_as_host_port_or_url(
    typed: str, listener: tuple[str, int], url: str
) -> None:
    assert http_listener(typed) == listener
    assert http_url(typed) == url


@pytest.mark.parametrize("typed", ["localhost", "https://h:1", "http://", "*:9464", "h:port"])
def test_http_listener_typos(typed: str) -> None:
    with pytest.raises(EndpointError):
        http_listener(typed)
