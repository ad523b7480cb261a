"""Triton kernels for the QLoRA hot path, one module per op; ``qlora/`` holds the QLoRA linear's pieces and the
``_``-prefixed modules what several ops share (see README.md). Imports torch and triton only."""
