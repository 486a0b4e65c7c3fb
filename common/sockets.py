"""Socket set-up every role shares: limits, linger, high-water marks, CURVE keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from cicada.common.errors import CicadaError
from cicada.common.protocol import DEFAULT_LIMITS, Limits

HWM = 1000


@dataclass(frozen=True)
class CurveKeys:
    """A peer's CURVE key pair (z85), plus the coordinator's public key for clients/workers."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None

    @classmethod
    def load(cls, key_file: Path, server_public_file: Path | None = None) -> CurveKeys:
        """Read a key file written by `cicada keys` (and the coordinator's .key public file)."""
        try:
            public, secret = zmq.auth.load_certificate(str(key_file))
            server = (
                zmq.auth.load_certificate(str(server_public_file))[0]
                if server_public_file is not None
                else None
            )
        except (OSError, ValueError) as exc:
            raise CicadaError(f"cannot read CURVE keys from {key_file}: {exc}") from None
        if secret is None:
            raise CicadaError(f"{key_file} holds no secret key: pass the .key_secret file")
        return cls(public, secret, server)


def configure(sock: zmq.Socket[bytes], limits: Limits = DEFAULT_LIMITS) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)


def apply_curve_client(sock: zmq.Socket[bytes], keys: CurveKeys | None) -> None:
    if keys is None:
        return
    if keys.server_public is None:
        raise CicadaError("CURVE keys for a client/worker need the coordinator's public key")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public
