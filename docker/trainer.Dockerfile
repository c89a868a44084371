# The continuous trainer: torch (CUDA build) and the exporter, from the same pyproject.toml.
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t watchnext-trainer .
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# the encoder's compiled loops (numba): compiled once in the build, loaded from here at each start
ENV NUMBA_CACHE_DIR=/var/cache/watchnext-numba

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md watchnext.toml ./
COPY watchnext ./watchnext
COPY service ./service
COPY training ./training
COPY analysis ./analysis
COPY simulation ./simulation
COPY cli ./cli
# the project itself, by path: its own pyproject.toml pins the ranges (torch>=2.4,<2.14)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]" \
    && useradd --create-home --uid 10001 watchnext \
    && mkdir -p /models /checkpoints \
    && chown watchnext /models /checkpoints \
    && python3 -c "import watchnext.kernels" \
    && chown -R watchnext "$NUMBA_CACHE_DIR"

USER 10001
ENV WATCHNEXT_CONFIG=/app/watchnext.toml \
    WATCHNEXT_MODELS=/models
CMD ["watchnext", "train", "--stream", "--promote", "--checkpoint", "/checkpoints/ranker.pt"]
