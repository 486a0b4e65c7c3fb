"""The `cicada` command line: one click group, one module per command family.

    pack.py     cicada pack             run.py      cicada run
    export.py   cicada export-edge      invoke.py   cicada invoke
    serve.py    cicada coordinator | edge | cloud | pool
    status.py   cicada status           keys.py     cicada keys
    demo.py     cicada demo             bench.py    cicada coldstart
    gateway.py  cicada gateway

Each subcommand imports its role lazily: `cicada run` must reach the weight reader before
`import torch`, and edge-side commands must never import torch (`import cicada.cli` is
torch-free; tests/test_lint.py checks it).
"""

from __future__ import annotations

import click

from cicada.cli import bench, demo, export, gateway, invoke, keys, pack, run, serve, status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cicada")
def main() -> None:
    """Cicada: edge-cloud cooperative inference that hides serverless cold starts.

    \b
    Typical flow:
      cicada pack --model gpt2-tiny --out pkg/gpt2      # a small model package (see pack -h)
      cicada pack --verify pkg/gpt2                     # check it end to end
      cicada run pkg/gpt2 --input x.npy --out y.npy     # one timed cold start
      cicada demo                                       # see it all at once

    \b
    Endpoints: tcp://HOST:PORT (HOST:PORT means the same) or ipc://PATH, given to
    --bind (coordinator) and --coordinator (every command that connects); HTTP
    listeners (--metrics) as HOST:PORT. A value that cannot be used, or a port that
    is taken, is one line on stderr and a non-zero exit status.
    """


for _command in (
    pack.pack,
    run.run,
    demo.demo,
    bench.coldstart,
    invoke.invoke,
    export.export_edge_cmd,
    serve.coordinator,
    serve.edge,
    serve.cloud,
    serve.pool,
    status.status,
    keys.keys,
    gateway.gateway,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
