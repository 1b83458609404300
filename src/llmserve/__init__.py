"""llmserve: a production LLM serving gateway (FastAPI in front, vLLM for inference)."""

__version__ = "0.1.0"
