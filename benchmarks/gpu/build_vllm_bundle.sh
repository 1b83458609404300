#!/bin/bash
# Copied from the project's shared GPU recipe (../shared/gpu/build_vllm_bundle.sh), with two changes:
# - the extra wheels are installed in the same pip command as the rest: a second `pip install --target`
#   skips top-level folders that already exist (opentelemetry/ from opentelemetry-api), so the
#   opentelemetry-sdk and exporter files were silently left out, and it refused cp312 binary wheels on
#   a build host whose Python is not 3.12 (no platform flags);
# - vllm/third_party/fmha_sm100 (Blackwell-only attention for MiniMax-M3, imported lazily) is left out:
#   with llmserve's extra wheels the bundle was 170 KB over two 60 MiB parts.
# Build a slim vLLM 0.26.0 site-packages bundle that runs on the project's offline H100 host image
# (Python 3.12, torch 2.11.0+cu130 already there; vLLM 0.20-0.26 pin exactly that torch and are built for CUDA 13).
# Usage: build_vllm_bundle.sh OUTDIR [extra wheels dir]   -> OUTDIR/part_00, part_01, ... (60 MiB each at most), bundle.sha256
# Takes ~30 s of pip and ~4 min of xz on 2 cores. Needs ~1.5 GB of free disk while it runs.
set -euo pipefail
OUT=${1:?usage: build_vllm_bundle.sh OUTDIR}; mkdir -p "$OUT"; cd "$OUT"
PL="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for t in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do PL="$PL --platform ${t}_x86_64"; done
# vLLM plus what the image lacks for the engine, `vllm bench` and the OpenAI server
PKGS="vllm==0.26.0 annotated-types==0.8.0 apache-tvm-ffi==0.1.10 cachetools==8.0.2 cbor2==6.3.0 fastapi==0.136.3
 httpcore2==2.16.2 httpx2==2.16.2 jiter==0.19.0 llguidance==1.7.6 msgspec==0.22.0 openai==3.57.0 openai-harmony==0.0.8
 opentelemetry-api==1.45.2 partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5
 pyzmq==27.3.0 sniffio==1.3.1 starlette==1.10.0 truststore==0.10.5 typing-inspection==0.4.5 xgrammar==0.2.7
 compressed-tensors==0.17.0 jmespath==1.1.0 loguru==0.7.3 model-hosting-container-standards==0.1.16 supervisor==4.3.0
 uvicorn==0.54.0 watchfiles==1.3.0 depyf==0.20.0 astor==0.8.1 dill==0.4.1 setproctitle==1.3.8 blake3==1.0.11
 prometheus-fastapi-instrumentator==8.1.0 python-multipart==0.0.34 sse-starlette==3.7.0 pydantic-settings==2.16.3
 python-dotenv==1.2.4 python-json-logger==4.2.0 email-validator==2.4.0 dnspython==2.9.2 httptools==0.9.0
 websockets==17.4 jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1
 lark==1.2.2 interegular==0.3.3 lm-format-enforcer==0.11.3 ijson==3.6.0 pyjwt==2.15.1 pydantic-extra-types==2.11.1"
EXTRA=(); if [[ -n ${2:-} ]]; then EXTRA=("$2"/*.whl); fi
rm -rf site && python3 -m pip install -q --no-deps --no-compile --target site $PL $PKGS "${EXTRA[@]}"
# Not needed on Hopper for dense/MoE models: FA2 (FA3 serves sm_90), the opt-in Rust front end, other Pythons' builds.
rm -f site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so site/vllm/vllm-rs site/vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
rm -rf site/vllm/third_party/fmha_sm100
find site -name __pycache__ -prune -exec rm -rf {} +
tar --sort=name -C site -cf - . | xz -9e -T0 > bundle.tar.xz
sha256sum bundle.tar.xz > bundle.sha256
# equal parts of at most 60 MiB each, so each fits one 64 MiB transfer beside a small working tree
n=$(( ($(stat -c %s bundle.tar.xz) + 62914559) / 62914560 ))
rm -rf site part_*; split -n "$n" -d bundle.tar.xz part_; rm bundle.tar.xz
ls -la "$OUT"
