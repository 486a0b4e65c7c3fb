"""What is in deploy/: every file, and every YAML document in it, classified for a validator.

`inventory()` walks deploy/ and returns one `Item` per file, or per YAML document for
Kubernetes manifests. `Item.kind` decides which validators in test_manifests.py must pass for
it; a file or document this module cannot classify gets kind "unknown", and the coverage test
fails for it (so nothing in deploy/ can go unvalidated by being new).

Also here: the checks that several validators share: container commands against the real
`cicada` command line, and small accessors for pod specs.
"""

from __future__ import annotations

import configparser
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Kubernetes version the core objects are validated against (kubernetes-validate ships
# schemas for 1.25 to 1.37); a version GPU clusters commonly run in 2026.
KUBERNETES_VERSION = "1.33"

# Options the manifests pass that the command line does not have yet: proposed in
# docs/deploy.md and allowed here only while the command lacks them. (None at present.)
PROPOSED_OPTIONS: set[tuple[str, str]] = set()

COMPOSE_NAMES = {"compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"}


@dataclass(frozen=True)
class Item:
    path: Path  # relative to the repository root
    index: int | None  # the document's index in a multi-document YAML file
    kind: str
    data: Any = None

    @property
    def id(self) -> str:
        name = self.path.as_posix()
        if self.index is None:
            return name
        what = ""
        if isinstance(self.data, dict):
            what = f":{self.data.get('kind')}/{(self.data.get('metadata') or {}).get('name')}"
        return f"{name}#{self.index}{what}"

    @property
    def file(self) -> Path:
        return ROOT / self.path


def classify_document(doc: Any) -> str:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return "unknown"
    api = str(doc["apiVersion"])
    group = api.rpartition("/")[0] if "/" in api else ""
    if group == "serving.knative.dev":
        return "knative"
    if group == "ray.io" and doc["kind"] == "RayService":
        return "rayservice"
    # Core API groups: "" (v1), apps, batch, policy, autoscaling, *.k8s.io. Anything else is
    # a custom resource that needs its own validator.
    if "." not in group or group.endswith(".k8s.io"):
        return "k8s"
    return "unknown"


def classify_file(path: Path) -> str:
    name = path.name
    if name.endswith(".Dockerfile") or name == "Dockerfile":
        return "dockerfile"
    if name.endswith(".dockerignore"):
        return "dockerignore"
    if name.endswith("-requirements.txt"):
        return "requirements"
    if path.suffix == ".service":
        return "systemd-unit"
    if path.suffix == ".env":
        return "env-file"
    if name in COMPOSE_NAMES:
        return "compose"
    if path.suffix in (".yaml", ".yml"):
        return "manifests"  # split into documents
    return "unknown"


@cache
def inventory() -> tuple[Item, ...]:
    items: list[Item] = []
    for file in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        rel = file.relative_to(ROOT)
        kind = classify_file(file)
        if kind != "manifests":
            data = yaml.safe_load(file.read_text()) if kind == "compose" else None
            items.append(Item(rel, None, kind, data))
            continue
        try:
            docs = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as exc:
            items.append(Item(rel, None, "unknown", f"not YAML: {exc}"))
            continue
        for index, doc in enumerate(docs):
            if doc is None:  # an empty document between two `---`
                continue
            items.append(Item(rel, index, classify_document(doc), doc))
    return tuple(items)


def items_of(kind: str) -> list[Item]:
    return [item for item in inventory() if item.kind == kind]


def item_ids(items: list[Item]) -> list[str]:
    return [item.id for item in items]


# -- pod specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodSpec:
    """A pod spec found in a manifest, with where it was found."""

    where: str
    spec: dict[str, Any]
    metadata: dict[str, Any]
    runs_cicada: bool  # its containers run the image's `cicada ROLE` entry point


def pod_specs(item: Item) -> Iterator[PodSpec]:
    doc = item.data
    kind = doc["kind"]
    workload = item.kind == "k8s" and kind in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    if workload or item.kind == "knative":
        template = doc["spec"]["template"]
        yield PodSpec(f"{item.id} spec.template", template["spec"],
                      template.get("metadata") or {}, True)  # fmt: skip
    elif item.kind == "rayservice":
        # KubeRay replaces the containers' command with `ray start ...`: no cicada CLI here.
        cluster = doc["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]["template"]
        yield PodSpec(f"{item.id} headGroupSpec", head["spec"], head.get("metadata") or {}, False)
        for group in cluster.get("workerGroupSpecs") or []:
            template = group["template"]
            yield PodSpec(f"{item.id} workerGroupSpecs[{group['groupName']}]", template["spec"],
                          template.get("metadata") or {}, False)  # fmt: skip


# Kinds that carry a pod template `pod_specs` does not read: one in deploy/ is an error, not
# a pod that escapes the pod-security checks.
UNREAD_POD_KINDS = {"Pod", "PodTemplate", "ReplicaSet", "ReplicationController", "CronJob"}

# Kubernetes' "restricted" Pod Security Standard: the volume types it admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}  # fmt: skip


def restricted_violations(
    spec: dict[str, Any], where: str, extra: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """What keeps a pod spec from Kubernetes' "restricted" Pod Security Standard, plus this
    project's rule that every container's root filesystem is read-only (what a process
    writes goes to a mounted volume). A container's securityContext overrides the pod's.
    `extra`: containers that an operator adds to the pod (KubeRay's autoscaler sidecar), by
    name, as the securityContext they will get."""
    problems: list[str] = []
    pod = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}: {key}")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume.get('name')}: {sorted(kinds)}")
    containers = [
        (c.get("name"), c.get("securityContext") or {}, c)
        for c in [*(spec.get("initContainers") or []), *spec.get("containers", [])]
    ]
    containers += [(name, sc, {}) for name, sc in (extra or {}).items()]  # fmt: skip
    for name, own, container in containers:
        at = f"{where} container {name}"

        def effective(key: str, own: dict[str, Any] = own) -> Any:
            return own[key] if key in own else pod.get(key)

        if effective("runAsNonRoot") is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            problems.append(f"{at}: runAsUser 0")
        if own.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if own.get("privileged"):
            problems.append(f"{at}: privileged")
        caps = own.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{at}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{at}: capabilities.add {caps['add']}")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: seccompProfile.type is {seccomp}, not RuntimeDefault")
        if container and own.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{at}: hostPort {port['hostPort']}")
    return problems


def extra_containers(item: Item, pod: PodSpec) -> dict[str, dict[str, Any]]:
    """Containers an operator adds to this pod: KubeRay's autoscaler sidecar on the head of
    a RayService with in-tree autoscaling, with autoscalerOptions.securityContext."""
    if item.kind != "rayservice" or not pod.where.endswith("headGroupSpec"):
        return {}
    cluster = item.data["spec"]["rayClusterConfig"]
    if not cluster.get("enableInTreeAutoscaling"):
        return {}
    options = cluster.get("autoscalerOptions") or {}
    return {"autoscaler": dict(options.get("securityContext") or {})}


# -- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    base_images: tuple[str, ...]  # with ARG defaults filled in
    build_args: dict[str, str]  # ARG defaults
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    runs: tuple[str, ...]  # RUN instructions, continuation lines joined
    copies: tuple[tuple[str, ...], ...]  # COPY sources
    user: str | None

    @property
    def role(self) -> str | None:
        """The `cicada` subcommand the ENTRYPOINT runs."""
        words = list(self.entrypoint)
        if "cicada" in words and words.index("cicada") + 1 < len(words):
            return words[words.index("cicada") + 1]
        return None


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""
    if logical:
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()


def _exec_form(value: str) -> tuple[str, ...]:
    import json

    if value.startswith("["):
        return tuple(json.loads(value))
    return tuple(shlex.split(value))


def parse_dockerfile(path: Path) -> Dockerfile:
    bases, runs, copies = [], [], []
    build_args: dict[str, str] = {}
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user = None
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            build_args[name.strip()] = default.strip().strip("\"'")
        elif keyword == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args.get(m.group(1), ""),
                           rest.split()[0])  # fmt: skip
            bases.append(image)
        elif keyword == "RUN":
            runs.append(rest)
        elif keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            copies.append(tuple(words[:-1]))
        elif keyword == "ENTRYPOINT":
            entrypoint = _exec_form(rest)
        elif keyword == "CMD":
            cmd = _exec_form(rest)
        elif keyword == "USER":
            user = rest
    return Dockerfile(path, tuple(bases), build_args, entrypoint, cmd, tuple(runs), tuple(copies),
                      user)  # fmt: skip


# Image names the manifests use, and the Dockerfile (and build arguments) that makes each.
IMAGES = {
    "cicada/coordinator": ("coordinator.Dockerfile", ""),
    "cicada/edge-agent": ("edge-agent.Dockerfile", ""),
    "cicada/cloud-worker": ("cloud-worker.Dockerfile", ""),
    "cicada/cloud-worker-ray": ("cloud-worker.Dockerfile", "CICADA_EXTRAS='[ray]'"),
}


def image_source(image: str) -> tuple[Dockerfile, str]:
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if name not in IMAGES:
        raise AssertionError(f"image {image!r} is made by no Dockerfile in deploy/docker "
                             f"(known: {sorted(IMAGES)})")  # fmt: skip
    dockerfile, build_args = IMAGES[name]
    return parse_dockerfile(DEPLOY / "docker" / dockerfile), build_args


# -- the cicada command line ----------------------------------------------------------------


def check_cicada_args(role: str, args: list[str], where: str) -> dict[str, str | bool]:
    """Check `cicada ROLE ARGS` against the real command: every option exists (or is a
    proposed one the command lacks so far), takes a value when it needs one, and every required
    option is given. Returns the options given, by their first long name."""
    from cicada.cli import main as cli

    commands = cli.commands  # type: ignore[attr-defined]
    assert role in commands, f"{where}: `cicada {role}` is no command (have {sorted(commands)})"
    command = commands[role]
    by_name: dict[str, Any] = {}
    for param in command.params:
        for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
            by_name[opt] = param
    given: dict[str, str | bool] = {}
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-"):
            raise AssertionError(f"{where}: `cicada {role}` takes no argument {word!r}")
        name, eq, inline = word.partition("=")
        param = by_name.get(name)
        if param is None:
            if (role, name) in PROPOSED_OPTIONS:
                value: str | bool = inline if eq else (words[i] if i < len(words) else "")
                i += 0 if eq else 1
                given[name] = value
                continue
            raise AssertionError(f"{where}: `cicada {role}` has no option {name}")
        if getattr(param, "is_flag", False) and not eq:
            given[param.opts[0]] = True
            continue
        if not eq:
            assert i < len(words), f"{where}: {name} needs a value"
            inline = words[i]
            i += 1
        if not re.search(r"\$\(?\{?\w", inline):  # values filled in at run time are unchecked
            type_name = getattr(param.type, "name", "")
            if type_name in ("integer", "float"):
                param.type.convert(inline, param, None)
        given[param.opts[0]] = inline
    for param in command.params:
        if getattr(param, "required", False):
            assert param.opts[0] in given, f"{where}: `cicada {role}` needs {param.opts[0]}"
    return given


# -- manifest helpers shared by the tests -----------------------------------------------------


def secret_items() -> list[Item]:
    return [i for i in items_of("k8s") if i.data["kind"] == "Secret"]


def as_pod_template(spec: dict[str, Any], metadata: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": {"metadata": metadata, "spec": spec},
    }


def only(items: list[Item], kind: str, name: str) -> Item:
    found = [i for i in items if i.data["kind"] == kind and i.data["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/, found {len(found)}"
    return found[0]


def container_args(container: dict[str, Any]) -> list[str]:
    """The container's args with $(VAR) references to its env filled in, as the kubelet does."""
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
            for arg in container.get("args", [])]  # fmt: skip


def main_container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = spec["containers"]
    assert len(containers) == 1, "one container per pod: the role's"
    return dict(containers[0])


def read_requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, eq, value = line.partition("=")
        assert eq and re.fullmatch(r"[A-Za-z_]\w*", key.strip()), f"{path}:{n}: not KEY=VALUE"
        env[key.strip()] = value.strip().strip("\"'")
    return env


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ${VAR} is one word, a lone $VAR splits into words."""
    words: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), word))
    return words


def env_file_for(unit_item: Item) -> Path:
    unit = read_unit(unit_item.file)
    target = Path(unit["Service"]["EnvironmentFile"].lstrip("-"))
    local = unit_item.file.with_name(target.name)
    assert local.is_file(), f"{unit_item.id}: no template {local.name} for {target} beside it"
    return local
