"""The package format (common/package.py): manifest round trip and validation, the safetensors
header reader, and the weights file `pack` writes."""

from __future__ import annotations

import contextlib
import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.common.errors import PackageError, PackageFormatError, PackageIntegrityError
from cicada.common.package import (
    FORMAT_VERSION,
    MANIFEST_HASH_FIELD,
    MANIFEST_NAME,
    MAX_SAFETENSORS_HEADER,
    PAD_PREFIX,
    WEIGHTS_NAME,
    Manifest,
    check_weights_file,
    manifest_digest,
    read_safetensors_header,
    write_manifest_doc,
)

FACTORY = "cicada.cloud.models.gpt2:build"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package") / "gpt2"
    pack(FACTORY, out, config=gpt2.tiny_config())
    return out


@pytest.fixture
def doc(pkg: Path) -> dict[str, Any]:
    """A fresh copy of the packed manifest's JSON document."""
    loaded: dict[str, Any] = json.loads((pkg / MANIFEST_NAME).read_text())
    return loaded


# -- round trip ------------------------------------------------------------------------------


def test_manifest_json_round_trip(pkg: Path, doc: dict[str, Any], tmp_path: Path) -> None:
    manifest = Manifest.load(pkg)
    # manifest.json is to_json() sealed with its own sha256 (docs/PACKAGE.md).
    assert doc[MANIFEST_HASH_FIELD] == manifest_digest(doc)
    assert manifest.to_json() == {k: v for k, v in doc.items() if k != MANIFEST_HASH_FIELD}
    through_text = json.loads(json.dumps(manifest.to_json()))
    assert Manifest.from_json(through_text) == manifest
    manifest.dump(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    assert not list(tmp_path.glob("*.tmp")), "dump left its temporary file"


def test_manifest_fields(pkg: Path) -> None:
    manifest = Manifest.load(pkg)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.architecture.factory == FACTORY
    assert manifest.architecture.config == gpt2.tiny_config()
    assert manifest.weights == WEIGHTS_NAME
    entry = manifest.file(WEIGHTS_NAME)
    assert entry.size == (pkg / WEIGHTS_NAME).stat().st_size
    assert len(entry.sha256) == 64
    assert manifest.total_bytes == manifest.stages[-1].end - manifest.stages[0].begin
    assert manifest.total_bytes == sum(t.nbytes for t in manifest.tensors())
    with pytest.raises(PackageFormatError, match=r"other\.bin"):
        manifest.file("other.bin")


# -- malformed manifests ---------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return apply


def _shift_stage(d: dict[str, Any]) -> None:
    # Stage 1 starts 4 bytes after stage 0 ends (its tensors move along consistently).
    stage = d["stages"][1]
    stage["begin"] += 4
    stage["end"] += 4
    for t in stage["tensors"]:
        t["begin"] += 4
        t["end"] += 4


def _grow_stage(d: dict[str, Any]) -> None:
    d["stages"][0]["end"] += 64  # less than ALIGN past the last tensor would be padding


def _two_tensors_one_range(d: dict[str, Any]) -> None:
    # Second tensor of stage 0 starts where the first one started: overlapping ranges.
    first, second = d["stages"][0]["tensors"][:2]
    size = second["end"] - second["begin"]
    second["begin"] = first["begin"]
    second["end"] = first["begin"] + size


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "wrong format": (_set(("format",), "safetensors"), r"not a Cicada package manifest"),
    "no format": (_delete(("format",)), r"not a Cicada package manifest"),
    "newer version": (
        _set(("format_version",), FORMAT_VERSION + 1),
        rf"version {FORMAT_VERSION + 1} is newer.*upgrade cicada",
    ),
    "version zero": (_set(("format_version",), 0), r"invalid format version 0"),
    "version as text": (_set(("format_version",), "1"), r"'format_version' has the wrong type"),
    "version as bool": (_set(("format_version",), True), r"'format_version' has the wrong type"),
    "missing architecture": (_delete(("architecture",)), r"missing field 'architecture'"),
    "missing factory": (_delete(("architecture", "factory")), r"architecture: missing field"),
    "missing weights": (_delete(("weights",)), r"missing field 'weights'"),
    "missing files": (_delete(("files",)), r"missing field 'files'"),
    "missing aliases": (_delete(("aliases",)), r"missing field 'aliases'"),
    "missing stage xxh3": (_delete(("stages", 1, "xxh3")), r"stage 1: missing field 'xxh3'"),
    "missing tensor shape": (
        _delete(("stages", 0, "tensors", 0, "shape")),
        r"tensor transformer\.wte\.weight: missing field 'shape'",
    ),
    "missing file sha256": (
        _delete(("files", WEIGHTS_NAME, "sha256")),
        rf"file {WEIGHTS_NAME}: missing field 'sha256'",
    ),
    "config not an object": (_set(("architecture", "config"), [1]), r"'config' has the wrong type"),
    "stages not a list": (_set(("stages",), {"0": {}}), r"'stages' has the wrong type"),
    "stage begin as text": (_set(("stages", 0, "begin"), "2688"), r"'begin' has the wrong type"),
    "file size as float": (
        _set(("files", WEIGHTS_NAME, "size"), 1.5),
        r"'size' has the wrong type",
    ),
    "unknown dtype": (
        _set(("stages", 0, "tensors", 0, "dtype"), "F12"),
        r"tensor transformer\.wte\.weight has unknown dtype 'F12'",
    ),
    "negative dim": (
        _set(("stages", 0, "tensors", 0, "shape"), [-97, 64]),
        r"tensor transformer\.wte\.weight has an invalid shape",
    ),
    "shape larger than range": (
        _set(("stages", 0, "tensors", 0, "shape"), [98, 64]),
        r"tensor transformer\.wte\.weight byte range .* does not match its shape",
    ),
    "dtype wider than range": (
        _set(("stages", 0, "tensors", 0, "dtype"), "F64"),
        r"tensor transformer\.wte\.weight byte range .* does not match its shape",
    ),
    "tensor end moved": (
        lambda d: d["stages"][1]["tensors"][2].__setitem__(
            "end", d["stages"][1]["tensors"][2]["end"] - 4
        ),
        r"stage 1: tensor transformer\.h\.0\.attn\.c_attn\.weight byte range",
    ),
    "overlapping tensors": (_two_tensors_one_range, r"tensor transformer\.wpe\.weight byte range"),
    "stages not contiguous": (_shift_stage, r"stage 1: byte range does not follow"),
    "stage larger than tensors": (_grow_stage, r"stage 0: tensors do not fill"),
    "alias to unknown tensor": (
        _set(("aliases", "lm_head.weight"), "transformer.nope.weight"),
        r"alias lm_head\.weight points at unknown tensor transformer\.nope\.weight",
    ),
    "no stages": (_set(("stages",), []), r"the package has no stages"),
    "weights file not listed": (_set(("files",), {}), rf"no file entry for '{WEIGHTS_NAME}'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_rejected(case: str, doc: dict[str, Any]) -> None:
    mutate, message = MALFORMED[case]
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(PackageFormatError, match=message):
        Manifest.from_json(bad)


@pytest.mark.parametrize("case", ["newer version", "unknown dtype", "no stages"])
def test_malformed_manifest_on_disk_names_the_file(
    case: str, doc: dict[str, Any], tmp_path: Path
) -> None:
    mutate, message = MALFORMED[case]
    mutate(doc)
    write_manifest_doc(tmp_path, doc)  # sealed: the hash matches, the contents are wrong
    with pytest.raises(PackageFormatError, match=message) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


@pytest.mark.parametrize(
    "text", ["", "{", "not json at all", '{"format": "cicada-package",}'], ids=repr
)
def test_manifest_not_json(text: str, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(PackageFormatError, match=r"manifest\.json is not valid JSON"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("doc_value", [[], "cicada-package", 1, None], ids=repr)
def test_manifest_not_an_object(doc_value: Any, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc_value))
    with pytest.raises(PackageFormatError, match=r"not a Cicada package manifest"):
        Manifest.load(tmp_path)


def test_missing_manifest_says_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(PackageFormatError, match=r"does not exist.*made by `cicada pack`"):
        Manifest.load(tmp_path)


def test_alias_with_non_string_target_rejected(doc: dict[str, Any]) -> None:
    doc["aliases"]["lm_head.weight"] = ["transformer.wte.weight"]
    with pytest.raises(PackageFormatError, match=r"lm_head\.weight"):
        Manifest.from_json(doc)


def test_errors_are_package_errors() -> None:
    assert issubclass(PackageFormatError, PackageError)
    assert issubclass(PackageIntegrityError, PackageError)


# -- read_safetensors_header -----------------------------------------------------------------


def test_header_of_packed_file(pkg: Path) -> None:
    manifest = Manifest.load(pkg)
    header, data_start = read_safetensors_header(pkg / WEIGHTS_NAME)
    assert "__metadata__" not in header
    assert set(header) == {t.name for t in manifest.tensors()}
    assert data_start == manifest.stages[0].begin
    for t in manifest.tensors():
        assert [data_start + o for o in header[t.name]["data_offsets"]] == [t.begin, t.end]
        assert header[t.name]["dtype"] == t.dtype
        assert tuple(header[t.name]["shape"]) == t.shape


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_header_truncated_before_length(keep: int, tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00"[:keep])
    with pytest.raises(PackageIntegrityError, match=r"truncated") as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_header_truncated_inside_header(pkg: Path, tmp_path: Path) -> None:
    raw = (pkg / WEIGHTS_NAME).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(raw[: 8 + size // 2])
    with pytest.raises(PackageIntegrityError, match=r"truncated inside the safetensors header"):
        read_safetensors_header(path)


@pytest.mark.parametrize("size", [MAX_SAFETENSORS_HEADER + 1, 2**63, 2**64 - 1])
def test_header_length_too_large(size: int, tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(struct.pack("<Q", size) + b"{}")
    with pytest.raises(PackageIntegrityError, match=rf"{size} bytes is too large") as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "not a JSON object")],
)
def test_header_not_a_json_object(body: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(PackageIntegrityError, match=message):
        read_safetensors_header(path)


# -- check_weights_file ----------------------------------------------------------------------


def _copy_package(pkg: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (MANIFEST_NAME, WEIGHTS_NAME):
        (dest / name).write_bytes((pkg / name).read_bytes())
    return dest


def test_check_weights_file_accepts_pack_output(pkg: Path) -> None:
    assert check_weights_file(pkg, Manifest.load(pkg)) == pkg / WEIGHTS_NAME


def test_check_weights_file_size(pkg: Path, tmp_path: Path) -> None:
    copy_dir = _copy_package(pkg, tmp_path / "p")
    manifest = Manifest.load(copy_dir)
    weights = copy_dir / WEIGHTS_NAME
    with open(weights, "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageIntegrityError, match=r"extra bytes.*re-run `cicada pack`"):
        check_weights_file(copy_dir, manifest)
    weights.unlink()
    with pytest.raises(PackageIntegrityError, match=rf"{WEIGHTS_NAME} is missing"):
        check_weights_file(copy_dir, manifest)


def test_check_weights_file_header_disagrees(pkg: Path, tmp_path: Path) -> None:
    copy_dir = _copy_package(pkg, tmp_path / "p")
    weights = copy_dir / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    # Same length, different dtype tag in the header for one tensor: F32 -> I32.
    needle = b'"transformer.wpe.weight":{"dtype":"F32"'
    at = raw.index(needle)
    raw[at + len(needle) - 4 : at + len(needle) - 1] = b"I32"
    weights.write_bytes(raw)
    with pytest.raises(PackageIntegrityError, match=r"tensor transformer\.wpe\.weight .*differs"):
        check_weights_file(copy_dir, Manifest.load(copy_dir))


# -- the weights file written by pack ---------------------------------------------------------


def test_weights_file_loads_with_safetensors(pkg: Path) -> None:
    loaded = load_file(str(pkg / WEIGHTS_NAME))
    model = gpt2.build(**gpt2.tiny_config())
    state = model.state_dict()
    manifest = Manifest.load(pkg)
    # The tied lm_head.weight is stored once, as transformer.wte.weight, and named as an alias.
    assert manifest.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in loaded
    assert set(loaded) == set(state) - {"lm_head.weight"}
    for name, tensor in loaded.items():
        assert tensor.dtype == state[name].dtype, name
        assert torch.equal(tensor, state[name]), name
    assert torch.equal(loaded["transformer.wte.weight"], state["lm_head.weight"])
    with safe_open(str(pkg / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "cicada"}


def test_weights_file_data_is_64_byte_aligned_and_in_stage_order(pkg: Path) -> None:
    raw = (pkg / WEIGHTS_NAME).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + size
    assert data_start % 64 == 0
    header = json.loads(raw[8:data_start])
    header.pop("__metadata__")
    manifest = Manifest.load(pkg)
    by_offset = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    stored = [n for n in by_offset if not n.startswith(PAD_PREFIX)]
    assert stored == [t.name for t in manifest.tensors()]
    # Every tensor and every stage starts 64-byte aligned; padding entries fill the gaps.
    assert all(t.begin % 64 == 0 for t in manifest.tensors())
    assert all(s.begin % 64 == 0 for s in manifest.stages)
    # No gaps: the data section is exactly the stages, back to back, to the end of the file.
    assert manifest.stages[0].begin == data_start
    assert manifest.stages[-1].end == len(raw)


# -- generated hostile manifests and headers (hypothesis) -----------------------------------

EDGES = [0, 1, -1, 7, 63, 64, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
hostile_values = st.recursive(
    st.one_of(st.sampled_from(EDGES), st.integers(), st.floats(), st.booleans(), st.none(),
              st.text(max_size=8), st.sampled_from(["F32", "I64", "../x", "/etc/passwd", ""])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=12,
)  # fmt: skip
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def json_paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document: map keys and list indices, down to the leaves."""
    paths = [at] if at else []
    if isinstance(node, dict):
        for key, value in node.items():
            paths += json_paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            paths += json_paths(value, (*at, i))
    return paths


def replaced(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


@PROPERTY
@given(data=st.data())
def test_a_manifest_with_hostile_fields_parses_or_is_a_format_error(
    pkg: Path, data: st.DataObject
) -> None:
    """Whatever one or two of its fields hold, a manifest is a Manifest that round-trips, or
    PackageFormatError - never another exception (docs/PACKAGE.md, "Threat model")."""
    doc = json.loads((pkg / MANIFEST_NAME).read_text())
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(json_paths(doc)))
        doc = replaced(doc, path, data.draw(hostile_values))
    try:
        manifest = Manifest.from_json(doc)
    except PackageFormatError:
        return
    assert Manifest.from_json(manifest.to_json()) == manifest
    with contextlib.suppress(PackageError):  # then checked against the real weights file
        check_weights_file(pkg, manifest)


@PROPERTY
@given(header=st.dictionaries(st.text(max_size=12), hostile_values, max_size=4))
def test_a_hostile_safetensors_header_is_read_or_an_integrity_error(
    header: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("header") / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 64)
    try:
        entries, start = read_safetensors_header(path)
    except PackageIntegrityError:
        return
    assert start == 8 + len(body) and set(entries) <= set(header)
