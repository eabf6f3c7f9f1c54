"""The end-to-end benchmark behind `lora-ext bench`, and measurement helpers shared with
benchmarks/bench_kernels.py."""
