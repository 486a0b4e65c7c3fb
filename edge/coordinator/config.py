"""The coordinator's configuration file (TOML), validated with pydantic for clear errors.

    [coordinator]
    bind = "tcp://127.0.0.1:5555"
    metrics = "127.0.0.1:9464"        # or "off"
    heartbeat = 0.5
    launcher = "process"               # process | pool | ray
    log_dir = "/var/log/cicada"        # worker logs (optional)
    ray_address = "10.0.0.5:6379"      # launcher = "ray": the cluster to join (default: local)
    ray_num_gpus = 1                   # per worker actor
    ray_resources = { cloud = 1 }      # custom resources per worker actor
    ray_label_selector = { "cicada-tier" = "cloud" }   # node labels (Ray 2.49+)

    [models.gpt2]                      # the name clients invoke
    package = "/models/gpt2-medium"    # from `cicada pack`
    device = "cpu"
    min_workers = 0                    # 0: scale to zero when idle
    max_workers = 2
    keep_alive_s = 30.0                # idle time before a worker drains and stops
    keep_warm = "lazy"                 # fixed | lazy (see edge/coordinator/lifecycle.py)
    lazy_threshold = 1                 # lazy: change the warm count only by this much or more
    start_timeout_s = 120.0            # a worker that has not registered by then is killed
    expected_start_s = 3.0             # cold-start estimate until one is measured
    trust_package_code = false         # true: run the package's factory even if it is not
                                       # one of Cicada's own (docs/PACKAGE.md, threat model)

Relative paths are taken relative to the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cicada.common.defaults import (
    DEFAULT_ADDRESS,
    DEFAULT_METRICS,
    HEARTBEAT_INTERVAL_S,
    QUEUE_LIMIT,
)
from cicada.common.errors import ConfigError


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: Path
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1)
    # Run the package's factory even if it is not one of Cicada's own (docs/PACKAGE.md).
    trust_package_code: bool = False
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=1, ge=1)
    keep_alive_s: float = Field(default=30.0, gt=0)
    keep_warm: Literal["fixed", "lazy"] = "fixed"
    lazy_threshold: int = Field(default=1, ge=1)
    start_timeout_s: float = Field(default=120.0, gt=0)
    expected_start_s: float = Field(default=3.0, gt=0)
    relaunch_backoff_s: float = Field(default=1.0, gt=0)
    relaunch_backoff_max_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ModelConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) > max_workers ({self.max_workers})")
        return self


class CoordinatorSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bind: str = DEFAULT_ADDRESS
    metrics: str = DEFAULT_METRICS
    heartbeat: float = Field(default=HEARTBEAT_INTERVAL_S, gt=0)
    queue_limit: int = Field(default=QUEUE_LIMIT, ge=1)
    launcher: Literal["process", "pool", "ray"] = "process"
    pool_socket: Path | None = None
    log_dir: Path | None = None
    ray_address: str | None = None
    ray_num_gpus: float = Field(default=0, ge=0)
    ray_resources: dict[str, float] = Field(default_factory=dict)
    ray_label_selector: dict[str, str] = Field(default_factory=dict)
    curve_secret: Path | None = None
    allow: Path | None = None


class CicadaConfig(BaseModel):
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
    for attr in ("pool_socket", "log_dir", "curve_secret", "allow"):
        value = getattr(section, attr)
        if value is not None and not value.is_absolute():
            setattr(section, attr, base / value)
    return config
