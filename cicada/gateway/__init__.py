"""The HTTP gateway: the OpenAI API and the Open Inference Protocol (KServe v2) in front of a
coordinator, spoken through the SDK (`cicada.AsyncClient`). Torch-free; docs/GATEWAY.md.

    errors.py      HTTP outcomes, and the SDK's errors mapped to status codes
    requests.py    bounded bodies, JSON, priority and deadline from headers and parameters
    models.py      what the gateway knows of each model: `--package` dirs, the coordinator's
                   /metrics (served models, readiness)
    text.py        a package's tokenizer.json
    files.py       a model directory's files, read confined and bounded
    tensors.py     KServe tensors: JSON data and the binary-data extension
    jsonio.py      JSON in and out (orjson: numpy arrays written natively)
    openai_api.py  /v1/models, /v1/embeddings, /v1/completions (streaming too)
    kserve.py      /v2/health/*, /v2/models/{name}[/ready|/infer]
    service.py     the gateway's state: config, catalog, SDK client; SDK errors as HTTP
    app.py         the Starlette application
    defaults.py    plain constants the CLI reads
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cicada.gateway.app import create_app
    from cicada.gateway.service import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: `cicada gateway --help` and cicada.gateway.defaults import no server code.
    if name == "create_app":
        from cicada.gateway.app import create_app

        return create_app
    if name == "GatewayConfig":
        from cicada.gateway.service import GatewayConfig

        return GatewayConfig
    raise AttributeError(name)
