# syntax=docker/dockerfile:1
#
# Cicada cloud worker: cold-starts a model package with the Cicada pipeline on a GPU and serves
# it through the coordinator (`cicada cloud`). Build from the repository root:
#
#   docker build -f deploy/docker/cloud-worker.Dockerfile -t cicada/cloud-worker:0.1.0 .
#
# For the KubeRay example (deploy/ray/rayservice.yaml) build with the Ray extra:
#
#   docker build -f deploy/docker/cloud-worker.Dockerfile --build-arg CICADA_EXTRAS='[ray]' \
#       -t cicada/cloud-worker-ray:0.1.0 .
#
# Models: mount `cicada pack` packages at /models (a volume: the pipeline streams weights from
# local storage, and a pull of a multi-GB image would dominate the cold start), or bake one in
# with a two-line Dockerfile `FROM cicada/cloud-worker:0.1.0` + `COPY pkg/gpt2 /models/gpt2`.
#
# PyPI's Linux x86_64 torch wheels are the CUDA builds and carry their CUDA libraries as pip
# packages, so the base image only has to match them: CUDA 13 for torch 2.13. The host needs
# an NVIDIA driver for that CUDA and the NVIDIA container toolkit.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG CICADA_EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 is 3.12; a virtual environment keeps pip away from the system's.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, on its own layer: it is most of the image and changes least often. The check
# fails the build if pip resolved a CPU-only build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; sys.exit(torch.version.cuda is None)"

WORKDIR /opt/cicada
COPY pyproject.toml README.md ./
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY cicada ./cicada
# The project itself (with its extras, if any): a local path, so there is no version to pin.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${CICADA_EXTRAS}" \
    && cicada cloud --help > /dev/null

RUN groupadd --system --gid 10001 cicada \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent cicada \
    && mkdir -p /models
USER 10001:10001

# Proposed health endpoint (see docs/deploy.md): `--health-port 8080` serves /ready (200 once
# every stage is resident) and /healthz; Knative's readiness probe uses it.
EXPOSE 8080
# On SIGTERM the worker stops taking work, finishes what it accepted and leaves (DISCONNECT).
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "cicada", "cloud"]
CMD ["--model", "gpt2", "--package", "/models/gpt2", "--coordinator", "tcp://coordinator:5555", "--device", "cuda"]
