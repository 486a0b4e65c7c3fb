"""A model that fails on purpose, for the worker-error tests: a tiny GPT-2 that raises when the
first token of a request is a marker. Importable as ``tests.security.faulty_model:build`` by a
cloud worker started from the repository root (as cicada.testing.Stack starts them).

Seeded as `cicada.cloud.models.gpt2.build` is, so the same config gives the same weights: on
any other input it answers exactly what the plain GPT-2 answers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from cicada.cloud.models.gpt2 import GPT, GPTConfig

# A path, set in a worker's environment: its build waits until that file exists (a path never
# created: a load that stalls, which only a signal can end). A test holds the worker in its
# cold start for as long as it needs, however fast or slow the machine.
GATE_ENV = "CICADA_TEST_BUILD_GATE"
RAISE = 95  # first token: an AssertionError inside the model (the request ends FAILED)
EXIT = 96  # first token: SystemExit, which no request handler may swallow (the loop dies)


class FaultyGPT(GPT):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        first = int(idx[0, 0])
        if first == RAISE:
            raise AssertionError(f"marker token {RAISE}: this model fails on purpose")
        if first == EXIT:
            raise SystemExit(f"marker token {EXIT}: this model exits on purpose")
        return super().forward(idx)


def build(**config: Any) -> FaultyGPT:
    gate = os.environ.get(GATE_ENV)
    while gate and not os.path.exists(gate):
        time.sleep(0.02)
    cfg = GPTConfig(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FaultyGPT(cfg)
    return model.eval()
