"""Benchmarks and reports for softmax_gpu: `python -m bench` (GPU sweep or CPU report),
`python -m bench.compile_report` (registers, spills, load widths without a GPU)."""
