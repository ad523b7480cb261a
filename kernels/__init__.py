"""Triton kernels for the QLoRA hot path, one module per op (see README.md). Imports torch and triton only."""
