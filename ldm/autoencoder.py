"""KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3 and App. G), written out by hand.

Trained on public images only and frozen afterwards. The latent of an image x: (B, C, H, W) is a diagonal
Gaussian over (B, z, H/f, W/f) with f = 2 ** (len(mult) - 1). `scale_factor` (a buffer, saved with the
weights) is measured on public data after training so that scaled latents have unit variance.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.config import downsampling_factor
from ldm.nn import Downsample, ResBlock, Upsample, group_norm


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent coordinate. mean, logvar: (B, z, h, w)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self):
        """KL(q || N(0, I)) summed over latent coordinates: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    def __init__(self, in_ch, ch, mult, res_blocks, z_ch):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        blocks, c = [], ch
        for i, m in enumerate(mult):
            for _ in range(res_blocks):
                blocks.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(mult) - 1:
                blocks.append(Downsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(c, c), ResBlock(c, c))
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, 2 * z_ch, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, 2z, h, w)
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_ch, ch, mult, res_blocks, z_ch):
        super().__init__()
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(z_ch, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), ResBlock(c, c))
        blocks = []
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(res_blocks + 1):
                blocks.append(ResBlock(c, ch * m))
                c = ch * m
            if i > 0:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):  # (B, z, h, w) -> (B, C, H, W)
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    def __init__(self, in_ch, ch, mult, res_blocks, z_ch):
        super().__init__()
        self.encoder = Encoder(in_ch, ch, mult, res_blocks, z_ch)
        self.decoder = Decoder(in_ch, ch, mult, res_blocks, z_ch)
        self.factor = downsampling_factor(mult)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @classmethod
    def from_config(cls, ae_cfg, in_ch):
        return cls(in_ch, ae_cfg.ae_channels, ae_cfg.ae_mult, ae_cfg.ae_res_blocks, ae_cfg.ae_latent_channels)

    def encode(self, x):
        """x: (B, C, H, W) in [-1, 1] -> DiagonalGaussian over unscaled latents."""
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z):
        """Unscaled latents (B, z, h, w) -> images (B, C, H, W), roughly in [-1, 1]."""
        return self.decoder(z)

    def loss(self, x, kind, kl_weight, noise):
        """Per-example reconstruction (L1 or L2, mean over pixels) + kl_weight * KL (summed over latents).

        x: (B, C, H, W); noise: (B, z, h, w) standard normal draws for the posterior sample.
        Returns three (B,) tensors: loss, reconstruction term, KL term.
        """
        post = self.encode(x)
        x_rec = self.decode(post.mean + post.std * noise)
        err = (x_rec - x).abs() if kind == "l1" else (x_rec - x).pow(2)
        rec = err.flatten(1).mean(1)
        kl = post.kl()
        return rec + kl_weight * kl, rec, kl

    @torch.no_grad()
    def measure_scale_factor(self, batches):
        """Set scale_factor = 1 / std of posterior samples over `batches` (an iterable of (B, C, H, W))."""
        zs = torch.cat([self.encode(x).sample().flatten() for x in batches])
        self.scale_factor.fill_(1.0 / zs.float().std().clamp_min(1e-8).item())
        return float(self.scale_factor)
