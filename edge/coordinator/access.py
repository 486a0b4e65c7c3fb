"""Who may do what at a CURVE coordinator: public keys bound to roles.

With CURVE on, every message arrives with the public key its connection authenticated with
(ZAP's User-Id, the key's z85 text). The operator binds each key to what it may do:

* a **client** key (`--allow DIR`, config `clients`) may send REQUEST and CANCEL, nothing else;
* a **worker** key (`--worker-keys ROLE:MODEL[,MODEL...]:PATH`, config `[[coordinator.workers]]`)
  may register (READY) as ROLE (`edge` or `cloud`) for those models only, and then send what a
  registered worker sends (HEARTBEAT, RESULT, PARTIAL, DISCONNECT);
* the key launched cloud workers use (config `worker_key`) is bound to `cloud` for the models
  the lifecycle launches it for.

A key may hold several grants (listed as a client and as a worker, or for several models). A
key bound to nothing cannot complete the handshake. Without CURVE there is no key to check:
every peer may do everything, which is why a coordinator without CURVE binds loopback only
unless told `--insecure`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cicada.common.errors import ConfigError
from cicada.common.protocol import Role


@dataclass(frozen=True)
class WorkerKeys:
    """Public keys (a directory of *.key files, or one key file) bound to a role and models."""

    role: Role
    models: tuple[str, ...]
    path: Path

    @classmethod
    def parse(cls, value: str) -> WorkerKeys:
        """`ROLE:MODEL[,MODEL...]:PATH`, e.g. `edge:gpt2:/etc/cicada/curve-edge`."""
        role, sep, rest = value.partition(":")
        models, sep2, path = rest.partition(":")
        if not (sep and sep2 and path):
            raise ConfigError(f"worker keys {value!r}: expected ROLE:MODEL[,MODEL...]:PATH")
        return cls.of(role, models.split(","), Path(path))

    @classmethod
    def of(cls, role: str, models: Iterable[str], path: Path) -> WorkerKeys:
        try:
            bound = Role(role)
        except ValueError:
            raise ConfigError(f"worker keys: role {role!r} is not edge or cloud") from None
        names = tuple(m.strip() for m in models)
        if not names or not all(names):
            raise ConfigError(f"worker keys for {path}: name at least one model, none empty")
        return cls(bound, names, path)


@dataclass
class Grant:
    """What one key may do."""

    client: bool = False
    models: dict[Role, set[str]] = field(default_factory=dict)

    def may_register(self, role: Role, models: Iterable[str]) -> tuple[str, str] | None:
        """None, or (the READY field that oversteps the grant, why)."""
        allowed = self.models.get(role)
        if allowed is None:
            return "role", f"this key may not register as {role.value}"
        for model in models:
            if model not in allowed:
                return "models", f"this key may not serve {model!r} as {role.value}"
        return None


NO_GRANT = Grant()


def read_public_keys(path: Path) -> list[bytes]:
    """The z85 public keys at `path`: every *.key in a directory, or the one key file (a
    .key_secret file gives its public half)."""
    import zmq.auth

    try:
        if path.is_dir():
            return sorted(zmq.auth.load_certificates(str(path)))
        return [zmq.auth.load_certificate(str(path))[0]]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read public keys from {path}: {exc}") from None


class Access:
    """The grants of every known key, by z85 public key text (ZAP's User-Id)."""

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}

    @classmethod
    def load(cls, clients: Path | None, workers: Iterable[WorkerKeys]) -> Access:
        access = cls()
        if clients is not None:
            for key in read_public_keys(clients):
                access._grant(key).client = True
        for bound in workers:
            for key in read_public_keys(bound.path):
                access._grant(key).models.setdefault(bound.role, set()).update(bound.models)
        return access

    def _grant(self, key: bytes) -> Grant:
        return self.grants.setdefault(key.decode("ascii"), Grant())

    def grant(self, user_id: str | None) -> Grant:
        if user_id is None:
            return NO_GRANT
        return self.grants.get(user_id, NO_GRANT)

    def knows(self, z85_key: bytes) -> bool:
        """For the ZAP handler: whether a connecting key may complete the handshake."""
        return z85_key.decode("ascii", "replace") in self.grants

    # zmq.auth's credentials-provider interface (configure_curve_callback).
    def callback(self, domain: str, key: bytes) -> bool:
        return self.knows(key)


def loopback_only(endpoint: str) -> bool:
    """Whether `endpoint` can be reached from this host only: ipc://, inproc://, or tcp:// on a
    loopback address. A wildcard, an interface name or any other address is not."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if ";" in host:  # tcp://source;destination: the bind side is the destination
        host = host.rsplit(";", 1)[1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(access: Access | None) -> str:
    if access is None:
        return "open (no CURVE)"
    clients = sum(1 for g in access.grants.values() if g.client)
    workers = sum(1 for g in access.grants.values() if g.models)
    return f"CURVE: {clients} client key(s), {workers} worker key(s)"
