# GPU worker: CUDA runtime, CUDA build of torch pinned through its index, weights baked.
#   docker build -t separation-worker:gpu .   (default: Mel-Band RoFormer Kim, htdemucs beside it)
# Builder stage: diffq (mdx_q, mdx_extra_q) is a C extension with no wheel on PyPI; it is
# compiled here, on the final image's Ubuntu and Python, so no compiler reaches the final image.
FROM ubuntu:24.04 AS diffq
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY builder/build_diffq.sh builder/build-requirements.txt /build/
RUN bash /build/build_diffq.sh /wheels

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# The best public instrumental whose bake table has hashes (MVSep multisong instrumental SDR 17.32
# vs htdemucs 13.99); becruily's Mel instrumental (17.55) joins once its hashes are filled in.
ARG MODELS=mel_roformer_kim,htdemucs,spleeter_2stems
ARG DEFAULT_MODEL=mel_roformer_kim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MODELS_DIR=/models \
    DEFAULT_MODEL=${DEFAULT_MODEL} \
    REQUIRE_CUDA=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_HOME=/models/.torch \
    RUNPOD_DEBUG_LEVEL=INFO

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        libtcmalloc-minimal4t64 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && ln -s /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/local/lib/libtcmalloc_minimal.so.4
# tcmalloc for the host side (decode, overlap-add, encode): see Dockerfile.cpu.
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776

WORKDIR /app

COPY builder/ builder/
COPY --from=diffq /wheels /tmp/wheels
RUN DIFFQ_WHEEL_DIR=/tmp/wheels bash builder/install.sh gpu && rm -rf /tmp/wheels

# Separate layer on purpose: weights stay cached while dependencies change.
# hadolint ignore=DL3059
RUN python builder/bake_models.py --models "${MODELS}" --dest /models --no-verify

COPY handler/ handler/
COPY test_input.json ./
# No GPU at build time: verify on the CPU (REQUIRE_CUDA only guards the worker's start).
RUN DEVICE=cpu python builder/bake_models.py --models "${MODELS}" --dest /models --verify-only

# At start the worker checks CUDA (REQUIRE_CUDA=1) and exits with a clear message if unusable.
# MODE_TO_RUN=http: the self-hosted HTTP service on $PORT (default 8000, data in $DATA_DIR);
# otherwise (default) the RunPod serverless worker. The HEALTHCHECK probes /ping in http mode
# and always passes in serverless mode (no server to probe).
COPY start.sh ./
ENV DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-m", "handler.server", "--probe"]
CMD ["sh", "/app/start.sh"]
