"""FLOP counts of shared MATH.md section 6, for benchmarks."""


def attention_flops(batch: int, heads: int, nq: int, nk: int, head_dim: int, *, causal: bool = False,
                    mode: str = "fwd") -> float:
    """Dense attention FLOPs: forward ``4 B H Nq Nk D`` (half with a causal mask and Nq = Nk);
    backward 2.5x the forward; ``mode='fwd_bwd'`` 3.5x."""
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    fwd = 4.0 * batch * heads * nq * nk * head_dim
    if causal:
        fwd /= 2
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
