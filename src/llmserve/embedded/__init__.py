"""The embedded models (SmolLM2 for chat, all-MiniLM-L6-v2 for embeddings): PyPI packages
prepared once into vLLM-loadable folders in the cache."""
