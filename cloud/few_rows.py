"""fp32 linear layers over a few rows on CPU, on oneDNN's matmul (issue 13).

A speculative verify forward runs every linear layer of the cloud model on γ + 1 rows (2–9).
On the AMD EPYC this project's CI runs on, MKL's sgemm (what `nn.Linear` calls) costs about one
one-row pass per row at 2–3 rows and ~2.5 × a one-row pass at 9 rows, so a verify forward over
9 tokens of GPT-2-medium took ~3 × a one-token step. oneDNN's matmul (the kernel torch's CPU
inductor uses for frozen linears) reads the weights once for all the rows: 24 linears of
1024 × 4096 (400 MB), 2 threads, medians of 5:

    rows      1      2      3      5      9
    MKL      32     68    107     73     82 ms
    oneDNN   19     26     26     32     35 ms

and a whole GPT-2-medium verify forward over 9 tokens now costs ~1.2 × a one-token step (2
threads). Numerics: oneDNN sums in another order than MKL, ~1e-6 apart; a verify forward
already differs from the one-token path by that much, which is what the verifier's margin guard
is for (`cloud/speculative.py`). The one-token reference path stays on `nn.Linear`: oneDNN's
one-row kernel is not faster there at one thread.

Falls back to `nn.Linear` itself where oneDNN is not built in, for non-fp32 tensors and off the
CPU.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn


def onednn_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_linear_pointwise")
    )


class FewRowLinears:
    """`layer(x)` for `nn.Linear` layers, on oneDNN's matmul where it applies."""

    def __init__(self, device: str = "cpu", enabled: bool = True) -> None:
        self.enabled = enabled and torch.device(device).type == "cpu" and onednn_available()

    def __call__(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight, bias = layer.weight, layer.bias
        if not self.enabled or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return cast(torch.Tensor, layer(x))
        # The module is not called, so its forward pre-hooks run here: a loading worker's
        # (cloud/pipeline.py) wait until the layer's weights are resident.
        for hook in list(layer._forward_pre_hooks.values()):
            hook(layer, (x,))
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return cast(torch.Tensor, y)
