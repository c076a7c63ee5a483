# syntax=docker/dockerfile:1.7
# rlhf-loop: one image, two entrypoints (docs/deploy.md).
#
#   docker build -t rlhf-loop:0.1.0 .                                        # CPU torch (default)
#   docker build -t rlhf-loop:0.1.0-cuda --build-arg TORCH_VARIANT=cuda .    # CUDA torch for the GPU trainer
#   docker run --rm -p 3000:3000 rlhf-loop:0.1.0                             # rlhf serve
#   docker run --rm rlhf-loop:0.1.0 train                                    # rlhf train (needs Kafka + policy store)
#
# tests/deploy/test_dockerfile.py lints this file with hadolint and replays the builder
# stage's install steps in a fresh venv, then starts `rlhf serve` from it. Every Python
# package comes from requirements/image-<variant>.lock (exact versions, sha256-checked).

# Pinned to a patch release; pin the digest as well in your registry mirror.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------- builder
# A venv in /opt/venv holding exactly the lock's packages and the project; the runtime stage copies it whole.
FROM ${PYTHON_IMAGE} AS builder
# cpu, or cuda: which lock the venv is made from (requirements/image-<variant>.lock), hence which
# torch build. The cuda lock has PyPI's own torch build (CUDA 13.0): its CUDA runtime comes as
# pip packages, the node supplies only the driver.
ARG TORCH_VARIANT=cpu
# Where uv finds the CPU build of torch; the lock's sha256 is checked whatever the source. The
# tests pass this machine's copy of it here.
ARG TORCH_CPU_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"
# Bytecode compiled at install: the runtime's root file system is read-only.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
WORKDIR /src
COPY requirements/bootstrap.txt requirements/image-cpu.lock requirements/image-cuda.lock ./requirements/
# uv from its hashed pin, in a venv of its own that the runtime stage leaves behind
RUN python -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements/bootstrap.txt \
    && python -m venv /opt/venv
# The locked dependencies first, torch among them: the largest layer, rebuilt only when a lock changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    if [ "$TORCH_VARIANT" = cpu ]; then torch_source="$TORCH_CPU_SOURCE"; else torch_source=""; fi \
    && /opt/uv/bin/uv pip sync --python /opt/venv/bin/python --require-hashes $torch_source \
        "requirements/image-${TORCH_VARIANT}.lock"
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY rlhf_loop ./rlhf_loop
# A regular (not editable) install, nothing but the project: the runtime stage needs nothing from /src.
RUN /opt/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps /src

# ---------------------------------------------------------------------------- model
# The embedded default model, trained here once (~1 min) so that pods start in seconds.
# It lands in /opt/rlhf/models/<tinylm.NAME>; the link /opt/rlhf/model names it without
# repeating that name, and RLHF_MODEL points there: an ordinary HF checkpoint directory.
FROM builder AS model
WORKDIR /opt/rlhf
RUN RLHF_STATE_DIR=/opt/rlhf rlhf model build \
    && ln -s "models/$(ls models)" model

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
# tini as PID 1 forwards SIGTERM, so serve flushes its producers and train finishes its
# write on a pod's termination. gcc + libc6-dev only in CUDA images: Triton compiles its
# small launcher stub with the system C compiler the first time a kernel runs on a GPU.
# Versions are Debian bookworm's (amd64); bump them together with PYTHON_IMAGE.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && if [ "$TORCH_VARIANT" != "cpu" ]; then \
        apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14; \
    fi \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 rlhf \
    && useradd --system --uid 10001 --gid rlhf --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf \
    && mkdir -p /var/lib/rlhf \
    && chown rlhf:rlhf /var/lib/rlhf
COPY --from=builder /opt/venv /opt/venv
COPY --from=model /opt/rlhf /opt/rlhf
# Docker HEALTHCHECK. `rlhf serve` must answer /livez on its port. `rlhf train` has no
# port: its health is its process, and when that dies tini exits and the container stops.
COPY --chmod=0755 <<'EOF' /usr/local/bin/rlhf-healthcheck
#!/opt/venv/bin/python
import sys
import urllib.request

from rlhf_loop.core.contracts import Settings

if b"train" in open("/proc/1/cmdline", "rb").read().split(b"\0"):
    sys.exit(0)
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{Settings().port}/livez", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:
    sys.exit(f"unhealthy: {e}")
EOF

# RLHF_STATE_DIR is writable scratch (Kubernetes mounts a volume there); the model is
# read-only in the image. BENTOML_DO_NOT_TRACK / HF_HUB_OFFLINE: no phoning home, no hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=true \
    HF_HUB_OFFLINE=1 \
    RLHF_MODEL=/opt/rlhf/model \
    RLHF_STATE_DIR=/var/lib/rlhf
USER 10001:10001
WORKDIR /home/rlhf
# 3000: public API + /livez /readyz /metrics. 3001: admin API (keep it private).
EXPOSE 3000 3001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["rlhf-healthcheck"]
ENTRYPOINT ["tini", "--", "rlhf"]
CMD ["serve"]
