"""The roles run as deploy/ describes them: real processes on loopback, with CURVE.

The commands come from the manifests themselves, not from a copy: the coordinator's from
deploy/k8s/coordinator.yaml, the edge agent's from deploy/systemd/cicada-edge.service with
deploy/systemd/edge.env, the cloud worker's from deploy/knative/cloud-worker.yaml. Only what
cannot exist here is changed: addresses become loopback ports, mounted paths become temporary
directories holding keys made by `cicada keys` under the names the Secrets use, `--device cuda`
becomes cpu without a GPU, and a proposed option the CLI lacks so far is dropped.

The coordinator and the edge agent run with nothing importable but what their images install
(deploy/docker/*-requirements.txt and their dependencies; tests/deploy/slim_guard.py), which
is how these tests know the torch-free images can run their roles. No container, cluster or
Docker engine is involved: that part is validated offline by test_manifests.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cicada.client import Client, CurveConfig
from cicada.testing import ROOT, Stack, curve_handshake, free_port
from tests.deploy.inventory import (
    DEPLOY,
    PROPOSED_OPTIONS,
    container_args,
    env_file_for,
    expand_exec,
    items_of,
    main_container,
    only,
    pod_specs,
    read_env_file,
    read_requirements,
    read_unit,
    secret_items,
)

MODEL = "gpt2"


def requirement_closure(requirements: Path) -> set[str]:
    """The distributions a `pip install -r requirements` brings: the listed ones and,
    recursively, what they require (no extras)."""
    todo = [canonicalize_name(r.name) for r in read_requirements(requirements)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{requirements.name} needs {name}, which is not installed here")
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def image_modules(requirements: Path) -> list[str]:
    dists = requirement_closure(requirements)
    return sorted(
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(owner) in dists for owner in owners)
    )


def test_the_guard_refuses_what_an_image_lacks(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked.log"
    env = dict(os.environ, CICADA_IMAGE_MODULES=json.dumps(["click"]),
               CICADA_IMAGE_BLOCKED_LOG=str(blocked))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tests.deploy.slim_guard", "coordinator", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # --help imports no role
    done = subprocess.run(
        [sys.executable, "-m", "tests.deploy.slim_guard", "coordinator", "--bind",
         "tcp://127.0.0.1:0", "--metrics", "off"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "not in this image" in done.stderr
    # The first module the coordinator needs and the image lacks stops it (numpy, zmq or
    # msgpack: each is in deploy/docker/coordinator-requirements.txt).
    assert {"numpy", "zmq", "msgpack"} & set(blocked.read_text().split())


# -- materializing the manifests --------------------------------------------------------------


def secret_files(secret_name: str, keys: Path, into: Path) -> Path:
    """A Secret's volume as the kubelet would mount it, with the real key files that
    `cicada keys` wrote under the names the Secret's data uses."""
    secret = next(s.data for s in secret_items() if s.data["metadata"]["name"] == secret_name)
    into.mkdir(parents=True)
    for key in secret["data"]:
        source = keys / key
        assert source.is_file(), f"Secret {secret_name} holds {key}: `cicada keys` made none"
        (into / key).write_bytes(source.read_bytes())
    return into


def remap(args: list[str], paths: dict[str, Path]) -> list[str]:
    """Replace in-container paths by local ones (longest prefix first, whole components),
    also the PATH of a `--worker-keys ROLE:MODELS:PATH` value."""
    out = []
    for arg in args:
        head, path = ("", arg) if arg.startswith("/") else arg.rpartition(":")[::2]
        head += ":" if head else ""
        for prefix in sorted(paths, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                arg = head + str(paths[prefix]) + path[len(prefix) :]
                break
        out.append(arg)
    return out


def set_option(args: list[str], name: str, value: str) -> list[str]:
    i = args.index(name)
    return [*args[: i + 1], value, *args[i + 2 :]]


def has_option(role: str, name: str) -> bool:
    from cicada.cli import main as cli

    command = cli.commands[role]  # type: ignore[attr-defined]
    return any(name in getattr(p, "opts", []) for p in command.params)


def drop_proposed(role: str, args: list[str]) -> list[str]:
    """Leave out proposed options (and their values) the command does not have yet."""
    out, i = [], 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if (role, name) in PROPOSED_OPTIONS and not has_option(role, name):
            i += 1 if eq else 2
            continue
        out.append(args[i])
        i += 1
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs made by the real `cicada keys`, named as in deploy/k8s/curve-secret.yaml."""
    out = tmp_path_factory.mktemp("keys")
    names = sorted({Path(k).stem for s in secret_items() for k in s.data["data"]})
    subprocess.run([sys.executable, "-m", "cicada", "keys", "--out", str(out),
                    *[f"--name={n}" for n in names]],
                   cwd=ROOT, check=True, capture_output=True, timeout=60)  # fmt: skip
    return out


def start(stack: Stack, name: str, args: list[str], image: str | None) -> None:
    """Start `cicada ARGS`; with `image`, only that image's modules are importable."""
    log = open(stack.work / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if image is None:
        command = [sys.executable, "-m", "cicada", *args]
    else:
        requirements = DEPLOY / "docker" / f"{image}-requirements.txt"
        env["CICADA_IMAGE_MODULES"] = json.dumps(image_modules(requirements))
        env["CICADA_IMAGE_BLOCKED_LOG"] = str(stack.work / f"{name}.blocked")
        command = [sys.executable, "-m", "tests.deploy.slim_guard", *args]
    stack.procs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=env,
                                         start_new_session=True)  # fmt: skip


def blocked(stack: Stack, name: str) -> set[str]:
    path = stack.work / f"{name}.blocked"
    return set(path.read_text().split()) if path.exists() else set()


def coordinator_args(stack: Stack, keys: Path) -> list[str]:
    deployment = only(items_of("k8s"), "Deployment", "cicada-coordinator").data
    spec = deployment["spec"]["template"]["spec"]
    container = main_container(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {
        m["mountPath"]: secret_files(volumes[m["name"]]["secret"]["secretName"], keys,
                                     stack.work / "coordinator" / m["name"])
        for m in container["volumeMounts"]
    }  # fmt: skip
    args = remap(container_args(container), mounts)
    args = set_option(args, "--bind", stack.address)
    return set_option(args, "--metrics", f"127.0.0.1:{stack.metrics_port}")


def edge_args(stack: Stack, keys: Path, tiny_package: dict[str, Path]) -> list[str]:
    unit_item = items_of("systemd-unit")[0]
    env = read_env_file(env_file_for(unit_item))
    env["CICADA_ONNX"] = str(tiny_package["edge"])
    env["CICADA_COORDINATOR"] = stack.address
    words = expand_exec(read_unit(unit_item.file)["Service"]["ExecStart"], env)
    assert words[1] == "edge"
    return remap(words[1:], {"/etc/cicada/keys": keys})


def cloud_args(stack: Stack, keys: Path, tiny_package: dict[str, Path]) -> list[str]:
    (pod,) = pod_specs(items_of("knative")[0])
    container = main_container(pod.spec)
    volumes = {v["name"]: v for v in pod.spec["volumes"]}
    paths: dict[str, Path] = {}
    for m in container["volumeMounts"]:
        volume = volumes[m["name"]]
        if "secret" in volume:
            paths[m["mountPath"]] = secret_files(volume["secret"]["secretName"], keys,
                                                 stack.work / "cloud" / m["name"])  # fmt: skip
        elif "emptyDir" in volume:  # scratch space (/tmp): a fresh directory
            paths[m["mountPath"]] = stack.work / "cloud" / m["name"]
            paths[m["mountPath"]].mkdir(parents=True)
        else:  # the models volume: /models/gpt2 is the package
            (stack.work / "models").mkdir()
            (stack.work / "models" / MODEL).symlink_to(tiny_package["package"])
            paths[m["mountPath"]] = stack.work / "models"
    args = remap(container_args(container), paths)
    args = set_option(args, "--coordinator", stack.address)
    import torch

    if not torch.cuda.is_available():
        args = set_option(args, "--device", "cpu")
    if "--health-port" in args:  # Knative's 8080 may be taken here: the same endpoint elsewhere
        args = set_option(args, "--health-port", str(free_port()))
    if "--health-host" in args:  # the pod's 0.0.0.0 is this machine's every address: loopback
        args = set_option(args, "--health-host", "127.0.0.1")
    return ["cloud", *drop_proposed("cloud", args), "--heartbeat", str(stack.heartbeat)]


def health(args: list[str], path: str) -> tuple[int, dict[str, object]]:
    """GET the cloud worker's health endpoint (the port its --health-port names)."""
    import urllib.error
    import urllib.request

    port = args[args.index("--health-port") + 1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def client_keys(keys: Path) -> CurveConfig:
    server, _ = zmq.auth.load_certificate(str(keys / "coordinator.key"))
    public, secret = zmq.auth.load_certificate(str(keys / "client1.key_secret"))
    assert secret is not None
    return CurveConfig(server_public_key=server, public_key=public, secret_key=secret)


# -- the stack --------------------------------------------------------------------------------


def test_the_manifests_commands_run_a_curve_stack_on_loopback(
    stack: Stack, keys: Path, tiny_package: dict[str, Path]
) -> None:
    x = np.load(tiny_package["input"])
    start(stack, "coordinator", ["coordinator", *coordinator_args(stack, keys)], "coordinator")
    stack.wait_for(lambda s: True, what="the coordinator's metrics endpoint", timeout=30)
    start(stack, "edge", edge_args(stack, keys, tiny_package), "edge")
    try:
        stack.wait_workers("edge", 1, timeout=60)
    except TimeoutError:
        pytest.fail(f"the edge agent never registered:\n{stack.log('edge')}")
    with Client(stack.address, timeout=30, curve=client_keys(keys)) as client:
        result = client.invoke(MODEL, x, priority=0)
        assert result.served_by["role"] == "edge"

        cloud = cloud_args(stack, keys, tiny_package)
        start(stack, "cloud", cloud, None)
        try:
            stack.wait_workers("cloud", 1, state="ready", timeout=120)
        except TimeoutError:
            pytest.fail(f"the cloud worker never became ready:\n{stack.log('cloud')}")
        result = client.invoke(MODEL, x, priority=2)
        assert result.served_by["role"] == "cloud"
        # The probes the Knative Service points at the worker (docs/deploy.md's table).
        if "--health-port" in cloud:
            code, body = health(cloud, "/ready")
            assert code == 200 and body["resident_stages"] == body["total_stages"], body
            code, body = health(cloud, "/healthz")
            assert code == 200 and body["error"] is None, body

    # What the torch-free images lack, these roles never tried to import.
    for name in ("coordinator", "edge"):
        assert "torch" not in blocked(stack, name), f"{name} tried to import torch"
    # SIGTERM (the images' STOPSIGNAL, systemd's KillSignal, Kubernetes' stop): every role
    # drains and exits cleanly within its grace period.
    for name in ("cloud", "edge", "coordinator"):
        proc = stack.procs[name]
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not stop within 30 s of SIGTERM:\n{stack.log(name)}")
        assert code == 0, f"{name} exited {code} on SIGTERM:\n{stack.log(name)}"


def test_a_peer_missing_from_the_allow_list_is_refused(
    stack: Stack, keys: Path, tiny_package: dict[str, Path]
) -> None:
    """The allow-list Secret is what admits peers: a key pair not in it gets no answer."""
    start(stack, "coordinator", ["coordinator", *coordinator_args(stack, keys)], "coordinator")
    stack.wait_for(lambda s: True, what="the coordinator's metrics endpoint", timeout=30)
    server, _ = zmq.auth.load_certificate(str(keys / "coordinator.key"))
    public, secret = zmq.curve_keypair()
    stranger = CurveConfig(server_public_key=server, public_key=public, secret_key=secret)
    from cicada.errors import BadRequest, KeyRefused

    x = np.load(tiny_package["input"])
    # The control: within the same 2 s an allowed client is answered (BAD_REQUEST: no worker
    # has registered the model, said by the coordinator), so the stranger's refusal is not a
    # slow coordinator.
    with (
        Client(stack.address, timeout=2, curve=client_keys(keys)) as allowed,
        pytest.raises(BadRequest, match="unknown model") as answered,
    ):
        allowed.invoke(MODEL, x, priority=0)
    assert answered.value.request_id
    assert curve_handshake(stack.address, client_keys(keys)) == "accepted"
    with (
        Client(stack.address, timeout=2, curve=stranger) as client,
        pytest.raises(KeyRefused, match="allow-list"),
    ):
        client.invoke(MODEL, x, priority=0)  # the handshake fails: the SDK says why
    # ... because the allow-list refused the key (libzmq's handshake outcome, peer side).
    assert curve_handshake(stack.address, stranger) == "refused"


def test_placeholder_secrets_stop_the_coordinator(stack: Stack, tmp_path: Path) -> None:
    """Applying deploy/k8s/curve-secret.yaml as it is (placeholders) must not run open."""
    import base64

    placeholder = tmp_path / "placeholder-keys"
    placeholder.mkdir()
    for item in secret_items():
        for key, value in item.data["data"].items():
            (placeholder / key).write_bytes(base64.b64decode(value))
    args = coordinator_args(stack, placeholder)
    done = subprocess.run([sys.executable, "-m", "cicada", "coordinator", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert re.search(r"key", done.stderr, re.I), done.stderr[-2000:]
