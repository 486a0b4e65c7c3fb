# syntax=docker/dockerfile:1
#
# Cicada coordinator: routes requests between clients, edge agents and cloud workers
# (`cicada coordinator`). No torch, no onnxruntime: dependencies come from
# coordinator-requirements.txt and the project is installed with --no-deps. Build from the
# repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t cicada/coordinator:0.1.0 .
#
# Ports: 5555 (ZeroMQ ROUTER, CCD/1) and 9464 (Prometheus /metrics). The default command runs
# CURVE (docs/PROTOCOL.md section 10) with keys mounted as in deploy/k8s/coordinator.yaml:
# /etc/cicada/curve/coordinator.key_secret, client public keys in /etc/cicada/curve-clients,
# edge and cloud workers' public keys (bound to gpt2) in /etc/cicada/curve-edge and
# /etc/cicada/curve-cloud; without them it exits. Other models: pass your own
# --worker-keys ROLE:MODEL:DIR. Plain TCP on 0.0.0.0 takes an explicit --insecure (only on a
# private network), as deploy/compose.yaml does.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1 forwards SIGTERM to the coordinator and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cicada
COPY deploy/docker/coordinator-requirements.txt /tmp/coordinator-requirements.txt
RUN pip install --no-cache-dir -r /tmp/coordinator-requirements.txt

COPY pyproject.toml README.md ./
COPY common ./common
COPY cloud ./cloud
COPY edge ./edge
COPY cicada ./cicada
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && cicada coordinator --help > /dev/null

RUN groupadd --system --gid 10001 cicada \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent cicada
USER 10001:10001

EXPOSE 5555 9464
# `cicada status` exits non-zero when the metrics endpoint does not answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["cicada", "status", "--json", "--metrics", "http://127.0.0.1:9464/metrics"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "cicada", "coordinator"]
CMD ["--bind", "tcp://0.0.0.0:5555", "--metrics", "0.0.0.0:9464", \
     "--curve-secret", "/etc/cicada/curve/coordinator.key_secret", \
     "--allow", "/etc/cicada/curve-clients", \
     "--worker-keys", "edge:gpt2:/etc/cicada/curve-edge", \
     "--worker-keys", "cloud:gpt2:/etc/cicada/curve-cloud"]
