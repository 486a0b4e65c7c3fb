"""`cicada demo`: a coordinator, an edge agent and a cold cloud worker, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from cicada.cli._common import fail
from cicada.common.errors import CicadaError


@click.command()
@click.option(
    "--model",
    default="gpt2-medium",
    show_default=True,
    help="gpt2-medium (1.4 GB), gpt2-tiny, or minilm: the pretrained all-MiniLM-L6-v2 pair "
    "(fp32 in the cloud, int8 ONNX on the edge) embedding real sentences sent as text.",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Where packages and edge models are kept (default: ~/.cache/cicada, or $CICADA_CACHE).",
)
@click.option(
    "--requests",
    "count",
    type=click.IntRange(min=1),
    default=None,
    help="Requests in the burst [default: 60; minilm: 36].",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Mean arrival rate of the burst (requests/s, Poisson) [default: 12; minilm: 4]. Once "
    "the cloud is ready, quality-seeking requests go one at a time, at the pace its measured "
    "forward allows (one CPU worker runs one forward at a time).",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    metavar="SENTENCE",
    help="minilm: a sentence to embed besides the built-in dozen (repeatable).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable summary: per request id, priority, served_by, latency, "
    "status (minilm: and the edge-cloud cosine similarity of its sentence), the share after "
    "ready, the residency reports seen, the setup times and the cache.",
)
def demo(
    model: str,
    cache: Path | None,
    count: int | None,
    rate: float | None,
    texts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Coordinator + edge agent + a cold cloud worker, and a burst of mixed-priority requests.

    Packs the model and exports its int8 edge model once (cached), then starts the three roles
    as local processes and shows live the cloud worker's start-up (phase, weights read, stages
    resident, ETA) and where each request goes. The summary states how many of the
    quality-seeking requests sent after the cloud was ready it served, and where the cache is.
    With --model minilm the requests are sentences, and the report shows, next to each
    latency, the cosine similarity between the edge's and the cloud's embedding."""
    from cicada.demos.live import run_live_demo

    try:
        run_live_demo(model, cache, as_json, count, rate, texts)
    except CicadaError as exc:
        fail(exc)
