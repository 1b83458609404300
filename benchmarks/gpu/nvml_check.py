"""Check llmserve's NVML GPU metrics against nvidia-smi on a GPU host.

Holds ~8 GiB on GPU 0 and keeps it busy with matmuls, then reads llmserve's GpuCollector and
nvidia-smi at the same moment and prints both. Needs torch (CUDA), nvidia-ml-py,
prometheus-client, and this repo's src/ on PYTHONPATH:

    PYTHONPATH=src python3 benchmarks/gpu/nvml_check.py
"""

from __future__ import annotations

import subprocess
import threading
import time

import torch
from prometheus_client import CollectorRegistry, generate_latest

from llmserve.observability.gpu import GpuCollector


def main() -> None:
    hold = torch.empty(8 * 1024**3, dtype=torch.uint8, device="cuda:0")
    a = torch.randn(8192, 8192, device="cuda:0")
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            (a @ a).sum().item()

    worker = threading.Thread(target=burn)
    worker.start()
    time.sleep(3)  # NVML's utilisation is averaged over the last sample period
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    ours = generate_latest(registry).decode()
    smi = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stop.set()
    worker.join()
    del hold
    print("== llmserve /metrics (GPU part) ==")
    print("\n".join(line for line in ours.splitlines() if not line.startswith("#")))
    print("== nvidia-smi (index, name, MiB used, MiB total, util %) ==")
    print(smi)


if __name__ == "__main__":
    main()
