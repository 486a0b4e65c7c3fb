"""What a model takes, checked before it runs: one check for edge agents and cloud workers.

An edge model knows its inputs from its ONNX graph (name, dtype, rank, fixed axes); a cloud
package knows, for a model of token ids, its context length and vocabulary from its config
(`cicada.common.generation.limits_of`). A worker checks a request's inputs against these
before the forward, so that inputs the model cannot take are the caller's BAD_REQUEST with a
message naming the limit, on either side, and never reach the model (where they would end
as an assertion or an index error deep inside it). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cicada.common.errors import InputError

TOKEN_INPUT = "input"  # the name a token model's one input goes by (as in its ONNX export)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` has None where the axis is dynamic (batch, sequence)."""

    name: str
    dtype: str  # numpy name, e.g. "int64", "float32"
    shape: tuple[int | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict[str, Any]:
        """The edge_model.json form: -1 marks a dynamic axis."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [-1 if d is None else d for d in self.shape],
        }

    def check(self, array: object) -> None:
        """dtype, rank and fixed axes must match exactly (no silent casting: an int32 token
        array is an error, not a copy)."""
        if not isinstance(array, np.ndarray):
            raise InputError(
                f"input {self.name!r}: expected a numpy array, got {type(array).__name__}"
            )
        shape = tuple("?" if d is None else d for d in self.shape)
        if array.dtype != np.dtype(self.dtype):
            raise InputError(f"input {self.name!r}: expected dtype {self.dtype}, got {array.dtype}")
        if array.ndim != self.rank:
            raise InputError(
                f"input {self.name!r}: expected rank {self.rank} {shape}, "
                f"got rank {array.ndim} {array.shape}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, array.shape, strict=True)):
            if want is not None and want != got:
                raise InputError(
                    f"input {self.name!r}: expected shape {shape}, got {array.shape} (axis {axis})"
                )


@dataclass(frozen=True)
class InputLimits:
    """What a model takes. `specs`: its inputs in order (empty: not known, nothing is checked
    but the token limits). `context` and `vocab`: for a model of token ids, the longest
    sequence (the last axis) and the number of ids; None where the model does not say."""

    specs: tuple[TensorSpec, ...] = ()
    context: int | None = None
    vocab: int | None = None

    @classmethod
    def for_tokens(cls, context: int | None, vocab: int | None) -> InputLimits:
        """A model whose config names a context or vocabulary takes one input: int64 token
        ids of shape (batch, sequence). Otherwise nothing is known."""
        if context is None and vocab is None:
            return cls()
        return cls((TensorSpec(TOKEN_INPUT, "int64", (None, None)),), context, vocab)

    def check(self, inputs: Sequence[object]) -> None:
        """Raise InputError, naming the limit, for inputs the model cannot take."""
        if self.specs:
            if len(inputs) != len(self.specs):
                raise InputError(
                    f"the model takes {len(self.specs)} input(s) "
                    f"({', '.join(s.name for s in self.specs)}), got {len(inputs)}"
                )
            for spec, array in zip(self.specs, inputs, strict=True):
                spec.check(array)
        if self.context is None and self.vocab is None:
            return
        names = [s.name for s in self.specs] or [TOKEN_INPUT] * len(inputs)
        for name, array in zip(names, inputs, strict=True):
            if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.integer):
                self._check_tokens(name, array)

    def _check_tokens(self, name: str, ids: np.ndarray) -> None:
        length = ids.shape[-1] if ids.ndim else 1
        if self.context is not None and length > self.context:
            raise InputError(
                f"input {name!r}: sequence length {length} exceeds the model's context of "
                f"{self.context} tokens"
            )
        if self.vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise InputError(f"input {name!r}: token ids must lie in 0..{self.vocab - 1}")
