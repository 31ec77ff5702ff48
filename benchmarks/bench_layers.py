"""Transformer blocks with EntropyAttention vs nn.MultiheadAttention (SDPA), forward+backward.

- ViT-B/16 block: torchvision's ``EncoderBlock`` (768 wide, 12 heads, MLP 3072), N = 197, batch 256.
- GPT-2-small block: pre-norm ``nn.TransformerEncoderLayer`` (768, 12 heads, MLP 3072, GELU),
  N = 1024, causal (mask + ``is_causal`` hint, so nn.MultiheadAttention takes SDPA's causal kernel),
  batch 32.

bf16 weights and activations. ``impl``: ``mha`` (the original block), ``entropy`` (the block after
``replace_attention``, loss ``task + 0.1 * entropy_loss``: the issue's <= 5% overhead target),
``entropy_gamma0`` (swapped, entropy not in the loss). Run on a GPU:

    pytest benchmarks/bench_layers.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import copy

import pytest
import torch
from torch import nn

from entropy_attn import entropy_loss, replace_attention
from entropy_attn.flops import attention_flops

pytestmark = pytest.mark.gpu

WIDTH, HEADS, MLP = 768, 12, 3072
GAMMA = 0.1


def vit_block():
    from torchvision.models.vision_transformer import EncoderBlock

    return EncoderBlock(HEADS, WIDTH, MLP, dropout=0.0, attention_dropout=0.0)


def gpt2_block():
    return nn.TransformerEncoderLayer(WIDTH, HEADS, MLP, dropout=0.0, activation="gelu", batch_first=True,
                                      norm_first=True)


MODELS = {  # name: (block factory, sequence length, batch, causal)
    "vit_b_16": (vit_block, 197, 256, False),
    "gpt2_small": (gpt2_block, 1024, 32, True),
}


def block_flops(batch, n, causal):
    """Matmul FLOPs of one block, forward+backward: 3 x 2 x tokens x 12 width^2 for the linear
    layers, plus attention (MATH.md section 6)."""
    linear = 3 * 2 * batch * n * 12 * WIDTH**2
    return linear + attention_flops(batch, HEADS, n, n, WIDTH // HEADS, causal=causal, mode="fwd_bwd")


@pytest.mark.parametrize("impl", ["mha", "entropy", "entropy_gamma0"])
@pytest.mark.parametrize("model", list(MODELS))
def test_block(measure, model, impl):
    factory, n, batch, causal = MODELS[model]
    torch.manual_seed(0)
    block = factory().to("cuda", torch.bfloat16).train()
    if impl != "mha":
        block = replace_attention(copy.deepcopy(block))
    x = torch.randn(batch, n, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(n, device="cuda", dtype=torch.bfloat16) if causal else None

    def run():
        out = block(x, src_mask=mask, is_causal=True) if causal else block(x)
        loss = out.float().square().mean()
        if impl == "entropy":
            loss = loss + GAMMA * entropy_loss(block)
        loss.backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    measure(run, flops=block_flops(batch, n, causal), group=f"layers {model}", impl=impl, model=model,
            batch=batch, n=n)
