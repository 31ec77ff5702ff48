"""Triton kernels of entropy-attn (``@triton.jit`` code only; launchers live in entropy_attn)."""
