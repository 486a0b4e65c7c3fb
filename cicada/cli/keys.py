"""`cicada keys`: CURVE key pairs for the coordinator and its peers."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write NAME.key (public) and NAME.key_secret into.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="Key pair name, e.g. coordinator, edge1, client1 (repeatable).",
)
def keys(out_dir: Path, names: tuple[str, ...]) -> None:
    """Make CURVE key pairs. Give the coordinator its .key_secret and a directory holding the
    .key (public) files it should allow; give every peer its own .key_secret and the
    coordinator's .key."""
    import zmq.auth

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        public, secret = zmq.auth.create_certificates(str(out_dir), name)
        Path(secret).chmod(0o600)
        click.echo(f"wrote {public} and {secret}")
