"""`cicada keys`: CURVE key pairs for the coordinator and its peers.

A secret key file is created with O_CREAT|O_EXCL and mode 0600 in the same call, so it never
exists with wider permissions, and never through a file or a symbolic link someone placed at
its name. An existing key is left alone unless --force, which writes a new file beside it
(the same way) and renames it over the old one.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
from pathlib import Path

import click

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644

# The certificate format of pyzmq's zmq.auth (zmq.auth.load_certificate reads it).
PUBLIC_BANNER = """#   ****  Generated on {now} by cicada keys  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""
SECRET_BANNER = """#   ****  Generated on {now} by cicada keys  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""


def certificate(banner: str, public: bytes, secret: bytes | None = None) -> str:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    text = banner.format(now=now) + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text


def write_new(path: Path, text: str, mode: int, force: bool) -> None:
    """Create `path` holding `text` with `mode` from the start (O_EXCL: never an existing file
    or link). With `force`, write a fresh file beside it and rename it over `path`."""
    target = path
    if force:
        path = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only have narrowed it: make it exactly `mode`
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(path, target)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@click.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write NAME.key (public) and NAME.key_secret into (made 0700 if new).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="Key pair name, e.g. coordinator, edge1, client1 (repeatable).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace key files that exist already (by default an existing key is never touched).",
)
def keys(out_dir: Path, names: tuple[str, ...], force: bool) -> None:
    """Make CURVE key pairs. Give the coordinator its .key_secret and a directory holding the
    .key (public) files it should allow; give every peer its own .key_secret and the
    coordinator's .key. Secret files are mode 0600 from the moment they exist."""
    import zmq

    for name in names:
        if not NAME.fullmatch(name) or ".." in name:
            raise click.BadParameter(
                f"{name!r}: letters, digits, '.', '_' and '-' only, starting with a letter or "
                "digit",
                param_hint="--name",
            )
    pairs = [(out_dir / f"{name}.key", out_dir / f"{name}.key_secret") for name in names]
    existing = [str(p) for pair in pairs for p in pair if p.exists() or p.is_symlink()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(existing)} exist(s) already; --force replaces them"
        )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for public_path, secret_path in pairs:
        public, secret = zmq.curve_keypair()
        try:
            write_new(secret_path, certificate(SECRET_BANNER, public, secret), SECRET_MODE, force)
            write_new(public_path, certificate(PUBLIC_BANNER, public), PUBLIC_MODE, force)
        except OSError as exc:
            raise click.ClickException(f"cannot write {exc.filename}: {exc.strerror}") from None
        click.echo(f"wrote {public_path} and {secret_path}")
