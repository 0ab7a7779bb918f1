"""Transformer blocks of the UNet: self-attention, cross-attention to the class context, feed-forward.

Attention is written with plain matmuls and softmax: under `torch.func.vmap` (per-sample gradients in dp/)
PyTorch's fused scaled_dot_product_attention falls back to a slow path, plain matmuls batch well.
These blocks, with their norms and in/out projections, are what the DP stage fine-tunes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.nn import group_norm, zero_module


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, Eq. 1). x: (B, N, d), context: (B, M, d_ctx) -> (B, N, d).

    Without context it is self-attention over the N spatial positions.
    """

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, d = x.shape
        h = self.heads
        q = self.to_q(x).view(B, N, h, d // h).transpose(1, 2)  # (B, h, N, dh)
        k = self.to_k(context).view(B, -1, h, d // h).transpose(1, 2)  # (B, h, M, dh)
        v = self.to_v(context).view(B, -1, h, d // h).transpose(1, 2)  # (B, h, M, dh)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)  # (B, h, N, M)
        out = (att @ v).transpose(1, 2).reshape(B, N, d)
        return self.to_out(out)

    def one_key(self, context):
        """The output for a context of ONE token, context: (B, 1, d_ctx) -> (B, 1, d), the same at every query
        position: the softmax over a single key is exactly 1, so attention returns that key's value whatever the
        query. Equal to forward(x, context) for every x (tests/test_modules.py), without the queries and keys."""
        return self.to_out(self.to_v(context))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): (B, N, d) -> (B, N, d), hidden width 4d."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """One transformer block on a feature map, as in latent diffusion (Rombach et al. 2022, Sec. 3.3).

    x: (B, C, H, W), context: (B, 1, d_ctx) class embedding -> (B, C, H, W). The output projection is
    zero-initialised, so a new block starts as the identity.
    """

    def __init__(self, channels, heads, context_dim):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, heads, context_dim)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        h = h + self.attn1(self.norm1(h))
        if context.shape[1] == 1:  # the class token alone: norm2 and attn2's queries and keys cannot matter
            h = h + self.attn2.one_key(context)
        else:
            h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h
