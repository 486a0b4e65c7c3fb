"""The gateway's defaults, plain constants (the CLI reads them without importing the server)."""

from __future__ import annotations

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_MAX_BODY_BYTES = 32 << 20  # JSON tensors are ~10x their bytes; binary data is not
