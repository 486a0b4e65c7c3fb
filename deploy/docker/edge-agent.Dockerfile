# syntax=docker/dockerfile:1
#
# Cicada edge agent: serves a small ONNX model through the coordinator (`cicada edge`).
# No torch in this image: the edge runtime's dependencies come from edge-requirements.txt and
# the project is installed with --no-deps. Build from the repository root:
#
#   docker build -f deploy/docker/edge-agent.Dockerfile -t cicada/edge-agent:0.1.0 .
#   docker run --rm -v /srv/cicada/edge:/models/edge:ro cicada/edge-agent:0.1.0 \
#       --model gpt2 --onnx /models/edge/gpt2 --coordinator tcp://COORDINATOR:5555
#
# The model directory comes from `cicada export-edge` and is mounted at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1 forwards SIGTERM to the agent (which then drains) and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cicada
COPY deploy/docker/edge-requirements.txt /tmp/edge-requirements.txt
RUN pip install --no-cache-dir -r /tmp/edge-requirements.txt

COPY pyproject.toml README.md ./
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY cicada ./cicada
# --no-deps: never let pip pull torch in through the project's own dependency list; the build
# fails if torch is importable anyway, and proves the entry point starts.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && cicada edge --help > /dev/null

RUN groupadd --system --gid 10001 cicada \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent cicada
USER 10001:10001

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "cicada", "edge"]
CMD ["--model", "gpt2", "--onnx", "/models/edge/gpt2", "--coordinator", "tcp://coordinator:5555"]
