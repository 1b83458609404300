#!/bin/bash
# Build the vLLM 0.26.0 bundle for the offline H100 host (Python 3.12, torch 2.11.0+cu130 image), with
# llmserve's runtime dependencies that neither the image nor vLLM's bundle holds, and split it in two
# halves for two transfers:
#   gpu-bundle-a/part_00                      (first transfer)
#   gpu-bundle-b/part_01 + bundle.sha256      (second transfer)
# Usage (repo root): benchmarks/gpu/bundle.sh            ~30 s of pip, ~4 min of xz on 2 cores.
# Then see benchmarks/gpu/run_on_host.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/benchmarks/gpu"
WORK="$ROOT/gpu-bundle-build"
WHEELS="$WORK/wheels"
rm -rf "$WORK" && mkdir -p "$WHEELS"
PL="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for t in manylinux_2_28 manylinux_2_17 manylinux2014; do PL="$PL --platform ${t}_x86_64"; done
# llmserve's dependencies (pyproject.toml) that are neither in the image (aiohttp, uvloop, pyyaml,
# tqdm, prometheus-client, nvidia-ml-py, protobuf are) nor in vLLM's bundle (fastapi, starlette,
# uvicorn, httptools, pydantic(-settings), python-json-logger, opentelemetry-api are).
EXTRA="orjson==3.13.0 redis==8.1.0 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
 opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
 opentelemetry-proto==1.45.2 opentelemetry-exporter-http-transport==0.66b2
 opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps $PL -d "$WHEELS" $EXTRA
bash "$HERE/build_vllm_bundle.sh" "$WORK/out" "$WHEELS"
rm -rf "$ROOT/gpu-bundle-a" "$ROOT/gpu-bundle-b"
mkdir -p "$ROOT/gpu-bundle-a" "$ROOT/gpu-bundle-b"
parts=("$WORK"/out/part_*)
if [[ ${#parts[@]} -ne 2 ]]; then echo "expected 2 parts, got ${#parts[@]}" >&2; exit 1; fi
mv "$WORK/out/part_00" "$ROOT/gpu-bundle-a/"
mv "$WORK/out/part_01" "$WORK/out/bundle.sha256" "$ROOT/gpu-bundle-b/"
rm -rf "$WORK"
ls -la "$ROOT"/gpu-bundle-a "$ROOT"/gpu-bundle-b
