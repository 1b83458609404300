#!/bin/bash
# The GPU host's side of issue 10 (see benchmarks/results/gpu-h100.md). The host has Python 3.12 and
# torch 2.11.0+cu130 but no vLLM, no FastAPI and no network; benchmarks/gpu/bundle.sh (run where pip
# works) leaves the vLLM 0.26.0 bundle in gpu-bundle-a/ and gpu-bundle-b/, each under one 64 MiB transfer.
#
#   run_on_host.sh receive-a          first transfer: keep part_00 (carry gpu-bundle-a)
#   run_on_host.sh setup              second transfer: part_01 + checksum, unpack, write the dummy model
#   run_on_host.sh suite PHASE...     python3 -m benchmarks.gpu.suite with the bundle on the path
#   run_on_host.sh nvml-check         benchmarks/gpu/nvml_check.py (no llmserve server needed)
#   run_on_host.sh tp-smoke [ARGS]    benchmarks/gpu/tp_smoke.py: in-process engine, tensor_parallel_size 2
#   run_on_host.sh receive-c          third transfer (issue 19): sglang-router's wheel, unpacked beside vLLM
#   run_on_host.sh fleet PHASE...     benchmarks/gpu/fleet_gpu.py: vllm serve replicas behind each router
#
# With the device tool, back to back (the host keeps /tmp only while it stays warm):
#   run(carry=["gpu-bundle-a"]): bash benchmarks/gpu/run_on_host.sh receive-a
#   run(carry=["gpu-bundle-b"]): bash benchmarks/gpu/run_on_host.sh setup &&
#       bash benchmarks/gpu/run_on_host.sh suite --budget-s 520 start smoke long chat
#   run():                       bash benchmarks/gpu/run_on_host.sh suite admission grouping stop
# The servers started by `start` run in sessions of their own, so later calls measure the same ones.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
S=${GPU_STATE:-/tmp/gpu}
mkdir -p "$S/ck"
export PYTHONUNBUFFERED=1

case "${1:-}" in
  receive-a)
    cp gpu-bundle-a/part_00 "$S/ck/"
    ls -la "$S/ck"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())'
    ;;
  setup)
    t0=$SECONDS
    cp gpu-bundle-b/part_01 gpu-bundle-b/bundle.sha256 "$S/ck/"
    (cd "$S/ck" && cat part_0? > bundle.tar.xz && sha256sum -c bundle.sha256)
    rm -rf "$S/site" && mkdir -p "$S/site"
    xz -T0 -dc "$S/ck/bundle.tar.xz" | tar -x -C "$S/site"
    rm -f "$S/ck/bundle.tar.xz"
    python3 benchmarks/gpu/make_dummy_model.py "$S/model"
    echo "setup took $((SECONDS - t0)) s"
    ;;
  receive-c)
    for wheel in gpu-bundle-c/*.whl; do python3 -m zipfile -e "$wheel" "$S/site"; done
    ls "$S/site" | grep -i sglang
    ;;
  suite|nvml-check|tp-smoke|fleet)
    export PYTHONPATH="$ROOT/src:$S/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0
    if [[ $1 == nvml-check ]]; then exec python3 benchmarks/gpu/nvml_check.py; fi
    if [[ $1 == fleet ]]; then
      shift
      exec python3 -m benchmarks.gpu.fleet_gpu "$@" --state "$S" --model-dir "$S/model"
    fi
    if [[ $1 == tp-smoke ]]; then
      shift
      exec python3 -m benchmarks.gpu.tp_smoke --state "$S" --model-dir "$S/model" "$@"
    fi
    shift
    exec python3 -m benchmarks.gpu.suite --state "$S" --model-dir "$S/model" "$@"
    ;;
  *)
    sed -n 2,18p "$0"
    exit 2
    ;;
esac
