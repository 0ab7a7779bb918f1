"""Class-conditional UNet for latent diffusion (Ho et al. 2020; Rombach et al. 2022), written out by hand.

Levels are numbered from 1: level k works at downsampling factor 2 ** (k - 1) of the latent. Every
transformer block lives in one `nn.ModuleDict`, `self.attn`, under a stable readable name:

    down{k}_{i}   the i-th block of level k on the encoder (downsampling) side
    mid           the block between the two middle residual blocks (deepest level)
    up{k}_{i}     the i-th block of level k on the decoder (upsampling) side

so that their parameters are named `attn.<block>.<...>` and the DP stage selects them by name.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.attention import SpatialTransformer
from ldm.nn import Downsample, ResBlock, Upsample, group_norm, timestep_embedding, zero_module


class UNet(nn.Module):
    def __init__(self, in_ch, ch, mult, res_blocks, attention_levels, heads, context_dim, num_classes):
        super().__init__()
        self.ch, self.levels, self.res_blocks = ch, len(mult), res_blocks
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embed = nn.Embedding(num_classes, context_dim)  # label -> (1, d_ctx) context
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down_res, self.down_sample = nn.ModuleDict(), nn.ModuleDict()
        self.up_res, self.up_sample = nn.ModuleDict(), nn.ModuleDict()
        self.attn = nn.ModuleDict()

        skips, c = [ch], ch
        for k, m in enumerate(mult, start=1):
            for i in range(res_blocks):
                name = f"down{k}_{i}"
                self.down_res[name] = ResBlock(c, ch * m, emb)
                c = ch * m
                if k in attention_levels:
                    self.attn[name] = SpatialTransformer(c, heads, context_dim)
                skips.append(c)
            if k < len(mult):
                self.down_sample[f"down{k}"] = Downsample(c)
                skips.append(c)
        self.mid_res1 = ResBlock(c, c, emb)
        self.attn["mid"] = SpatialTransformer(c, heads, context_dim)
        self.mid_res2 = ResBlock(c, c, emb)
        for k, m in reversed(list(enumerate(mult, start=1))):
            for i in range(res_blocks + 1):
                name = f"up{k}_{i}"
                self.up_res[name] = ResBlock(c + skips.pop(), ch * m, emb)
                c = ch * m
                if k in attention_levels:
                    self.attn[name] = SpatialTransformer(c, heads, context_dim)
            if k > 1:
                self.up_sample[f"up{k}"] = Upsample(c)
        self.norm_out = group_norm(c)
        self.conv_out = zero_module(nn.Conv2d(c, in_ch, 3, padding=1))

    @classmethod
    def from_config(cls, unet_cfg, in_ch, num_classes):
        return cls(in_ch, unet_cfg.unet_channels, unet_cfg.unet_mult, unet_cfg.unet_res_blocks,
                   unet_cfg.unet_attention_levels, unet_cfg.unet_heads, unet_cfg.unet_context_dim, num_classes)

    def block_level(self, name):
        """Level of a transformer block by its name: 'down2_0' -> 2, 'mid' -> the deepest level."""
        return self.levels if name == "mid" else int(re.fullmatch(r"(?:down|up)(\d+)_\d+", name).group(1))

    def _attend(self, name, h, context):
        return self.attn[name](h, context) if name in self.attn else h

    def forward(self, x, t, y):
        """x: (B, z, h, w) noisy latents, t: (B,) timesteps, y: (B,) labels -> predicted noise (B, z, h, w)."""
        emb = self.time_embed(timestep_embedding(t, self.ch))  # (B, 4ch)
        context = self.class_embed(y)[:, None, :]  # (B, 1, d_ctx)
        h = self.conv_in(x)
        skips = [h]
        for k in range(1, self.levels + 1):
            for i in range(self.res_blocks):
                h = self._attend(f"down{k}_{i}", self.down_res[f"down{k}_{i}"](h, emb), context)
                skips.append(h)
            if k < self.levels:
                h = self.down_sample[f"down{k}"](h)
                skips.append(h)
        h = self.mid_res2(self.attn["mid"](self.mid_res1(h, emb), context), emb)
        for k in range(self.levels, 0, -1):
            for i in range(self.res_blocks + 1):
                h = self.up_res[f"up{k}_{i}"](torch.cat([h, skips.pop()], dim=1), emb)
                h = self._attend(f"up{k}_{i}", h, context)
            if k > 1:
                h = self.up_sample[f"up{k}"](h)
        return self.conv_out(F.silu(self.norm_out(h)))
