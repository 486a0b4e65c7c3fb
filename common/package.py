"""The model-package format: a manifest plus safetensors weights laid out in stage order.

A package is a directory::

    manifest.json         this module's `Manifest`, as JSON (docs/PACKAGE.md)
    weights.safetensors   one safetensors file; stage k's tensors are one contiguous byte range

Reading a package never imports torch: the cold-start reader starts before torch is imported,
so everything it needs (byte ranges, dtypes, checksums) lives here in plain Python.

A package is data from someone else (docs/PACKAGE.md, "Threat model"): every file it names is
confined to its directory and must be a regular file, every size is capped before anything is
parsed, JSON nesting is bounded, every byte range is checked against the file, and every
malformed input ends in a `PackageError`, never in another exception.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path, PurePosixPath
from typing import Any

from cicada.common.checksums import block_count, block_spans
from cicada.common.defaults import (
    BATCHING_SETTINGS,
    MAX_BATCH_SIZE,
    MAX_OUTPUTS,
    MAX_QUEUE_DELAY_MS,
    PADDING_SETTINGS,
)
from cicada.common.errors import PackageFormatError, PackageIntegrityError
from cicada.common.factory import canonical_factory
from cicada.common.files import write_text_atomic

log = logging.getLogger("cicada.package")

FORMAT_NAME = "cicada-package"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"

# safetensors dtype tag -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip

# Caps checked before anything is parsed: a manifest or safetensors header this large is
# refused from its size alone (a 20 MiB header cost 535 MiB of memory to parse).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
# Deepest JSON nesting accepted (a manifest is ~5 deep, a transformers config a few more).
MAX_JSON_DEPTH = 64
# `cicada pack` starts every tensor (and every stage) at a multiple of this, so that the CPU
# source's zero-copy views are as aligned as torch's own allocations (docs/PACKAGE.md).
ALIGN = 64
# `cicada pack` records an xxh3 per block of this many bytes of each stage (docs/PACKAGE.md),
# so that readers hash one large stage in parallel; a manifest may say any multiple of ALIGN up
# to MAX_BLOCK_BYTES (a loader's ring slot holds at least one whole block).
BLOCK_BYTES = 16 * 1024 * 1024
MAX_BLOCK_BYTES = 64 * 1024 * 1024
# Header entries named so are padding between tensors: U8 vectors the manifest does not list.
PAD_PREFIX = "__cicada_pad__."
# The manifest's own sha256, over its canonical JSON without this field.
MANIFEST_HASH_FIELD = "manifest_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its name in the model's state dict and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class StageEntry:
    """A unit of loading and execution: modules run in order, with their weights in one range."""

    index: int
    name: str
    modules: tuple[str, ...]
    tensors: tuple[TensorEntry, ...]
    begin: int
    end: int
    xxh3: str
    # xxh3 of each block of `block_bytes` from `begin` (the last shorter); () with 0 in a
    # package written before block checksums: the stage's xxh3 alone covers it then.
    blocks: tuple[str, ...] = ()
    block_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def block_spans(self) -> list[tuple[int, int]]:
        """Each block's absolute byte range, in order ([] without block checksums)."""
        if not self.blocks:
            return []
        return list(block_spans(self.begin, self.end, self.block_bytes))


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Architecture:
    """How to rebuild the model: an importable factory `pkg.module:callable` and its kwargs."""

    factory: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    architecture: Architecture
    stages: tuple[StageEntry, ...]
    files: tuple[FileEntry, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> stored name
    staging_method: str = "whole"
    staging_note: str = ""
    weights: str = WEIGHTS_NAME
    format_version: int = FORMAT_VERSION
    # The package's default batching settings (any of defaults.BATCHING_SETTINGS), which the
    # coordinator's config and `cicada cloud` options override; {}: none (one at a time).
    batching: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.stages)

    def tensors(self) -> list[TensorEntry]:
        return [t for s in self.stages for t in s.tensors]

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise PackageFormatError(f"{MANIFEST_NAME} lists no file entry for {path!r}")

    # -- JSON -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "architecture": {
                "factory": self.architecture.factory,
                "config": self.architecture.config,
            },
            "staging": {"method": self.staging_method, "note": self.staging_note},
            "weights": self.weights,
            "stages": [
                {
                    "name": s.name,
                    "modules": list(s.modules),
                    "begin": s.begin,
                    "end": s.end,
                    "xxh3": s.xxh3,
                    **({"block_bytes": s.block_bytes, "blocks": list(s.blocks)}
                       if s.blocks else {}),
                    "tensors": [
                        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                         "begin": t.begin, "end": t.end}
                        for t in s.tensors
                    ],
                }
                for s in self.stages
            ],
            "aliases": dict(self.aliases),
            "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in self.files},
            # Only when set: the manifests (and hashes) of packages without it stay as they were.
            **({"batching": dict(self.batching)} if self.batching else {}),
        }  # fmt: skip

    def dump(self, package_dir: Path) -> None:
        """Write manifest.json atomically (a reader never sees half a manifest), sealed with
        its own sha256."""
        write_manifest_doc(package_dir, self.to_json())

    @classmethod
    def from_json(cls, doc: Any, where: str = MANIFEST_NAME) -> Manifest:
        return _parse_manifest(doc, where)

    @classmethod
    def load(cls, package_dir: Path | str) -> Manifest:
        path = Path(package_dir) / MANIFEST_NAME
        try:
            fd = open_package_file(package_dir, MANIFEST_NAME, PackageFormatError)
        except FileNotFoundError:
            raise PackageFormatError(
                f"{path} does not exist: is {package_dir} a package made by `cicada pack`?"
            ) from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_MANIFEST_BYTES:
                raise PackageFormatError(
                    f"{path} is {size} bytes, more than a manifest may be "
                    f"({MAX_MANIFEST_BYTES}): refused before parsing"
                )
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise PackageFormatError(f"{path} grew past {MAX_MANIFEST_BYTES} bytes while read")
        doc = loads_bounded(raw, f"{path} is not valid JSON", PackageFormatError)
        check_manifest_hash(doc, str(path))
        return _parse_manifest(doc, str(path))


def canonical_manifest_bytes(doc: dict[str, Any]) -> bytes:
    """What the manifest's sha256 covers: its JSON without `manifest_sha256`, keys sorted,
    no whitespace, UTF-8 (Python's json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False))."""
    body = {k: v for k, v in doc.items() if k != MANIFEST_HASH_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_manifest_bytes(doc)).hexdigest()


def write_manifest_doc(package_dir: Path | str, doc: dict[str, Any]) -> None:
    """Write a manifest document atomically with its `manifest_sha256` (re)computed."""
    sealed = {k: v for k, v in doc.items() if k != MANIFEST_HASH_FIELD}
    sealed[MANIFEST_HASH_FIELD] = manifest_digest(sealed)
    write_text_atomic(Path(package_dir) / MANIFEST_NAME, json.dumps(sealed, indent=1))


_warned_unsealed: set[str] = set()


def check_manifest_hash(doc: Any, where: str) -> bool:
    """True if the manifest carries its sha256 and it matches; False for a manifest written
    before it had one (loaded, with a warning once per path); a mismatch is an error."""
    if not isinstance(doc, dict):
        return False  # _parse_manifest says what is wrong with it
    recorded = doc.get(MANIFEST_HASH_FIELD)
    if recorded is None:
        if where not in _warned_unsealed:
            _warned_unsealed.add(where)
            log.warning(
                "%s has no %s (written by an older cicada): its own bytes are not covered "
                "by a checksum; re-pack it to seal it", where, MANIFEST_HASH_FIELD,
            )  # fmt: skip
        return False
    if not isinstance(recorded, str) or manifest_digest(doc) != recorded:
        raise PackageIntegrityError(
            f"{where}: {MANIFEST_HASH_FIELD} does not match the manifest's contents: it was "
            f"edited or corrupted after `cicada pack`; re-run `cicada pack`"
        )
    return True


# -- bounded JSON -------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """The deepest nesting of `raw` (JSON), without parsing it (linear, in C but the sum)."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _BRACKETS)
    return max(accumulate(_DEPTH_STEP[b] for b in brackets), default=0)


def loads_bounded(
    raw: bytes, what: str, error: type[Exception], max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """json.loads with the nesting depth checked first; every failure is `error(what: ...)`."""
    try:
        depth = json_depth(raw)
    except RecursionError:  # the string regex on pathological input
        raise error(f"{what}: cannot be scanned") from None
    if depth > max_depth:
        raise error(f"{what}: nested {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{what}: {exc}") from None


# -- files confined to the package ------------------------------------------------------------


def check_relative_path(name: Any, where: str) -> str:
    """A file name from a manifest: relative, normalised, inside the package (syntax only)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise PackageFormatError(f"{where}: file name {name!r} is not a plain relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise PackageFormatError(
            f"{where}: file name {name!r} leaves the package directory (absolute, '..', or "
            f"not normalised): a package may only name files inside itself"
        )
    return name


def package_file(
    package_dir: Path | str, name: str, error: type[Exception] = PackageIntegrityError
) -> Path:
    """`name` inside `package_dir`, resolved: no symlink out of the package, a regular file
    (a FIFO or device is refused before anything opens it). FileNotFoundError if absent."""
    check_relative_path(name, str(package_dir))
    root = Path(os.path.realpath(package_dir))
    path = Path(os.path.realpath(root / name))
    if path != root and root not in path.parents:
        raise error(
            f"{Path(package_dir) / name} resolves to {path}, outside the package {root}: "
            f"a package may not link to files outside itself"
        )
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise  # the caller says what is missing
    except OSError as exc:  # permissions, a loop of links, a name too long
        raise error(f"{Path(package_dir) / name}: cannot stat: {exc}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{Path(package_dir) / name} is not a regular file: refused")
    return path


def open_package_file(
    package_dir: Path | str, name: str, error: type[Exception] = PackageIntegrityError
) -> int:
    """A read-only descriptor of `package_file(...)`: opened without blocking and without
    following a link, and checked again on the descriptor (no race with a swap)."""
    path = package_file(package_dir, name, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(path)) from None
        raise error(f"{path}: cannot open: {exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path} is not a regular file: refused")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_package_file(
    package_dir: Path | str, name: str, cap: int, error: type[Exception] = PackageIntegrityError
) -> bytes:
    """The bytes of a small file of a package or model directory (a manifest's neighbour, a
    tokenizer, an edge model's description), opened as `open_package_file` opens it and refused
    (`error`) when it holds more than `cap` bytes: by its size before reading, and by what was
    read should it grow meanwhile. FileNotFoundError if absent."""
    fd = open_package_file(package_dir, name, error)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = b"" if size > cap else f.read(cap + 1)
    if size > cap or len(raw) > cap:
        raise error(f"{Path(package_dir) / name} is {max(size, len(raw))} bytes, over the "
                    f"{cap}-byte cap for it: refused")  # fmt: skip
    return raw


def _need(doc: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise PackageFormatError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PackageFormatError(f"{where}: field {key!r} has the wrong type")
    return value


def _need_int(doc: Any, key: str, where: str) -> int:
    value: int = _need(doc, key, int, where)
    if value < 0:
        raise PackageFormatError(f"{where}: field {key!r} is negative")
    return value


def _parse_manifest(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise PackageFormatError(
            f"{where}: not a Cicada package manifest (format != {FORMAT_NAME!r})"
        )
    version = _need(doc, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise PackageFormatError(
            f"{where}: package format version {version} is newer than this Cicada reads "
            f"({FORMAT_VERSION}); upgrade cicada, or re-pack the model with this version"
        )
    if version < 1:
        raise PackageFormatError(f"{where}: invalid format version {version}")
    arch = _need(doc, "architecture", dict, where)
    architecture = Architecture(
        # Packages written before the single `cicada` import root name `cloud.…` factories.
        factory=canonical_factory(_need(arch, "factory", str, f"{where}: architecture")),
        config=_need(arch, "config", dict, f"{where}: architecture"),
    )
    staging = doc.get("staging", {})
    stages: list[StageEntry] = []
    names: set[str] = set()
    cursor: int | None = None
    for index, s in enumerate(_need(doc, "stages", list, where)):
        at = f"{where}: stage {index}"
        if not isinstance(s, dict):
            raise PackageFormatError(f"{at}: not an object")
        tensors: list[TensorEntry] = []
        begin, end = _need_int(s, "begin", at), _need_int(s, "end", at)
        if end < begin:
            raise PackageFormatError(f"{at}: byte range [{begin}, {end}) ends before it begins")
        if cursor is not None and begin != cursor:
            raise PackageFormatError(f"{at}: byte range does not follow the previous stage")
        t_cursor = begin
        for t in _need(s, "tensors", list, at):
            name = _need(t, "name", str, at)
            tat = f"{at} tensor {name}"
            dtype = _need(t, "dtype", str, tat)
            shape = tuple(_need(t, "shape", list, tat))
            t_begin, t_end = _need_int(t, "begin", tat), _need_int(t, "end", tat)
            if name in names or name.startswith(PAD_PREFIX) or not name:
                raise PackageFormatError(f"{tat}: duplicate or reserved tensor name")
            names.add(name)
            if dtype not in DTYPE_SIZES:
                raise PackageFormatError(f"{at}: tensor {name} has unknown dtype {dtype!r}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PackageFormatError(f"{at}: tensor {name} has an invalid shape {shape}")
            numel = 1
            for d in shape:
                numel *= d
            # Tensors follow each other in file order; what lies between two of them (less
            # than ALIGN bytes) is padding, which the weights file must hold as pad entries.
            if (
                not t_cursor <= t_begin < t_cursor + ALIGN
                or t_end - t_begin != numel * DTYPE_SIZES[dtype]
            ):
                raise PackageFormatError(
                    f"{at}: tensor {name} byte range [{t_begin}, {t_end}) does not match its "
                    f"shape/dtype or does not follow the previous tensor"
                )
            t_cursor = t_end
            tensors.append(TensorEntry(name, dtype, shape, t_begin, t_end))
        if not t_cursor <= end < t_cursor + ALIGN:
            raise PackageFormatError(f"{at}: tensors do not fill the stage's byte range")
        cursor = end
        modules = _need(s, "modules", list, at)
        if not all(isinstance(m, str) for m in modules):
            raise PackageFormatError(f"{at}: 'modules' must be a list of module paths (strings)")
        stages.append(
            StageEntry(
                index=index,
                name=_need(s, "name", str, at),
                modules=tuple(modules),
                tensors=tuple(tensors),
                begin=begin,
                end=end,
                xxh3=_need(s, "xxh3", str, at),
                **_parse_blocks(s, end - begin, at),
            )
        )
    if not stages:
        raise PackageFormatError(f"{where}: the package has no stages")
    files = tuple(
        FileEntry(
            path=check_relative_path(p, f"{where}: files"),
            size=_need_int(f, "size", f"{where}: file {p}"),
            sha256=_need(f, "sha256", str, f"{where}: file {p}"),
        )
        for p, f in _need(doc, "files", dict, where).items()
    )
    aliases = _need(doc, "aliases", dict, where)
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise PackageFormatError(f"{where}: alias {alias} must name a tensor (a string)")
        if target not in names:
            raise PackageFormatError(f"{where}: alias {alias} points at unknown tensor {target}")
        if alias in names:
            raise PackageFormatError(f"{where}: alias {alias} is also a stored tensor")
    manifest = Manifest(
        architecture=architecture,
        stages=tuple(stages),
        files=files,
        aliases={str(k): str(v) for k, v in aliases.items()},
        staging_method=str(staging.get("method", "whole")) if isinstance(staging, dict) else "",
        staging_note=str(staging.get("note", "")) if isinstance(staging, dict) else "",
        weights=check_relative_path(_need(doc, "weights", str, where), f"{where}: weights"),
        format_version=version,
        batching=parse_batching(doc.get("batching", {}), f"{where}: batching"),
    )
    manifest.file(manifest.weights)  # the weights file must be listed
    return manifest


def _parse_blocks(s: dict[str, Any], nbytes: int, at: str) -> dict[str, Any]:
    """A stage's optional block checksums: `block_bytes` (a multiple of ALIGN, at most
    MAX_BLOCK_BYTES) and exactly one xxh3 string per block."""
    if "blocks" not in s and "block_bytes" not in s:
        return {}
    size = _need_int(s, "block_bytes", at)
    if size == 0 or size % ALIGN or size > MAX_BLOCK_BYTES:
        raise PackageFormatError(
            f"{at}: block_bytes {size} must be a positive multiple of {ALIGN} up to "
            f"{MAX_BLOCK_BYTES}"
        )
    blocks = _need(s, "blocks", list, at)
    if len(blocks) != block_count(nbytes, size) or not all(isinstance(b, str) for b in blocks):
        raise PackageFormatError(
            f"{at}: 'blocks' must hold one xxh3 string per {size}-byte block of the stage "
            f"({block_count(nbytes, size)}), not {len(blocks)} entries"
        )
    return {"block_bytes": size, "blocks": tuple(blocks)}


def read_safetensors_header(
    path: Path, expected_size: int | None = None
) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without torch; return (entries, absolute data start).

    The header's length is read first and checked (against `expected_size` when the manifest
    says where the data starts, and against the cap) before a byte of it is read. Every entry
    is checked for form: a dtype, a shape, offsets whose span fits dtype and shape."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise PackageIntegrityError(f"{path} is not a regular file: refused")
        head = f.read(8)
        if len(head) != 8:
            raise PackageIntegrityError(f"{path}: truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_SAFETENSORS_HEADER:
            raise PackageIntegrityError(
                f"{path}: safetensors header of {size} bytes is too large (at most "
                f"{MAX_SAFETENSORS_HEADER}): refused before reading it"
            )
        if expected_size is not None and size != expected_size:
            raise PackageIntegrityError(
                f"{path}: safetensors header is {size} bytes but the manifest's first stage "
                f"puts the data at byte {8 + expected_size}: the two files do not belong together"
            )
        raw = f.read(size)
    if len(raw) != size:
        raise PackageIntegrityError(f"{path}: truncated inside the safetensors header")
    header = loads_bounded(
        raw, f"{path}: safetensors header is not valid JSON", PackageIntegrityError
    )
    if not isinstance(header, dict):
        raise PackageIntegrityError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise PackageIntegrityError(f"{path}: __metadata__ must map strings to strings")
    for name, h in header.items():
        _check_header_entry(path, name, h)
    return header, 8 + size


def _check_header_entry(path: Path, name: str, h: Any) -> None:
    bad = f"{path}: header entry {name!r}"
    if not isinstance(h, dict):
        raise PackageIntegrityError(f"{bad} is not an object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise PackageIntegrityError(f"{bad} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise PackageIntegrityError(f"{bad} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise PackageIntegrityError(f"{bad} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
        raise PackageIntegrityError(f"{bad}: data_offsets do not span its shape and dtype")


def check_weights_file(package_dir: Path, manifest: Manifest) -> Path:
    """Cheap structural checks (path, size, header vs manifest) before any byte is trusted.

    Costs a stat and a JSON parse of the header: done on every cold start. Full hashing is
    `verify_package` (sha256) and the per-stage xxh3 the reader computes while streaming.
    Checked: the weights file is a regular file inside the package of the recorded size; the
    stages cover its data section exactly; the header's entries tile the data section as
    safetensors requires (from 0, contiguous, no overlap, to the end of the file); each
    manifest tensor is the header's entry of that name; every other entry is padding.
    """
    entry = manifest.file(manifest.weights)
    try:
        path = package_file(package_dir, manifest.weights)
    except FileNotFoundError:
        path = Path(package_dir) / manifest.weights
        raise PackageIntegrityError(f"{path} is missing: re-run `cicada pack`") from None
    size = path.stat().st_size
    if size != entry.size:
        raise PackageIntegrityError(
            f"{path} is {size} bytes but the manifest recorded {entry.size} "
            f"({'truncated' if size < entry.size else 'extra bytes'}): re-run `cicada pack`"
        )
    first, last = manifest.stages[0], manifest.stages[-1]
    if last.end != size:
        raise PackageIntegrityError(
            f"{path}: the last stage ({last.name}) ends at byte {last.end} but the file has "
            f"{size} bytes: the manifest's byte ranges do not fit the file"
        )
    if first.begin < 8:
        raise PackageIntegrityError(f"{path}: the first stage begins inside the header")
    header, data_start = read_safetensors_header(path, expected_size=first.begin - 8)
    # safetensors: the entries cover [0, size - data_start) exactly, in order, no overlap.
    spans = sorted((h["data_offsets"][0], h["data_offsets"][1], n) for n, h in header.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise PackageIntegrityError(
                f"{path}: header entry {name!r} starts at data offset {begin}, not {cursor}: "
                f"the data section must be covered by tensors, contiguous and without overlap"
            )
        cursor = end
    if cursor != size - data_start:
        raise PackageIntegrityError(
            f"{path}: the header's tensors cover {cursor} data bytes, the file holds "
            f"{size - data_start}"
        )
    stored = manifest.tensors()
    for t in stored:
        h = header.get(t.name)
        if h is None:
            raise PackageIntegrityError(f"{path}: tensor {t.name} is in the manifest, not the file")
        if (
            h["dtype"] != t.dtype
            or tuple(h["shape"]) != t.shape
            or [data_start + o for o in h["data_offsets"]] != [t.begin, t.end]
        ):
            raise PackageIntegrityError(
                f"{path}: tensor {t.name} in the file header differs from the manifest "
                f"(dtype/shape/offsets): the two files do not belong together"
            )
    if len(header) != len(stored):
        names = {t.name for t in stored}
        extra = sorted(
            n for n, h in header.items()
            if n not in names
            and not (n.startswith(PAD_PREFIX) and h["dtype"] == "U8" and len(h["shape"]) == 1)
        )  # fmt: skip
        if extra:
            raise PackageIntegrityError(f"{path}: tensors not in the manifest: {extra[:5]}")
    return path


def parse_batching(doc: Any, where: str) -> dict[str, Any]:
    """A manifest's `batching` defaults, checked: a map of some of `max_batch_size` (1 ...
    1024), `max_queue_delay_ms` (0 ... 60000), `preferred_batch_sizes` (integers in
    [1, max_batch_size]), `pad_sequences` (a boolean) and `sequence_outputs` (distinct output
    indices in [0, 64), only with `pad_sequences`)."""
    if not isinstance(doc, dict):
        raise PackageFormatError(f"{where}: not an object")
    unknown = set(doc) - set(BATCHING_SETTINGS) - set(PADDING_SETTINGS)
    if unknown:
        raise PackageFormatError(f"{where}: unknown setting(s) {sorted(unknown)}")
    size = doc.get("max_batch_size", MAX_BATCH_SIZE)  # absent: checked where it is combined
    if not _plain_int(size) or not 1 <= size <= MAX_BATCH_SIZE:
        raise PackageFormatError(f"{where}: max_batch_size must be an integer in 1 ... 1024")
    delay = doc.get("max_queue_delay_ms", 0)
    if not (_plain_int(delay) or isinstance(delay, float)) or not (
        math.isfinite(delay) and 0 <= delay <= MAX_QUEUE_DELAY_MS
    ):
        raise PackageFormatError(f"{where}: max_queue_delay_ms must be a number in 0 ... 60000")
    sizes = doc.get("preferred_batch_sizes", [])
    if (
        not isinstance(sizes, list)
        or len(sizes) > MAX_BATCH_SIZE
        or not all(_plain_int(n) and 1 <= n <= size for n in sizes)
    ):
        raise PackageFormatError(
            f"{where}: preferred_batch_sizes must be integers in 1 ... max_batch_size"
        )
    pad = doc.get("pad_sequences", False)
    if not isinstance(pad, bool):
        raise PackageFormatError(f"{where}: pad_sequences must be true or false")
    outputs = doc.get("sequence_outputs", [])
    if (
        not isinstance(outputs, list)
        or not all(_plain_int(i) and 0 <= i < MAX_OUTPUTS for i in outputs)
        or len(set(outputs)) != len(outputs)
    ):
        raise PackageFormatError(
            f"{where}: sequence_outputs must be distinct output indices in 0 ... {MAX_OUTPUTS - 1}"
        )
    if outputs and not pad:
        raise PackageFormatError(f"{where}: sequence_outputs goes with pad_sequences: true")
    return dict(doc)


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
