"""entropy-attn: Triton attention kernels for entropy-regularized and entropy-pruned Transformers."""
from . import ops  # noqa: F401  (registers the torch.ops.entropy_attn custom ops)
from .functional import entropy_attention
from .modules import EntropyAttention, replace_attention
from .monitor import AttentionMonitor
from .key_summary import KeySummary
from .pruned import pruned_attention
from .regularizer import entropy_loss

__version__ = "0.1.0"

__all__ = ["entropy_attention", "EntropyAttention", "replace_attention", "entropy_loss", "AttentionMonitor", "pruned_attention",
           "KeySummary"]
