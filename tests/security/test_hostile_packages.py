"""Hostile packages: each is a real `cicada pack` output, then tampered with as an attacker
would (re-sealing the manifest's sha256 where that is needed to reach the check under test).

`cicada pack --verify` and `cicada run` (fresh processes) must end in exit status 2 with one
`error:` line that names the problem, never a traceback, never a hang; no code the package names
runs (the sentinel its factory would create does not exist); a cloud worker whose load fails
says so and exits instead of staying "loading". docs/PACKAGE.md, "Threat model".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada.cloud.loading.cpu import CpuStageSource, WeightReader
from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.cloud.pipeline import ColdStart
from cicada.common.errors import (
    LoadStalledError,
    PackageError,
    PackageFormatError,
    PackageIntegrityError,
    UntrustedCodeError,
)
from cicada.common.factory import resolve_factory, trust_package_code
from cicada.common.package import (
    MANIFEST_HASH_FIELD,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SAFETENSORS_HEADER,
    WEIGHTS_NAME,
    Manifest,
    read_safetensors_header,
    write_manifest_doc,
)
from cicada.testing import Stack

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "cicada.cloud.models.gpt2:build"
CONFIG = gpt2.tiny_config()
PROC_TIMEOUT = 180  # generous: a hang (a FIFO, a wedged reader) is what these bound


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "gpt2"
    pack(FACTORY, out, config=CONFIG)
    return out


@pytest.fixture(scope="module")
def x_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "x.npy"
    np.save(path, gpt2.example_input(CONFIG).numpy())
    return path


@pytest.fixture
def pkg(pristine: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "pkg"
    shutil.copytree(pristine, dest)
    return dest


def doc_of(pkg: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((pkg / MANIFEST_NAME).read_text())
    return doc


def reseal(pkg: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest and recompute its sha256, as an attacker can."""
    doc = doc_of(pkg)
    change(doc)
    write_manifest_doc(pkg, doc)


def rewrite_weights(pkg: Path, body: bytes) -> None:
    """Replace the weights file and record its new size and sha256 (re-sealed)."""
    (pkg / WEIGHTS_NAME).write_bytes(body)

    def files(doc: dict[str, Any]) -> None:
        doc["files"][WEIGHTS_NAME] = {
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
        }  # fmt: skip

    reseal(pkg, files)


def same_length_header(raw: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """`raw` (a weights file) with its header edited and padded back to its old length."""
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)  # room for the edit
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= size, "the edit must not grow the header"
    return raw[:8] + new + b" " * (size - len(new)) + raw[8 + size :]


@dataclass
class Outcome:
    returncode: int
    stderr: str


def cicada(*args: str | Path, timeout: float = PROC_TIMEOUT) -> Outcome:
    proc = subprocess.run(
        [sys.executable, "-m", "cicada", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return Outcome(proc.returncode, proc.stderr)


def run_and_verify(pkg: Path, x_npy: Path, tmp_path: Path, *extra: str) -> list[Outcome]:
    """`cicada run` and `cicada pack --verify --check-model`, side by side; both bounded."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cicada", *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (
            ("run", pkg, "--input", x_npy, "--out", tmp_path / "y.npy", *extra),
            ("pack", "--verify", pkg, "--check-model", *extra),
        )
    ]
    outcomes = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outcomes.append(Outcome(proc.returncode, err))
    return outcomes


def assert_refused(outcomes: list[Outcome], *needles: str) -> None:
    for outcome in outcomes:
        assert outcome.returncode == 2, outcome.stderr
        assert "Traceback" not in outcome.stderr, outcome.stderr
        assert "error:" in outcome.stderr, outcome.stderr
        for needle in needles:
            assert needle in outcome.stderr, f"{needle!r} not in: {outcome.stderr}"


# -- code: the factory is data --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "config"),
    [
        ("subprocess:run", {"args": "touch {sentinel}", "shell": True}),
        ("os:system", {"command": "touch {sentinel}"}),
    ],
    ids=["subprocess.run", "os.system"],
)
def test_a_factory_outside_the_allow_list_never_runs(
    pkg: Path, x_npy: Path, tmp_path: Path, factory: str, config: dict[str, Any]
) -> None:
    sentinel = tmp_path / "pwned"
    config = {k: v.format(sentinel=sentinel) if isinstance(v, str) else v
              for k, v in config.items()}  # fmt: skip
    reseal(pkg, lambda d: d["architecture"].update(factory=factory, config=config))
    outcomes = run_and_verify(pkg, x_npy, tmp_path)
    outcomes.append(cicada("export-edge", "--package", pkg, "--out", tmp_path / "edge"))
    assert_refused(outcomes, factory, "--trust-package-code")
    assert not sentinel.exists()
    assert not (tmp_path / "y.npy").exists() and not (tmp_path / "edge").exists()


def test_the_trust_flag_lets_an_outside_factory_run(pkg: Path, tmp_path: Path) -> None:
    # Positive control: with the operator's flag, the package's code does run (here it
    # creates the sentinel, then is refused for not returning a model).
    sentinel = tmp_path / "ran"
    reseal(pkg, lambda d: d["architecture"].update(
        factory="os:system", config={"command": f"touch {sentinel}"}))  # fmt: skip
    out = cicada("pack", "--verify", pkg, "--check-model", "--trust-package-code")
    assert out.returncode == 2 and "returned int, not nn.Module" in out.stderr, out.stderr
    assert sentinel.exists()


def test_a_trusted_custom_factory_serves(tmp_path: Path, x_npy: Path) -> None:
    custom = tmp_path / "custom"
    pack("tests.security.faulty_model:build", custom, config=CONFIG)  # my own code: no flag
    refused = cicada("run", custom, "--input", x_npy, "--out", tmp_path / "a.npy")
    assert refused.returncode == 2 and "tests.security.faulty_model:build" in refused.stderr
    ok = cicada("run", custom, "--input", x_npy, "--out", tmp_path / "b.npy",
                "--trust-package-code")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "b.npy").shape[0] == 1


def test_the_resolver_refuses_before_importing() -> None:
    name = "tests.security._never_imported"
    with pytest.raises(UntrustedCodeError, match="--trust-package-code"):
        resolve_factory(f"{name}:build")
    assert name not in sys.modules
    with trust_package_code():
        _, fn = resolve_factory("tests.security.faulty_model:build")
    assert callable(fn)
    # Older names of Cicada's own builders stay allowed.
    resolve_factory("cloud.models.gpt2:build")


# -- the manifest is sealed -----------------------------------------------------------------------


def test_an_edited_manifest_is_refused(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    doc = doc_of(pkg)
    doc["architecture"]["config"]["n_layer"] = 1  # edited, not re-sealed
    (pkg / MANIFEST_NAME).write_text(json.dumps(doc))
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), MANIFEST_HASH_FIELD, "edited")


def test_a_manifest_without_its_hash_loads_with_a_warning(
    pkg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = doc_of(pkg)
    del doc[MANIFEST_HASH_FIELD]  # as written before the field existed
    (pkg / MANIFEST_NAME).write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="cicada.package"):
        assert Manifest.load(pkg).architecture.factory == FACTORY
    assert MANIFEST_HASH_FIELD in caplog.text and "re-pack" in caplog.text


# -- paths are confined ---------------------------------------------------------------------------


def _weights_elsewhere(pkg: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(pkg / WEIGHTS_NAME, outside)

    def point(doc: dict[str, Any]) -> None:
        doc["files"][name] = doc["files"].pop(WEIGHTS_NAME)
        doc["weights"] = name

    reseal(pkg, point)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "files-entry"])
def test_paths_out_of_the_package_are_refused(
    pkg: Path, x_npy: Path, tmp_path: Path, kind: str
) -> None:
    if kind == "absolute":
        _weights_elsewhere(pkg, tmp_path, str(tmp_path / "outside.safetensors"))
    elif kind == "dotdot":
        _weights_elsewhere(pkg, tmp_path, "../outside.safetensors")
    else:
        (tmp_path / "secret").write_text("not the package's")
        reseal(pkg, lambda d: d["files"].__setitem__(
            "../secret", {"size": 17, "sha256": "0" * 64}))  # fmt: skip
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "leaves the package directory")


def test_a_symlink_out_of_the_package_is_refused(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    (pkg / WEIGHTS_NAME).rename(outside)
    (pkg / WEIGHTS_NAME).symlink_to(outside)
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "outside the package")


@pytest.mark.parametrize("name", [WEIGHTS_NAME, MANIFEST_NAME])
def test_a_fifo_is_refused_not_waited_on(pkg: Path, x_npy: Path, tmp_path: Path, name: str) -> None:
    (pkg / name).unlink()
    os.mkfifo(pkg / name)  # nobody ever writes to it: an open() for reading would block
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "not a regular file")


# -- byte ranges, header, sizes -------------------------------------------------------------------


def test_a_last_stage_past_the_end_of_the_file(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    reseal(pkg, lambda d: d["stages"][-1].__setitem__("end", d["stages"][-1]["end"] + 32))
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "past", "do not fit the file")


def test_offsets_shifted_into_the_header(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    def shift(doc: dict[str, Any]) -> None:
        for stage in doc["stages"]:
            stage["begin"] -= 64
            stage["end"] -= 64
            for t in stage["tensors"]:
                t["begin"] -= 64
                t["end"] -= 64

    reseal(pkg, shift)
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), str(pkg / WEIGHTS_NAME))


def test_an_alias_to_a_tensor_of_another_shape(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    reseal(pkg, lambda d: d["aliases"].__setitem__("lm_head.weight", "transformer.wpe.weight"))
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "alias lm_head.weight")


def test_deeply_nested_json(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    (pkg / MANIFEST_NAME).write_text("[" * 200_000 + "]" * 200_000)
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "nested")


def test_a_header_entry_that_is_not_an_object(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    raw = (pkg / WEIGHTS_NAME).read_bytes()
    rewrite_weights(pkg, same_length_header(
        raw, lambda h: h.__setitem__("transformer.wpe.weight", 5)))  # fmt: skip
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), "is not an object")


def test_a_tensor_beyond_the_end_of_the_file(pkg: Path, x_npy: Path, tmp_path: Path) -> None:
    raw = (pkg / WEIGHTS_NAME).read_bytes()

    def grow(header: dict[str, Any]) -> None:
        last = max(header.values(), key=lambda h: h["data_offsets"][1])
        last["data_offsets"][1] += 4096
        last["shape"] = [last["shape"][0] + 1024] if last["dtype"] == "F32" else last["shape"]

    rewrite_weights(pkg, same_length_header(raw, grow))
    assert_refused(run_and_verify(pkg, x_npy, tmp_path), str(pkg / WEIGHTS_NAME))


def test_a_huge_header_is_refused_from_its_size(tmp_path: Path) -> None:
    path = tmp_path / WEIGHTS_NAME
    size = 20 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size))
        f.write(b"{" + b" " * (size - 2) + b"}")
    start = time.perf_counter()
    with pytest.raises(PackageIntegrityError, match="too large"):
        read_safetensors_header(path)
    assert time.perf_counter() - start < 1.0
    assert size > MAX_SAFETENSORS_HEADER
    # Below the cap, the manifest's idea of the header's length is checked before reading.
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1024 * 1024))
    with pytest.raises(PackageIntegrityError, match="do not belong together"):
        read_safetensors_header(path, expected_size=64)


def test_a_huge_manifest_is_refused_from_its_size(pkg: Path) -> None:
    with open(pkg / MANIFEST_NAME, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(PackageFormatError, match="refused before parsing"):
        Manifest.load(pkg)


# -- failures on the loader's threads reach the failure path --------------------------------------


def _forward_in_thread(cold: ColdStart, x: torch.Tensor) -> BaseException | None:
    outcome: list[BaseException | None] = [None]

    def go() -> None:
        try:
            cold.build()
            cold.forward(x)
        except BaseException as exc:
            outcome[0] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the forward hung"
    return outcome[0]


def test_a_reader_thread_crash_fails_the_load(
    pristine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self: WeightReader, stage: Any) -> Any:
        raise KeyboardInterrupt("not even an Exception")

    monkeypatch.setattr(WeightReader, "_read", crash)
    cold = ColdStart(pristine)
    errors: list[Exception] = []
    cold.on_error(errors.append)
    error = _forward_in_thread(cold, gpt2.example_input(CONFIG))
    assert isinstance(error, PackageIntegrityError) and "KeyboardInterrupt" in str(error)
    assert errors and cold.error is not None


def test_a_failure_applying_a_stage_fails_the_load(
    pristine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: CpuStageSource, stage: Any) -> Any:
        raise ValueError("buffer is smaller than requested size")  # torch.frombuffer's

    monkeypatch.setattr(CpuStageSource, "tensors", broken)
    error = _forward_in_thread(ColdStart(pristine), gpt2.example_input(CONFIG))
    assert isinstance(error, PackageError) and "cannot be applied" in str(error)


def test_a_stalled_load_ends_in_an_error(pristine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WeightReader, "start", lambda self: self)  # no stage ever arrives
    cold = ColdStart(pristine, stall_timeout=1.0)
    errors: list[Exception] = []
    cold.on_error(errors.append)
    error = _forward_in_thread(cold, gpt2.example_input(CONFIG))
    assert isinstance(error, LoadStalledError) and "stuck" in str(error)
    assert errors == [error]


# -- a cloud worker whose load fails says so and exits --------------------------------------------


def _health(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def test_a_worker_whose_load_fails_reports_and_exits(pkg: Path, tmp_path: Path) -> None:
    # A corrupt stage (the reader's checksum fails) used to leave the worker "loading" until a
    # request came; it now fails at once, says so on /healthz, and exits EXIT_LOAD_FAILED.
    manifest = Manifest.load(pkg)
    stage = manifest.stages[len(manifest.stages) // 2]
    raw = bytearray((pkg / WEIGHTS_NAME).read_bytes())
    raw[(stage.begin + stage.end) // 2] ^= 0xFF
    (pkg / WEIGHTS_NAME).write_bytes(raw)
    from cicada.testing.stack import free_port

    port = free_port()
    with Stack(tmp_path) as s:
        s.coordinator()
        proc = s.cloud("gpt2", pkg, "cloud", "--health-port", str(port))
        seen: list[tuple[int, dict[str, Any]]] = []
        deadline = time.monotonic() + PROC_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if (h := _health(port)) is not None:
                seen.append(h)
            time.sleep(0.05)
        assert proc.poll() == 3, s.log("cloud")
        assert "checksum" in s.log("cloud")
        assert all(code == 500 and "checksum" in body["error"] for code, body in seen
                   if body["error"])  # fmt: skip


def test_a_worker_refuses_a_package_past_eof_at_once(pkg: Path, tmp_path: Path) -> None:
    reseal(pkg, lambda d: d["stages"][-1].__setitem__("end", d["stages"][-1]["end"] + 32))
    out = cicada("cloud", "--model", "gpt2", "--package", pkg, "--coordinator",
                 "tcp://127.0.0.1:9", timeout=120)  # fmt: skip
    assert out.returncode == 2 and "do not fit the file" in out.stderr, out.stderr
