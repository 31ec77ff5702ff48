"""entropy-attn: Triton attention kernels for entropy-regularized and entropy-pruned Transformers."""
from . import ops  # noqa: F401  (registers the torch.ops.entropy_attn custom ops)
from .functional import entropy_attention

__version__ = "0.1.0"

__all__ = ["entropy_attention"]
