"""Text in, token ids out: the tokenizer that travels with a model. Torch-free.

A model that takes token ids can carry its tokenizer: `tokenizer.json` (the Hugging Face
`tokenizers` format) beside the weights in its package, and beside the ONNX files in its edge
model directory. A client then sends text instead of tensors: a REQUEST whose
`options["text"]` is a list of strings (`Client.invoke(model, text=[...])`). The worker that
gets it tokenizes with the file in its own model directory, so the edge and the cloud turn the
same sentence into the same ids, and runs the model on one int64 array `input_ids` of shape
(batch, seq): padded with the tokenizer's pad id (0 for BERT vocabularies, which the model
reads as "no token") and truncated to the file's `truncation.max_length`.

`tokenizers` is imported only when a tokenizer is loaded: workers of tensor models never need
it, and it never imports torch (the edge agent must not).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cicada.common.errors import TextError
from cicada.common.package import read_package_file

TOKENIZER_NAME = "tokenizer.json"
TEXT_OPTION = "text"  # REQUEST/DISPATCH options key: a list of str
MAX_TEXTS = 1024  # per request: a batch larger than this is a mistake, not a workload
INSTALL_HINT = "pip install tokenizers (or: pip install 'cicada[minilm]')"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise TextError(
            f"tokenizing text needs the tokenizers package ({exc}): {INSTALL_HINT}"
        ) from exc
    return tokenizers


def configured_json(source: Path, max_length: int, pad_id: int = 0) -> str:
    """`source` (a tokenizer.json) with truncation to `max_length` and padding to the longest
    sequence of a batch with `pad_id`, as JSON text: what a package or edge directory holds, so
    that the file alone decides how text becomes ids."""
    tok = _parse(_import_tokenizers(), Path(source))
    pad_token = tok.id_to_token(pad_id)
    if pad_token is None:
        raise TextError(f"{source}: pad id {pad_id} is not in the vocabulary")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # length None: the batch's longest
    return str(tok.to_str())


MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # BERT's is 0.7 MB, Llama 3's 9 MB


def read_tokenizer_json(path: Path) -> str:
    """The text of a model directory's tokenizer.json, read as a package file is: confined to
    its directory (no link out), a regular file (no FIFO to hang on), size-capped before it is
    read."""
    path = Path(path)
    try:
        data = read_package_file(path.parent, path.name, MAX_TOKENIZER_BYTES, TextError)
    except FileNotFoundError:
        raise TextError(f"{path}: no such file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"{path} is not UTF-8 text: {exc}") from None


def _parse(tokenizers: Any, path: Path) -> Any:
    try:
        return tokenizers.Tokenizer.from_str(read_tokenizer_json(path))
    except TextError:
        raise
    except Exception as exc:  # tokenizers raises its own Exception type
        raise TextError(f"{path} is not a readable tokenizer.json: {exc}") from exc


class TextTokenizer:
    """One tokenizer.json, loaded on first use (thread-safe: workers encode on executor
    threads)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self) -> TextTokenizer:
        """Parse the file now (~25 ms for BERT's): for a worker that would rather fail at start
        than on the first request."""
        with self._lock:
            if self._tokenizer is None:
                tok = _parse(_import_tokenizers(), self.path)
                # Pad to the batch's longest (a file may say a fixed length): one batch needs
                # one length, and the pad id (0 where unsaid) is what models read as no token.
                padding = tok.padding or {}
                tok.enable_padding(pad_id=padding.get("pad_id", 0),
                                   pad_token=padding.get("pad_token", "[PAD]"))  # fmt: skip
                self._tokenizer = tok
        return self

    @property
    def max_length(self) -> int | None:
        truncation = self.load()._tokenizer.truncation
        return None if truncation is None else int(truncation["max_length"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids, int64 of shape (len(texts), longest sequence), padded and truncated."""
        tok = self.load()._tokenizer
        encodings = tok.encode_batch(list(texts))
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)


def load_tokenizer(model_dir: Path, *, eager: bool = False) -> TextTokenizer | None:
    """The tokenizer in a package or edge model directory, or None when it has none."""
    path = Path(model_dir) / TOKENIZER_NAME
    if not path.exists() and not path.is_symlink():
        return None  # anything else present (a link out, a FIFO) is refused when loaded
    tokenizer = TextTokenizer(path)
    return tokenizer.load() if eager else tokenizer


def texts_of(options: Mapping[str, Any]) -> list[str] | None:
    """The request's text (None when it sent tensors), validated: a non-empty list of str."""
    if TEXT_OPTION not in options:
        return None
    texts = options[TEXT_OPTION]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TextError(f"options[{TEXT_OPTION!r}] must be a list of strings")
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise TextError(f"options[{TEXT_OPTION!r}] must hold 1 to {MAX_TEXTS} strings, "
                        f"got {len(texts)}")  # fmt: skip
    return texts


def inputs_for(
    options: Mapping[str, Any], inputs: Sequence[np.ndarray], tokenizer: TextTokenizer | None
) -> list[np.ndarray]:
    """What a worker runs for one dispatch: its tensors, or its text tokenized."""
    texts = texts_of(options)
    if texts is None:
        return list(inputs)
    if tokenizer is None:
        raise TextError(
            "this model takes tensors, not text: its directory has no tokenizer.json "
            "(send input tensors, or pack/export a model that ships its tokenizer)"
        )
    if inputs:
        raise TextError("send text or input tensors, not both")
    return [tokenizer.encode(texts)]
