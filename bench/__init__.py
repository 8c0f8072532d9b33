"""hf_compress benchmarks: ``python -m bench`` (fp32 baseline) and ``python -m bench.<technique>``."""
