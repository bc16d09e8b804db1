"""The ``triton`` backend: fused Triton kernels, one module per op."""
