"""What the gateway knows of each model, and where it learns it.

* `--package NAME=DIR` (`ModelDir.load`): a model package (`cicada pack`, manifest.json) or an
  edge model directory (`cicada export-edge`, edge_model.json). From it: the tensor signature
  (an edge model's input and output), the context and vocabulary, and tokenizer.json.
* The coordinator's /metrics (`CoordinatorView`), when the gateway is given `--metrics`: which
  models have workers and in which states, i.e. what is served and what is ready. It is read
  at most once a second, on demand, off the event loop.

A model is listed when either source names it; requests for other names still reach the
coordinator, whose "unknown model" answer becomes a 404.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cicada.common.edge_model import INFO_NAME
from cicada.common.errors import PackageFormatError
from cicada.common.generation import limits_of
from cicada.common.inputs import TensorSpec
from cicada.common.package import MANIFEST_NAME, Manifest
from cicada.gateway.files import read_model_file
from cicada.gateway.text import Tokenizer

MAX_INFO_BYTES = 1 << 20  # edge_model.json is ~2 KB
METRICS_TTL_S = 1.0  # readiness may be this stale; it spares the coordinator a scrape per call
METRICS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ModelDir:
    """One `--package NAME=DIR`: what its files say about the model."""

    name: str
    directory: Path
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    context: int | None = None
    vocab: int | None = None
    tokenizer: Tokenizer | None = None

    @classmethod
    def load(cls, name: str, directory: Path) -> ModelDir:
        """Read DIR's edge_model.json or manifest.json, and its tokenizer.json if any.
        PackageError (naming the file) when DIR is neither, or a file is malformed."""
        if not directory.is_dir():
            raise PackageFormatError(f"{directory} is not a directory")
        tokenizer = Tokenizer.load(directory)
        info = _read_info(directory)
        if info is not None:
            config = info.get("edge_config") or info.get("source_config") or {}
            context, vocab = limits_of(config if isinstance(config, dict) else {})
            inputs = tuple(_spec(info.get(k), directory) for k in ("input",) if k in info)
            outputs = tuple(_spec(info.get(k), directory) for k in ("output",) if k in info)
            return cls(name, directory, inputs, outputs, context, vocab, tokenizer)
        try:
            manifest = Manifest.load(directory)
        except PackageFormatError as exc:
            raise PackageFormatError(
                f"{directory} holds neither {INFO_NAME} (an edge model) nor a readable "
                f"{MANIFEST_NAME} (a package): {exc}"
            ) from None
        context, vocab = limits_of(manifest.architecture.config)
        return cls(name, directory, context=context, vocab=vocab, tokenizer=tokenizer)


def _read_info(directory: Path) -> dict[str, Any] | None:
    raw = read_model_file(directory, INFO_NAME, MAX_INFO_BYTES)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PackageFormatError(f"{directory / INFO_NAME} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PackageFormatError(f"{directory / INFO_NAME} must hold a JSON object")
    return doc


def _spec(doc: Any, directory: Path) -> TensorSpec:
    where = f"{directory / INFO_NAME}"
    if not isinstance(doc, dict):
        raise PackageFormatError(f"{where}: a tensor entry must be an object")
    name, dtype, shape = doc.get("name"), doc.get("dtype"), doc.get("shape")
    if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list):
        raise PackageFormatError(f"{where}: a tensor entry needs name, dtype and shape")
    if len(shape) > 8 or not all(isinstance(d, int) and d >= -1 for d in shape):
        raise PackageFormatError(f"{where}: tensor {name!r} has a malformed shape {shape!r}")
    return TensorSpec(name, dtype, tuple(None if d == -1 else d for d in shape))


@dataclass
class Snapshot:
    """The coordinator's workers per model: {model: {(role, state): count}}; `error` when its
    /metrics could not be read (then nothing counts as ready)."""

    workers: dict[str, dict[tuple[str, str], int]] = field(default_factory=dict)
    error: str | None = None

    def ready(self, model: str) -> bool:
        counts = self.workers.get(model, {})
        return any(state == "ready" and n > 0 for (_, state), n in counts.items())

    def describe(self, model: str) -> dict[str, dict[str, int]]:
        """{role: {state: count}}, for /v1/models' extension field."""
        out: dict[str, dict[str, int]] = {}
        for (role, state), n in self.workers.get(model, {}).items():
            out.setdefault(role, {})[state] = n
        return out


def parse_metrics(text: str) -> Snapshot:
    snapshot = Snapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cicada_workers" and s.value > 0:
                model, role, state = (s.labels.get(k, "") for k in ("model", "role", "state"))
                snapshot.workers.setdefault(model, {})[(role, state)] = int(s.value)
    return snapshot


class CoordinatorView:
    """The coordinator's /metrics, fetched at most once per `ttl` seconds (concurrent askers
    share one fetch), on a thread so that the event loop never waits on it."""

    def __init__(self, url: str, ttl: float = METRICS_TTL_S) -> None:
        self.url = url
        self.ttl = ttl
        self._snapshot: Snapshot | None = None
        self._at = -float("inf")
        self._lock: asyncio.Lock | None = None

    async def snapshot(self) -> Snapshot:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._at >= self.ttl:
                self._snapshot = await asyncio.to_thread(self._fetch)
                self._at = time.monotonic()
            return self._snapshot

    def _fetch(self) -> Snapshot:
        try:
            with urllib.request.urlopen(self.url, timeout=METRICS_TIMEOUT_S) as response:
                text = response.read(16 << 20).decode("utf-8", "replace")
            return parse_metrics(text)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Snapshot(error=f"cannot read the coordinator's metrics at {self.url}: {exc}")


@dataclass
class Catalog:
    """The models the gateway describes: its `--package` directories and, with a view, what
    the coordinator reports."""

    dirs: dict[str, ModelDir] = field(default_factory=dict)
    view: CoordinatorView | None = None

    @classmethod
    def load(cls, packages: Iterable[tuple[str, Path]], metrics_url: str | None) -> Catalog:
        dirs: dict[str, ModelDir] = {}
        for name, directory in packages:
            if name in dirs:
                raise PackageFormatError(f"model {name!r} is given twice")
            dirs[name] = ModelDir.load(name, directory)
        return cls(dirs, CoordinatorView(metrics_url) if metrics_url else None)

    async def snapshot(self) -> Snapshot | None:
        """The coordinator's view now (None: the gateway was not given its metrics)."""
        return None if self.view is None else await self.view.snapshot()

    async def names(self) -> list[str]:
        snapshot = await self.snapshot()
        seen = set(self.dirs) | (set(snapshot.workers) if snapshot is not None else set())
        return sorted(seen)

    async def known(self, name: str) -> bool:
        return name in await self.names()

    async def ready(self, name: str) -> bool:
        """Some worker of the model is ready (per the metrics); without metrics, a model given
        with --package counts as ready (the gateway cannot tell)."""
        snapshot = await self.snapshot()
        if snapshot is None:
            return name in self.dirs
        return snapshot.ready(name)
