"""A `cicada gateway` process beside a `Stack`, for tests and benchmarks: started with
`python -m cicada gateway` as a user would, on a free loopback port, and waited for."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from cicada.testing.stack import Stack, StackError, StackTimeout, free_port


def start_gateway(stack: Stack, *extra: str, name: str = "gateway", timeout: float = 60.0) -> str:
    """Start a gateway for `stack`'s coordinator (its metrics too) and return its base URL
    once /v2/health/live answers: a bounded wait, not a timing assertion."""
    port = free_port()
    proc = stack.start(
        name, "gateway", "--coordinator", stack.address, "--listen", f"127.0.0.1:{port}",
        "--metrics", stack.metrics_url, *extra,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited: {stack.log(name)}")
        try:
            with urllib.request.urlopen(url + "/v2/health/live", timeout=2) as response:
                if response.status == 200:
                    return url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise StackTimeout(f"waited {timeout} s for {name} at {url}: {stack.log(name)}")
