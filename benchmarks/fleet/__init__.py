"""The fleet benchmark: simulated vLLM replicas with a real prefix-cache model, workloads as data,
and routers (llmserve's policies, sglang-router, vllm-router) compared in front of them."""
