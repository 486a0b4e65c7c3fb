"""A corrupt package fails with a clear error naming the file or tensor, and never serves a
partial model: `cicada run` (fresh process) writes no output, `cicada pack --verify` names the
problem, and `ColdStart` in-process raises instead of returning or hanging."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart, ResidencyEvent
from cicada.common.errors import PackageIntegrityError, PackageMismatchError
from cicada.common.package import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Manifest,
    read_safetensors_header,
    write_manifest_doc,
)

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "cicada.cloud.models.gpt2:build"
CORRUPT_STAGE = "transformer.h.0"  # a block stage, in the middle of the file
PROC_TIMEOUT = 120


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corrupt") / "gpt2"
    pack(FACTORY, out, config=gpt2.tiny_config())
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return gpt2.example_input(gpt2.tiny_config(), batch=2)


@pytest.fixture(scope="module")
def x_npy(tmp_path_factory: pytest.TempPathFactory, x: torch.Tensor) -> Path:
    path = tmp_path_factory.mktemp("input") / "x.npy"
    np.save(path, x.numpy())
    return path


@pytest.fixture(scope="module")
def expected(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = gpt2.build(**gpt2.tiny_config())(x)
    return out


@pytest.fixture
def broken(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine package, for a test to corrupt."""
    dest = tmp_path / "pkg"
    shutil.copytree(pristine, dest)
    return dest


def _popen(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cicada", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def _wait(proc: subprocess.Popen[str]) -> Outcome:
    try:
        out, err = proc.communicate(timeout=PROC_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return Outcome(proc.returncode, out, err)


def run_and_verify(pkg: Path, x_npy: Path, y: Path) -> tuple[Outcome, Outcome]:
    """`cicada run PKG --input X --out Y` and `cicada pack --verify PKG`, side by side."""
    run = _popen("run", pkg, "--input", x_npy, "--out", y)
    verify = _popen("pack", "--verify", pkg, "--check-model")
    return _wait(run), _wait(verify)


def assert_clean_failure(outcome: Outcome, *needles: str) -> None:
    """Non-zero exit, one `error:` line rather than a traceback, and every needle in stderr."""
    assert outcome.returncode != 0, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert "error:" in outcome.stderr, outcome.stderr
    for needle in needles:
        assert needle in outcome.stderr, f"{needle!r} not in: {outcome.stderr}"


def edit_manifest(pkg: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = pkg / MANIFEST_NAME
    doc = json.loads(path.read_text())
    change(doc)
    write_manifest_doc(pkg, doc)  # sealed again, as whoever edits it can


def stage_named(pkg: Path, name: str) -> Any:
    (stage,) = [s for s in Manifest.load(pkg).stages if s.name == name]
    return stage


def flip_byte_in_stage(pkg: Path, name: str) -> int:
    """Flip every bit of the byte in the middle of stage `name`; return that stage's index."""
    stage = stage_named(pkg, name)
    weights = pkg / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[(stage.begin + stage.end) // 2] ^= 0xFF
    weights.write_bytes(raw)
    index: int = stage.index
    return index


def relayout(pkg: Path, drop: Iterable[str] = (), to_f64: Iterable[str] = ()) -> None:
    """Rewrite a package consistently without some tensors, or with some stored as float64.

    The result is a well-formed package (header, offsets, stage checksums, size and sha256 all
    agree with the manifest): only its tensors no longer fit the model the manifest names.
    """
    drop, to_f64 = set(drop), set(to_f64)
    doc = json.loads((pkg / MANIFEST_NAME).read_text())
    raw = (pkg / WEIGHTS_NAME).read_bytes()
    read_safetensors_header(pkg / WEIGHTS_NAME)  # the source must be sane
    stages: list[dict[str, Any]] = []
    blobs: list[list[tuple[dict[str, Any], bytes]]] = []
    for stage in doc["stages"]:
        kept: list[tuple[dict[str, Any], bytes]] = []
        for t in stage["tensors"]:
            if t["name"] in drop:
                continue
            data = raw[t["begin"] : t["end"]]
            if t["name"] in to_f64:
                assert t["dtype"] == "F32"
                data = np.frombuffer(data, dtype=np.float32).astype(np.float64).tobytes()
                t = {**t, "dtype": "F64"}
            kept.append((t, data))
        if kept:
            stages.append(stage)
            blobs.append(kept)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for kept in blobs:
        for t, data in kept:
            header[t["name"]] = {
                "dtype": t["dtype"],
                "shape": t["shape"],
                "data_offsets": [offset, offset + len(data)],
            }
            offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % 64)
    cursor = 8 + len(header_bytes)
    body = bytearray(struct.pack("<Q", len(header_bytes)) + header_bytes)
    for stage, kept in zip(stages, blobs, strict=True):
        stage["begin"] = cursor
        stage["tensors"] = []
        digest = xxhash.xxh3_64()
        for t, data in kept:
            stage["tensors"].append({**t, "begin": cursor, "end": cursor + len(data)})
            digest.update(data)
            body += data
            cursor += len(data)
        stage["end"] = cursor
        stage["xxh3"] = digest.hexdigest()
        stage.pop("blocks", None)  # rewritten with the stage's checksum only (an older package)
        stage.pop("block_bytes", None)
    doc["stages"] = stages
    doc["aliases"] = {a: t for a, t in doc["aliases"].items() if t not in drop}
    doc["files"][WEIGHTS_NAME] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (pkg / WEIGHTS_NAME).write_bytes(bytes(body))
    write_manifest_doc(pkg, doc)


# -- the pristine package works, so the failures below are the corruption's doing -------------


def test_pristine_package_runs_and_verifies(
    pristine: Path, x_npy: Path, tmp_path: Path, expected: torch.Tensor
) -> None:
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(pristine, x_npy, y)
    assert run.returncode == 0, run.stderr
    assert torch.equal(torch.from_numpy(np.load(y)), expected)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"ok: {pristine}")


def test_relayout_without_changes_is_a_valid_package(
    broken: Path, x_npy: Path, tmp_path: Path, expected: torch.Tensor
) -> None:
    # The helper the mismatch tests rely on, checked against the product's own checks.
    relayout(broken)
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    assert verify.returncode == 0, verify.stderr
    assert run.returncode == 0, run.stderr
    assert torch.equal(torch.from_numpy(np.load(y)), expected)


# -- corruptions -----------------------------------------------------------------------------


def test_truncated_weights_file(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    weights = broken / WEIGHTS_NAME
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    assert_clean_failure(run, str(weights), "truncated", "re-run `cicada pack`")
    assert not y.exists()
    assert_clean_failure(verify, str(weights), str(size // 2), str(size))


def test_flipped_byte_in_block_stage(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    flip_byte_in_stage(broken, CORRUPT_STAGE)
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    # run: the per-stage xxh3 catches it while the bytes stream by.
    assert_clean_failure(
        run, str(broken / WEIGHTS_NAME), CORRUPT_STAGE, "checksum", "re-run `cicada pack`"
    )
    assert not y.exists()
    # verify: the full sha256 catches it first.
    assert_clean_failure(verify, str(broken / WEIGHTS_NAME), "sha256")


def test_edited_sha256_fails_verify_but_not_run(
    broken: Path, x_npy: Path, tmp_path: Path, expected: torch.Tensor
) -> None:
    # Documented design (DESIGN.md, "Integrity without a slow start"): a cold start checks
    # each stage's xxh3 as it streams, and sha256 is for `cicada pack --verify` only. So a
    # wrong sha256 with intact bytes is a verify failure, and run still serves correctly.
    edit_manifest(broken, lambda d: d["files"][WEIGHTS_NAME].__setitem__("sha256", "0" * 64))
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    assert_clean_failure(verify, str(broken / WEIGHTS_NAME), "sha256", "0" * 64)
    assert run.returncode == 0, run.stderr
    assert torch.equal(torch.from_numpy(np.load(y)), expected)


def test_edited_stage_checksum_fails_run_and_verify(
    broken: Path, x_npy: Path, tmp_path: Path
) -> None:
    # The converse: intact bytes and sha256, a wrong xxh3 recorded for one stage.
    index = stage_named(broken, CORRUPT_STAGE).index
    edit_manifest(broken, lambda d: d["stages"][index].__setitem__("xxh3", "0" * 16))
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    assert_clean_failure(run, CORRUPT_STAGE, "checksum")
    assert not y.exists()
    assert_clean_failure(verify, CORRUPT_STAGE, "checksum mismatch")


def test_tensor_missing_from_package(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    relayout(broken, drop={"transformer.ln_f.bias"})
    assert "transformer.ln_f.bias" not in {t.name for t in Manifest.load(broken).tensors()}
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, "transformer.ln_f.bias", "the package lacks", FACTORY)
    assert not y.exists()


def test_tensor_in_manifest_not_in_file(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    # The manifest still lists a tensor the weights file no longer holds: the two files come
    # from different packs.
    manifest_before = (broken / MANIFEST_NAME).read_text()
    relayout(broken, drop={"transformer.ln_f.bias"})
    weights_only = (broken / WEIGHTS_NAME).read_bytes()
    doc = json.loads(manifest_before)
    doc["files"][WEIGHTS_NAME]["size"] = len(weights_only)
    doc["files"][WEIGHTS_NAME]["sha256"] = hashlib.sha256(weights_only).hexdigest()
    write_manifest_doc(broken, doc)
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, str(broken / WEIGHTS_NAME))
    # The manifest's byte ranges no longer fit the file (caught before the header is read).
    assert "the manifest's byte ranges do not fit the file" in run.stderr
    assert not y.exists()


def test_shape_mismatch(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    # Weights packed for n_embd=64; the manifest now asks for a model with n_embd=32.
    edit_manifest(broken, lambda d: d["architecture"]["config"].__setitem__("n_embd", 32))
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, "tensor transformer.wte.weight", "[97, 64]", "[97, 32]")
    assert not y.exists()


def test_dtype_mismatch(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    name = "transformer.h.0.attn.c_attn.weight"
    relayout(broken, to_f64={name})
    assert {t.name: t.dtype for t in Manifest.load(broken).tensors()}[name] == "F64"
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, f"tensor {name}", "F64", "torch.float32")
    assert not y.exists()


def test_newer_format_version(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    edit_manifest(broken, lambda d: d.__setitem__("format_version", 99))
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, str(broken / MANIFEST_NAME), "version 99", "upgrade cicada")
    assert not y.exists()


def test_missing_manifest(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    (broken / MANIFEST_NAME).unlink()
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, str(broken / MANIFEST_NAME), "made by `cicada pack`")
    assert not y.exists()


def test_manifest_not_json(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    (broken / MANIFEST_NAME).write_text('{"format": "cicada-package", ')
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    for outcome in (run, verify):
        assert_clean_failure(outcome, str(broken / MANIFEST_NAME), "not valid JSON")
    assert not y.exists()


def test_config_the_factory_rejects(broken: Path, x_npy: Path, tmp_path: Path) -> None:
    edit_manifest(broken, lambda d: d["architecture"]["config"].__setitem__("n_embdd", 32))
    y = tmp_path / "y.npy"
    run, verify = run_and_verify(broken, x_npy, y)
    assert not y.exists()
    for outcome in (run, verify):
        assert_clean_failure(outcome, FACTORY, "n_embdd")


# -- in-process ColdStart --------------------------------------------------------------------


def test_cold_start_flipped_byte_raises_and_never_publishes_the_stage(
    broken: Path, x: torch.Tensor
) -> None:
    index = flip_byte_in_stage(broken, CORRUPT_STAGE)
    cold = ColdStart(broken)
    events: list[ResidencyEvent] = []
    cold.subscribe(events.append)
    with pytest.raises(PackageIntegrityError, match=CORRUPT_STAGE) as info:
        cold.forward(x)
    assert str(broken / WEIGHTS_NAME) in str(info.value)
    assert index not in {e.stage for e in events}
    assert not any(e.done for e in events)
    assert not cold.is_resident(index)
    with pytest.raises(PackageIntegrityError):
        cold.wait_stage(index, timeout=10)
    with pytest.raises(PackageIntegrityError):
        cold.wait_all(timeout=10)
    # Asking again does not hand out a result either.
    with pytest.raises(PackageIntegrityError):
        cold.forward(x)


def _drain_in_thread(cold: ColdStart, timeout: float) -> tuple[bool, list[Any]]:
    """Iterate cold.residency() on a helper thread; (still running?, [events..., error])."""
    seen: list[Any] = []

    def drain() -> None:
        try:
            for event in cold.residency(timeout=timeout):
                seen.append(event)
        except BaseException as exc:  # recorded, asserted on below
            seen.append(exc)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    thread.join(timeout * 2)
    return thread.is_alive(), seen


def test_residency_iterator_raises_before_build(broken: Path) -> None:
    # No build(): the reader finds the bad stage on its own; the iterator must not wait for
    # stages that will never come.
    flip_byte_in_stage(broken, CORRUPT_STAGE)
    cold = ColdStart(broken)
    hung, seen = _drain_in_thread(cold, timeout=20)
    assert not hung, "residency() hung on a corrupt package"
    assert seen, "residency() ended without an event or an error"
    assert isinstance(seen[-1], PackageIntegrityError), seen
    assert CORRUPT_STAGE in str(seen[-1])


def test_residency_iterator_raises_after_failed_forward(broken: Path, x: torch.Tensor) -> None:
    flip_byte_in_stage(broken, CORRUPT_STAGE)
    cold = ColdStart(broken)
    with pytest.raises(PackageIntegrityError):
        cold.forward(x)
    hung, seen = _drain_in_thread(cold, timeout=20)
    assert not hung, "residency() hung after a failed cold start"
    # Past events are replayed (the stages before the corrupt one), then the error.
    assert isinstance(seen[-1], PackageIntegrityError), seen
    assert all(isinstance(e, ResidencyEvent) for e in seen[:-1])
    assert CORRUPT_STAGE not in [e.name for e in seen[:-1]]


def test_all_resident_false_after_failure(broken: Path, x: torch.Tensor) -> None:
    flip_byte_in_stage(broken, CORRUPT_STAGE)
    cold = ColdStart(broken)
    with pytest.raises(PackageIntegrityError):
        cold.forward(x)
    assert not cold.all_resident


def test_cold_start_truncated_fails_at_open(broken: Path) -> None:
    weights = broken / WEIGHTS_NAME
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1)
    with pytest.raises(PackageIntegrityError, match="truncated") as info:
        ColdStart(broken)
    assert str(weights) in str(info.value)


def test_cold_start_shape_mismatch_fails_at_build(broken: Path) -> None:
    edit_manifest(broken, lambda d: d["architecture"]["config"].__setitem__("n_embd", 32))
    cold = ColdStart(broken)
    with pytest.raises(PackageMismatchError, match=r"tensor transformer\.wte\.weight"):
        cold.build()


def test_cold_start_publishes_one_event_per_stage(
    pristine: Path, x: torch.Tensor, expected: torch.Tensor
) -> None:
    cold = ColdStart(pristine)
    manifest = cold.manifest
    events: list[ResidencyEvent] = []
    # Stages are published once applied, which needs the model: subscribing before build()
    # sees them all.
    cold.subscribe(events.append)
    out = cold.forward(x)
    assert torch.equal(out, expected)
    n = len(manifest.stages)
    assert sorted(e.stage for e in events) == list(range(n)), "one event per stage"
    assert [e.resident_stages for e in events] == list(range(1, n + 1))
    assert all(e.total_stages == n and e.total_bytes == manifest.total_bytes for e in events)
    assert [e.done for e in events] == [False] * (n - 1) + [True]
    last = events[-1]
    assert last.resident_bytes == last.total_bytes == manifest.total_bytes
    assert sum(e.nbytes for e in events) == manifest.total_bytes
    for e in events:
        stage = manifest.stages[e.stage]
        assert (e.name, e.nbytes) == (stage.name, stage.nbytes)
    assert cold.all_resident
    # Once everything is resident the iterator replays the past events and ends at once.
    hung, seen = _drain_in_thread(cold, timeout=10)
    assert not hung and seen == events
