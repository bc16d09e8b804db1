"""The ``reference`` backend: plain PyTorch with explicit formulas, on any device.

The correctness oracle (called with float64 inputs in tests) and the last fallback. Low-precision
inputs are computed in float32 and cast back at the end.
"""
