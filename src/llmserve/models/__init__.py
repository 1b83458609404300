"""Model files: preparing the embedded default into a vLLM-loadable folder."""
