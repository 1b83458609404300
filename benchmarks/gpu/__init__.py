"""Benchmarks and checks on a real GPU (issue 10): see run_on_host.sh."""
