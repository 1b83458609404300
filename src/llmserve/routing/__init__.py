"""Spreading one model's requests over its replicas, and keeping track of which are healthy."""
