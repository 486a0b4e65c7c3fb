"""A package's tokenizer.json, for the OpenAI endpoints: text prompts become token ids and
generated ids become text in the gateway, with the same file the model's workers read.

The file is data: read confined to the model directory and bounded in size (files.py),
parsed by the `tokenizers` library (Rust, no code from the file runs). `tokenizers` is
imported only when a model carries a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cicada.common.errors import PackageFormatError
from cicada.common.text import INSTALL_HINT, MAX_TOKENIZER_BYTES, TOKENIZER_NAME
from cicada.gateway.files import read_model_file


class Tokenizer:
    """Encode one prompt (as the file says: special tokens included, no padding or truncation:
    a prompt too long for the model is the worker's to refuse, not ours to cut) and decode
    generated ids (special tokens skipped)."""

    def __init__(self, tokenizer: Any, path: Path) -> None:
        self._tokenizer = tokenizer
        self.path = path

    @classmethod
    def load(cls, model_dir: Path) -> Tokenizer | None:
        """The tokenizer in `model_dir`, or None when it has none. PackageFormatError when
        the file is there but unusable."""
        path = model_dir / TOKENIZER_NAME
        raw = read_model_file(model_dir, TOKENIZER_NAME, MAX_TOKENIZER_BYTES)
        if raw is None:
            return None
        try:
            import tokenizers
        except ImportError as exc:
            raise PackageFormatError(f"{path} needs tokenizers: {INSTALL_HINT}") from exc
        try:
            tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise PackageFormatError(f"{path} is not a readable tokenizer.json: {exc}") from None
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, path)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def count(self, texts: Sequence[str]) -> int:
        """Tokens in all of `texts` (the `usage` of an embeddings call)."""
        return sum(len(e.ids) for e in self._tokenizer.encode_batch(list(texts)))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))
