"""Microbenchmarks and reports for autoglm-fast (run as `python -m benchmarks.<name>`)."""
