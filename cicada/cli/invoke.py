"""`cicada invoke`: one call through the coordinator (the client SDK, cicada/client.py)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from cicada.cli._common import coordinator_option, curve_options
from cicada.common.defaults import (
    DEFAULT_TIMEOUT_S,
    MAX_NEW_TOKENS,
    NORMAL,
    PRIORITIES,
)


@click.command()
@click.argument("model")
@click.option(
    "--input",
    "input_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An input tensor (.npy); repeat it for a model with several inputs, in order. For "
    "--max-new-tokens: the prompt's int64 token ids.",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    help="Text instead of --input, for a model packaged with a tokenizer; repeat for a batch.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, MAX_NEW_TOKENS),
    default=None,
    help="Generate this many tokens greedily from the prompt in --input, printing each as it "
    "arrives with the side (edge/cloud) that made it.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="With --max-new-tokens: the cloud model's own greedy decode. The edge's tokens print "
    "as provisional while the cloud is cold; at the takeover a rewind line says how many "
    "stand, and the cloud's tokens follow.",
)
@click.option(
    "--priority",
    type=click.IntRange(min(PRIORITIES), max(PRIORITIES)),
    default=NORMAL,
    show_default=True,
    help="0 latency-critical, 1 normal, 2 quality-seeking.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds the result stays useful; the coordinator answers TIMEOUT rather than late.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the reply at most.",
)
@coordinator_option
@curve_options
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the output here (.npy); further outputs go to OUT_1.npy, OUT_2.npy, ...",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
def invoke(
    model: str,
    input_paths: tuple[Path, ...],
    texts: tuple[str, ...],
    max_new_tokens: int | None,
    exact: bool,
    priority: int,
    deadline: float | None,
    timeout: float,
    address: str,
    curve_key: Path | None,
    server_key: Path | None,
    out_path: Path | None,
    as_json: bool,
) -> None:
    """Call MODEL once through the coordinator; print who served it and the timings.

    Exit status: 0 OK, 1 the call failed (TIMEOUT, REJECTED, UNAVAILABLE, BAD_REQUEST,
    FAILED; no coordinator answering at the endpoint, which is found out in a few seconds,
    not after --timeout; the CURVE key refused; the message says which and what to do),
    2 usage error.
    """
    import numpy as np

    from cicada.client import Client
    from cicada.errors import CallError

    inputs = []
    for path in input_paths:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"--input {path} is not a readable .npy file: {exc}") from None
        if not isinstance(array, np.ndarray):
            raise click.UsageError(f"--input {path} holds several arrays; save each as .npy")
        inputs.append(array)
    if not inputs and not texts:
        raise click.UsageError("give the model's inputs with --input FILE.npy, or --text")
    try:
        client = Client(address, timeout=timeout, curve=_curve(curve_key, server_key))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        with client:
            stream = client.stream(
                model, inputs or None, text=list(texts) or None, max_new_tokens=max_new_tokens,
                priority=priority, deadline=deadline, exact=exact,
            )  # fmt: skip
            role: str | None = None
            for piece in stream:
                if as_json:
                    continue
                if piece.rewind is not None:  # an exact takeover: say what stands
                    click.echo(("\n" if role else "") + f"rewind: the first {piece.rewind} "
                               "stand; later tokens are replaced", nl=False)  # fmt: skip
                    role = "rewind"
                    continue
                side = piece.role + (" (provisional)" if piece.provisional else "")
                if side != role:  # a new line whenever the side changes
                    click.echo(("\n" if role else "") + f"{side}:", nl=False)
                    role = side
                click.echo(" " + " ".join(str(int(t)) for t in piece.tokens), nl=False)
            if role is not None:
                click.echo()
            assert stream.result is not None
            result = stream.result
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except CallError as exc:
        if as_json:
            status = exc.status.value if exc.status is not None else None
            failure = {"status": status, "error": str(exc), "request_id": exc.request_id,
                       "served_by": exc.served_by, "side": getattr(exc, "side", None),
                       "retry_after": getattr(exc, "retry_after", None)}  # fmt: skip
            click.echo(json.dumps(failure))
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    written: list[Path | None] = []
    for i, array in enumerate(result.outputs):
        if out_path is None:
            written.append(None)
            continue
        path = out_path if i == 0 else out_path.with_name(f"{out_path.stem}_{i}.npy")
        with path.open("wb") as f:  # exactly the path asked for (np.save would add .npy)
            np.save(f, array, allow_pickle=False)
        written.append(path)
    if as_json:
        click.echo(json.dumps({
            "status": result.status.value, "request_id": result.request_id,
            "served_by": result.served_by, "timings": result.timings,
            "generation": None if result.generation is None
            else dataclasses.asdict(result.generation),
            "outputs": [{"dtype": a.dtype.name, "shape": list(a.shape),
                         "path": None if p is None else str(p)}
                        for a, p in zip(result.outputs, written, strict=True)],
        }))  # fmt: skip
        return
    who = result.served_by
    click.echo(
        f"{result.status.value}: served by {who.get('role', '?')} worker {who.get('worker', '?')}"
        f" (variant {who.get('variant') or '?'}), request {result.request_id}"
    )
    click.echo("timings: " + format_timings(result.timings))
    info = result.generation
    if info is not None:
        verdict = "yes" if info.exact else "no (the edge finished before a cloud took over)"
        click.echo(f"exact: {verdict}; {info.kept} edge tokens kept, {info.rewound} rewound")
    for i, (array, saved) in enumerate(zip(result.outputs, written, strict=True)):
        where = "" if saved is None else f" -> {saved}"
        click.echo(f"output {i}: {array.dtype.name} {list(array.shape)}{where}")


def format_timings(timings: dict[str, float]) -> str:
    """The reply's timings in words: durations (names ending _s) in seconds, token counts as
    counts, flags as yes/no (docs/PROTOCOL.md section 4: a worker's own are prefixed worker_)."""
    shown = []
    for name, value in timings.items():
        if name.endswith("_s"):
            shown.append(f"{name.removesuffix('_s')} {value:.4f} s")
        elif name.endswith("tokens"):
            shown.append(f"{name} {int(value)}")
        elif name.endswith("during_load"):
            shown.append(f"{name} {'yes' if value else 'no'}")
        else:
            shown.append(f"{name} {value:g}")
    return ", ".join(shown)


def _curve(key: Path | None, server_key: Path | None) -> Any:
    """The SDK's CurveConfig from `cicada keys` files (--curve-key, --server-key), or None."""
    from cicada.cli._common import curve_keys
    from cicada.client import CurveConfig

    keys = curve_keys(key, server_key)
    if keys is None:
        return None
    return CurveConfig(keys.server_public, keys.public, keys.secret)
