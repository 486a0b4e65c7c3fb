"""The model-package format: a manifest plus safetensors weights laid out in stage order.

A package is a directory::

    manifest.json         this module's `Manifest`, as JSON (docs/PACKAGE.md)
    weights.safetensors   one safetensors file; stage k's tensors are one contiguous byte range

Reading a package never imports torch: the cold-start reader starts before torch is imported,
so everything it needs (byte ranges, dtypes, checksums) lives here in plain Python.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cicada.common.errors import PackageFormatError, PackageIntegrityError
from cicada.common.factory import canonical_factory
from cicada.common.files import write_text_atomic

FORMAT_NAME = "cicada-package"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"

# safetensors dtype tag -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip

# A safetensors header larger than this is refused before it is parsed.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


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

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


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
        }  # fmt: skip

    def dump(self, package_dir: Path) -> None:
        """Write manifest.json atomically (a reader never sees half a manifest)."""
        write_text_atomic(Path(package_dir) / MANIFEST_NAME, json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, doc: Any, where: str = MANIFEST_NAME) -> Manifest:
        return _parse_manifest(doc, where)

    @classmethod
    def load(cls, package_dir: Path | str) -> Manifest:
        path = Path(package_dir) / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PackageFormatError(
                f"{path} does not exist: is {package_dir} a package made by `cicada pack`?"
            ) from None
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise PackageFormatError(f"{path} is not valid JSON: {exc}") from None
        return _parse_manifest(doc, str(path))


def _need(doc: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise PackageFormatError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PackageFormatError(f"{where}: field {key!r} has the wrong type")
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
    cursor: int | None = None
    for index, s in enumerate(_need(doc, "stages", list, where)):
        at = f"{where}: stage {index}"
        tensors: list[TensorEntry] = []
        begin, end = _need(s, "begin", int, at), _need(s, "end", int, at)
        if cursor is not None and begin != cursor:
            raise PackageFormatError(f"{at}: byte range does not follow the previous stage")
        t_cursor = begin
        for t in _need(s, "tensors", list, at):
            name = _need(t, "name", str, at)
            dtype = _need(t, "dtype", str, f"{at} tensor {name}")
            shape = tuple(_need(t, "shape", list, f"{at} tensor {name}"))
            t_begin = _need(t, "begin", int, f"{at} tensor {name}")
            t_end = _need(t, "end", int, f"{at} tensor {name}")
            if dtype not in DTYPE_SIZES:
                raise PackageFormatError(f"{at}: tensor {name} has unknown dtype {dtype!r}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PackageFormatError(f"{at}: tensor {name} has an invalid shape {shape}")
            numel = 1
            for d in shape:
                numel *= d
            if t_begin != t_cursor or t_end - t_begin != numel * DTYPE_SIZES[dtype]:
                raise PackageFormatError(
                    f"{at}: tensor {name} byte range [{t_begin}, {t_end}) does not match its "
                    f"shape/dtype or is not contiguous with the previous tensor"
                )
            t_cursor = t_end
            tensors.append(TensorEntry(name, dtype, shape, t_begin, t_end))
        if t_cursor != end:
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
            )
        )
    if not stages:
        raise PackageFormatError(f"{where}: the package has no stages")
    files = tuple(
        FileEntry(
            path=p,
            size=_need(f, "size", int, f"{where}: file {p}"),
            sha256=_need(f, "sha256", str, f"{where}: file {p}"),
        )
        for p, f in _need(doc, "files", dict, where).items()
    )
    if any(f.size < 0 for f in files):
        raise PackageFormatError(f"{where}: a file entry has a negative size")
    aliases = _need(doc, "aliases", dict, where)
    names = {t.name for s in stages for t in s.tensors}
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
        weights=_need(doc, "weights", str, where),
        format_version=version,
    )
    manifest.file(manifest.weights)  # the weights file must be listed
    return manifest


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without torch; return (entries, absolute data start)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PackageIntegrityError(f"{path}: truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_SAFETENSORS_HEADER:
            raise PackageIntegrityError(f"{path}: safetensors header of {size} bytes is too large")
        raw = f.read(size)
    if len(raw) != size:
        raise PackageIntegrityError(f"{path}: truncated inside the safetensors header")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise PackageIntegrityError(
            f"{path}: safetensors header is not valid JSON: {exc}"
        ) from None
    if not isinstance(header, dict):
        raise PackageIntegrityError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def check_weights_file(package_dir: Path, manifest: Manifest) -> Path:
    """Cheap structural checks (size, header vs manifest) before any byte is trusted.

    Costs a stat and a JSON parse of the header: done on every cold start. Full hashing is
    `verify_package` (sha256) and the per-stage xxh3 the reader computes while streaming.
    """
    path = Path(package_dir) / manifest.weights
    entry = manifest.file(manifest.weights)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PackageIntegrityError(f"{path} is missing: re-run `cicada pack`") from None
    if size != entry.size:
        raise PackageIntegrityError(
            f"{path} is {size} bytes but the manifest recorded {entry.size} "
            f"({'truncated' if size < entry.size else 'extra bytes'}): re-run `cicada pack`"
        )
    header, data_start = read_safetensors_header(path)
    for t in manifest.tensors():
        h = header.get(t.name)
        if h is None:
            raise PackageIntegrityError(f"{path}: tensor {t.name} is in the manifest, not the file")
        offsets = h.get("data_offsets", [None, None])
        if (
            h.get("dtype") != t.dtype
            or tuple(h.get("shape", ())) != t.shape
            or [data_start + int(o) for o in offsets] != [t.begin, t.end]
        ):
            raise PackageIntegrityError(
                f"{path}: tensor {t.name} in the file header differs from the manifest "
                f"(dtype/shape/offsets): the two files do not belong together"
            )
    if len(header) != len(manifest.tensors()):
        extra = sorted(set(header) - {t.name for t in manifest.tensors()})
        raise PackageIntegrityError(f"{path}: tensors not in the manifest: {extra[:5]}")
    return path
