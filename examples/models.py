"""Small Transformers built from ``entropy_attn.EntropyAttention``: a ViT classifier and a
GPT-style byte-level language model. Both use pre-LayerNorm blocks, ``batch_first`` layouts, and
pass their attention options (regularizer kind, top_k, tau, backend) straight to every layer."""
from __future__ import annotations

import torch
from torch import nn

from entropy_attn import EntropyAttention


class Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``, on ``[B, N, dim]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, **attn_options):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = EntropyAttention(dim, heads, dropout=dropout, batch_first=True, **attn_options)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x, attn_mask=None, is_causal=False, need_weights=False):
        """Returns ``(x [B, N, dim], weights [B, N, N] averaged over heads, or None)``."""
        h = self.ln1(x)
        a, weights = self.attn(h, h, h, attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights)
        x = x + a
        return x + self.mlp(self.ln2(x)), weights


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def conv_stem(channels: int, dim: int, patch: int) -> nn.Sequential:
    """Patch embedding as ``log2(patch)`` stride-2 3x3 convolutions (an "early convolutions" stem):
    the same ``patch``-aligned token grid as a ``patch x patch`` patchify, but it trains much
    faster on small data sets. ``patch`` must be a power of 2."""
    if patch < 1 or patch & (patch - 1):
        raise ValueError(f"the conv stem needs a power-of-2 patch, got {patch}")
    layers, c = [], channels
    for i in range(patch.bit_length() - 1):
        out = dim if 2 ** (i + 1) == patch else max(dim // 2, 16)
        layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.GELU()]
        c = out
    layers.append(nn.Conv2d(c, dim, 1))
    return nn.Sequential(*layers)


class ViT(nn.Module):
    """Vision Transformer: patch embedding (``stem='conv'``: a small strided-conv stem, see
    ``conv_stem``; ``'linear'``: the standard patchify convolution), class token, learned
    positions, ``depth`` blocks, LayerNorm and a linear head on the class token.

    Input ``[B, channels, image_size, image_size]`` float; output logits ``[B, num_classes]``.
    Tokens: 1 class token followed by ``(image_size // patch) ** 2`` patches in row-major order.
    """

    def __init__(self, *, image_size: int, patch: int, channels: int, num_classes: int, dim: int = 64,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0, stem: str = "conv",
                 **attn_options):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.grid = image_size // patch
        self.patch_embed = conv_stem(channels, dim, patch) if stem == "conv" else nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, **attn_options) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)

    def forward(self, x, return_attention: bool = False):
        """Logits ``[B, num_classes]``; with ``return_attention`` also the last block's head-averaged
        attention ``[B, 1 + grid**2, 1 + grid**2]`` (computed through the layer's reference path)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, grid**2, dim]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        weights = None
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights=return_attention and i == len(self.blocks) - 1)
        logits = self.head(self.norm(x[:, 0]))
        return (logits, weights) if return_attention else logits


class GPT(nn.Module):
    """Decoder-only byte-level language model (vocabulary 256) with causal ``EntropyAttention``.

    Input ``[B, T]`` int64 bytes, ``T <= block_size``; output logits ``[B, T, 256]``.
    """

    def __init__(self, *, block_size: int = 256, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, vocab_size: int = 256, **attn_options):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, 4.0, dropout, **attn_options) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(_init_weights)

    def forward(self, idx, return_attention: bool = False):
        """Logits ``[B, T, vocab]``; with ``return_attention`` also the last block's head-averaged
        causal attention ``[B, T, T]``."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        # nn.MultiheadAttention convention: True = not allowed; is_causal tells the layer it is causal
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        weights = None
        for i, block in enumerate(self.blocks):
            last = return_attention and i == len(self.blocks) - 1
            x, weights = block(x, attn_mask=mask, is_causal=True, need_weights=last)
        logits = self.head(self.norm(x))
        return (logits, weights) if return_attention else logits
