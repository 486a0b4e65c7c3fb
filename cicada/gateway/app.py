"""The gateway's Starlette application: the routes, errors rendered in each API's shape, and
the SDK client's lifetime.

Starlette on uvicorn: an ASGI toolkit without a validation layer in the hot path (every body
is checked by hand, as the rest of Cicada checks peer input), streaming responses for
server-sent events, and httptools/uvloop where installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from cicada.client import AsyncClient
from cicada.gateway import kserve, openai_api
from cicada.gateway.errors import HttpError
from cicada.gateway.jsonio import JsonResponse
from cicada.gateway.models import Catalog
from cicada.gateway.service import Gateway, GatewayConfig

log = logging.getLogger(__name__)


def _render(request: Request, error: HttpError) -> Response:
    body = error.openai_body() if request.url.path.startswith("/v1") else error.kserve_body()
    return JsonResponse(body, status_code=error.status, headers=error.headers)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return _render(request, exc)


async def _on_starlette_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and methods, in the API's error shape rather than plain text.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _render(request, HttpError(exc.status_code, str(exc.detail), code=code))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    error = HttpError(500, f"internal gateway error ({type(exc).__name__})", code="internal")
    return _render(request, error)


def create_app(config: GatewayConfig, catalog: Catalog | None = None) -> Starlette:
    """The application; the SDK client connects when it starts (lifespan) and closes with it.
    `catalog`: the models' metadata (default: loaded from the config, raising PackageError)."""
    state = Gateway(config, catalog or Catalog.load(config.packages, config.metrics_url))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.client = AsyncClient(config.coordinator, timeout=config.timeout, curve=config.curve)
        try:
            yield
        finally:
            client, state.client = state.client, None
            await client.aclose()

    app = Starlette(
        routes=[*openai_api.routes(), *kserve.routes()],
        lifespan=lifespan,
        exception_handlers={
            HttpError: _on_http_error,
            HTTPException: _on_starlette_error,
            Exception: _on_unexpected,
        },
    )
    app.state.gateway = state
    return app
