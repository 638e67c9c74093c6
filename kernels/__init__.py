"""Triton GPU kernels for visual-token pruning, each beside its PyTorch reference.

Kept import-light on purpose: transformers probes a top-level module named ``kernels``,
so nothing here may import triton (or torch) at package import time.
"""
