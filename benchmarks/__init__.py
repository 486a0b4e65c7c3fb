"""Cicada's benchmarks, run from the repository root as modules:

    python3 -m benchmarks.cold_start
    python3 -m benchmarks.handoff
    python3 -m benchmarks.lifecycle
    python3 -m benchmarks.generation
    python3 -m benchmarks.pool_preload

They stand on the installed package (`cicada`, `cicada.testing`), never on tests/.
"""
