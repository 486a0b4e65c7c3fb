"""The coordinator's configuration file (TOML), validated with pydantic for clear errors.

Every field, shown at its default (a line starting `#` is an example for a field whose
default is none or empty). docs/config.md is the reference, generated from these models
(`python3 -m cicada.edge.coordinator.config_docs`); tests/edge/test_config_docs.py checks that
both stay in step with them.

    [coordinator]
    bind = "tcp://127.0.0.1:5555"      # or HOST:PORT (the same), ipc://PATH
    metrics = "127.0.0.1:9464"         # or "off"
    heartbeat = 0.5
    queue_limit = 1024                 # requests queued per model and priority
    launcher = "process"               # process | pool | ray
    # pool_socket = "/run/cicada/pool.sock"   # launcher = "pool" (default: a temporary one)
    # log_dir = "/var/log/cicada"      # worker logs (default: none)
    # ray_address = "10.0.0.5:6379"    # launcher = "ray": the cluster to join (default: local)
    ray_num_gpus = 0                   # per worker actor
    # ray_resources = { cloud = 1 }    # custom resources per worker actor
    # ray_label_selector = { "cicada-tier" = "cloud" }   # node labels (Ray 2.49+)
    # Fair and bounded (docs/PROTOCOL.md section 13): nobody takes the coordinator down alone.
    # client_queue_limit = 512         # of each queue, per client (default: queue_limit / 2)
    max_queued_bytes = "1GiB"          # request tensor bytes held (queued or running), in all
    max_client_queued_bytes = "256MiB" # ... and for one client; beyond either: REJECTED
    default_deadline_s = 60.0          # the deadline of a request without timeout_ms; 0: none
    allow_critical = true              # any client may use priority 0; false: only ...
    # critical_clients = ["<Z85 public key>"]   # ... these CURVE keys (BAD_REQUEST else)
    insecure = false                   # true: allow a non-loopback bind without CURVE

    # CURVE (docs/PROTOCOL.md section 10): every key is bound to what it may do.
    # curve_secret = "keys/coordinator.key_secret"
    # clients = "keys/clients"         # client public keys (*.key): REQUEST and CANCEL only
    # worker_key = "keys/cloud.key_secret"   # the key pair launched cloud workers use
    # server_key = "keys/coordinator.key"    # given to them (default: beside curve_secret)

    # [[coordinator.workers]]          # worker public keys, bound to a role and models
    # role = "edge"
    # models = ["gpt2"]
    # keys = "keys/edge"               # a directory of *.key files, or one key file

    [models.gpt2]                      # the name clients invoke
    package = "/models/gpt2-medium"    # required: from `cicada pack`
    device = "cpu"
    # threads = 2                      # torch intra-op threads (default: torch's own)
    row_invariant = "auto"             # auto | always | never: CPU decode and draft checks on
                                       # row-invariant linears (cloud/few_rows.py)
    trust_package_code = false         # true: run the package's factory even if it is not
                                       # one of Cicada's own (docs/PACKAGE.md, threat model)
    min_workers = 0                    # 0: scale to zero when idle
    max_workers = 1
    keep_alive_s = 30.0                # idle time after the last request before it stops
    keep_warm = "fixed"                # fixed | lazy (see edge/coordinator/lifecycle.py)
    lazy_threshold = 1                 # lazy: change the warm count only by this much or more
    start_timeout_s = 120.0            # a worker that has not registered by then is killed
    stop_timeout_s = 60.0              # a draining worker that has not exited by then is killed
    expected_start_s = 3.0             # cold-start estimate until one is measured
    relaunch_backoff_s = 1.0           # after a crash; doubles each time ...
    relaunch_backoff_max_s = 30.0      # ... up to this
    # max_batch_size = 8               # dynamic batching (default: the package's, else 1)
    # max_queue_delay_ms = 5.0         # a batch's first request waits this long for more
    # preferred_batch_sizes = [4, 8]   # sizes that go at once

Relative paths are taken relative to the file. Byte sizes are integers (bytes) or strings
with a unit: "512KiB", "256MiB", "1GiB" (also KB, MB, GB: powers of 1000).

`allow_critical = false` without CURVE keys (`curve_secret`) leaves priority 0 to nobody:
clients are told apart only by the key the coordinator's ZAP handler accepted for them. A
client's key is the `public-key` of its `.key` file (`cicada keys`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cicada.common.defaults import (
    DEFAULT_ADDRESS,
    DEFAULT_DEADLINE_S,
    DEFAULT_METRICS,
    HEARTBEAT_INTERVAL_S,
    MAX_CLIENT_QUEUED_BYTES,
    MAX_QUEUED_BYTES,
    QUEUE_LIMIT,
)
from cicada.common.endpoints import http_listener, zmq_endpoint
from cicada.common.errors import ConfigError
from cicada.common.protocol import MAX_MODELS_PER_WORKER

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip


def parse_bytes(value: Any) -> Any:
    """ "256MiB" -> 268435456; integers pass through (pydantic checks the rest)."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f'{value!r} is not a size (e.g. 1048576, "256MiB", "1GiB")')
    return int(float(match.group(1)) * _UNITS[unit])


Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=1)]


def _doc(text: str) -> Any:
    return Field(description=text)


class ModelConfig(BaseModel):
    """`[models.NAME]`: a cloud model the coordinator launches on demand (NAME is what
    clients invoke)."""

    model_config = ConfigDict(extra="forbid")

    package: Path = Field(description="The model package (`cicada pack`); required.")
    device: str = Field(default="cpu", description="Where workers run it: cpu, cuda or cuda:N.")
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per worker (none: torch's own)."
    )
    row_invariant: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="CPU: decode and verify drafts on linears that give each row the same "
        "bits whatever the row count (cloud/few_rows.py): auto from 2 threads on; always also "
        "on one (exact generations with edge drafts gain more than decoding alone loses).",
    )
    trust_package_code: bool = Field(
        default=False,
        description="Run the package's factory even if it is not one of Cicada's own "
        "(docs/PACKAGE.md, threat model).",
    )
    min_workers: int = Field(
        default=0, ge=0, description="Workers kept up without demand; 0 scales to zero."
    )
    max_workers: int = Field(default=1, ge=1, description="Workers launched at most.")
    keep_alive_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a worker stays up after its last request (of any priority) "
        "before it drains and stops.",
    )
    keep_warm: Literal["fixed", "lazy"] = Field(
        default="fixed",
        description="fixed: keep-alive alone decides; lazy: also keep the demand's warm "
        "target (request rate x compute time) up (edge/coordinator/lifecycle.py).",
    )
    lazy_threshold: int = Field(
        default=1, ge=1, description="lazy: move the warm target only by this much or more."
    )
    start_timeout_s: float = Field(
        default=120.0, gt=0, description="A worker not registered by then is killed."
    )
    stop_timeout_s: float = Field(
        default=60.0, gt=0, description="A worker asked to drain that has not exited by then "
        "is killed.",
    )
    expected_start_s: float = Field(
        default=3.0, gt=0, description="The cold-start estimate until one is measured."
    )
    relaunch_backoff_s: float = Field(
        default=1.0, gt=0, description="Wait before relaunching a crashed worker; doubles."
    )
    relaunch_backoff_max_s: float = Field(
        default=30.0, gt=0, description="... up to this many seconds."
    )

    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Dynamic batching (Triton's setting): a worker runs up to this many "
        "compatible dispatches (same dtypes, same trailing dimensions) as one forward, and "
        "advertises it as its capacity; 1 runs one at a time. Generations on Cicada's "
        "reference GPT-2 are batched continuously: up to this many streams decode together, "
        "joining and leaving at every step (`cloud/continuous.py`; while none decode, the "
        "first waits up to `max_queue_delay_ms` for others to start with it, as a forward "
        "does); on a CPU with MKL, the first step of two or more streams packs the model's "
        "linear weights for MKL's packed GEMM: one more copy of them in memory (~1.4 GB for "
        "GPT-2-medium), for ~2 x the decode throughput at 8 streams; other generations run "
        "one at a time. None (this and the two below): the package's default (`cicada pack "
        "--max-batch-size`), else 1.",
    )
    max_queue_delay_ms: float | None = Field(
        default=None,
        ge=0,
        le=60_000,
        description="How long the first dispatch of a batch may wait for others to join "
        "(never past its own deadline); else the package's, else 0.",
    )
    preferred_batch_sizes: list[int] | None = Field(
        default=None,
        max_length=1024,
        description="Batch sizes that go at once, without waiting out max_queue_delay_ms; "
        "else the package's, else none.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ModelConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > max_workers ({self.max_workers})")
        for size in self.preferred_batch_sizes or ():
            if not 1 <= size <= (self.max_batch_size or 1024):
                raise ValueError(
                    f"preferred_batch_sizes: {size} is not in [1, max_batch_size "
                    f"({self.max_batch_size})]"
                )
        return self


class WorkerKeysConfig(BaseModel):
    """`[[coordinator.workers]]`: public keys that may register as `role` for `models` (and
    nothing else)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["edge", "cloud"] = Field(description="edge or cloud; required.")
    models: list[str] = Field(
        min_length=1,
        max_length=MAX_MODELS_PER_WORKER,
        description="The models these keys may register for; required.",
    )
    keys: Path = Field(description="A directory of *.key files, or one key file; required.")


class CoordinatorSection(BaseModel):
    """`[coordinator]`: where it listens, its bounds, its launcher, its keys."""

    model_config = ConfigDict(extra="forbid")

    bind: str = Field(
        default=DEFAULT_ADDRESS,
        description="ROUTER endpoint: tcp://HOST:PORT (HOST:PORT means the same), ipc://PATH.",
    )
    metrics: str = Field(
        default=DEFAULT_METRICS,
        description='Prometheus /metrics listener, HOST:PORT (or an http:// URL); "off".',
    )
    heartbeat: float = Field(
        default=HEARTBEAT_INTERVAL_S, gt=0, description="Heartbeat interval, seconds."
    )
    queue_limit: int = Field(
        default=QUEUE_LIMIT, ge=1, description="Requests queued per model and priority."
    )
    launcher: Literal["process", "pool", "ray"] = Field(
        default="process", description="How cloud workers start: process, pool or ray."
    )
    pool_socket: Path | None = Field(
        default=None, description="launcher = pool: its Unix socket (none: a temporary one)."
    )
    log_dir: Path | None = Field(
        default=None, description="Folder for launched workers' logs (none: no logs)."
    )
    ray_address: str | None = Field(
        default=None, description='launcher = ray: the cluster to join, e.g. "10.0.0.5:6379".'
    )
    ray_num_gpus: float = Field(default=0, ge=0, description="launcher = ray: GPUs per worker.")
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="launcher = ray: custom resources per worker."
    )
    ray_label_selector: dict[str, str] = Field(
        default_factory=dict, description="launcher = ray: node labels to place on (Ray 2.49+)."
    )
    curve_secret: Path | None = Field(
        default=None, description="The coordinator's secret key file: turns CURVE on."
    )
    clients: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("clients", "allow"),
        description="Client public keys (*.key): REQUEST and CANCEL only. Older name: allow.",
    )
    workers: list[WorkerKeysConfig] = Field(
        default_factory=list, description="Worker keys, bound to a role and models (below)."
    )
    worker_key: Path | None = Field(
        default=None,
        description="The key pair launched cloud workers use (bound to cloud for the "
        "configured models); needed with CURVE and [models].",
    )
    server_key: Path | None = Field(
        default=None,
        description="The coordinator's public key given to launched workers (none: the .key "
        "beside curve_secret).",
    )
    insecure: bool = Field(default=False, description="Allow a non-loopback bind without CURVE.")
    client_queue_limit: int | None = Field(
        default=None, ge=1, description="Of each queue, per client (none: queue_limit / 2)."
    )
    max_queued_bytes: Bytes = Field(
        default=MAX_QUEUED_BYTES,
        description='Request tensor bytes held, in all (an integer, or "1GiB", "256MiB").',
    )
    max_client_queued_bytes: Bytes = Field(
        default=MAX_CLIENT_QUEUED_BYTES, description="... and for one client."
    )
    default_deadline_s: float = Field(
        default=DEFAULT_DEADLINE_S,
        ge=0,
        description="The deadline of a request without one; 0: none (not recommended).",
    )
    allow_critical: bool = Field(
        default=True, description="Any client may send priority 0; false: only critical_clients."
    )
    critical_clients: list[str] = Field(
        default_factory=list,
        description="CURVE public keys (Z85) allowed priority 0 when allow_critical = false.",
    )

    @field_validator("bind")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return zmq_endpoint(value)  # an EndpointError is a ValueError: named as the field's

    @field_validator("metrics")
    @classmethod
    def _listener(cls, value: str) -> str:
        if value == "off":
            return value
        host, port = http_listener(value)
        return f"{host}:{port}"

    @field_validator("critical_clients")
    @classmethod
    def _z85_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) != 40:
                raise ValueError(
                    f"{key!r} is not a CURVE public key (40 Z85 characters, the public-key "
                    "of a .key file)"
                )
        return keys


class CicadaConfig(BaseModel):
    """A whole cicada.toml."""

    model_config = ConfigDict(extra="forbid")

    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    models: dict[str, ModelConfig] = Field(default_factory=dict)


def load_config(path: Path) -> CicadaConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:  # a directory, no permission, ...
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        config = CicadaConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    base = Path(path).resolve().parent
    for model in config.models.values():
        if not model.package.is_absolute():
            model.package = base / model.package
        if not (model.package / "manifest.json").exists():
            raise ConfigError(
                f"{path}: package {model.package} has no manifest.json; make it with cicada pack"
            )
    section = config.coordinator
    for attr in ("pool_socket", "log_dir", "curve_secret", "clients", "worker_key", "server_key"):
        value = getattr(section, attr)
        if value is not None and not value.is_absolute():
            setattr(section, attr, base / value)
    for bound in section.workers:
        if not bound.keys.is_absolute():
            bound.keys = base / bound.keys
    return config
