"""Turning a trained latent diffusion model into images: DDIM in latent space, then the frozen decoder."""

import math
import os

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from ldm.checkpoint import atomic_write_bytes


@torch.no_grad()
def generate(ae, unet, diffusion, labels, latent_shape, steps, eta, generator, batch_size=256, progress=True):
    """labels: (N,) long, latent_shape: (z, h, w) -> uint8 images (N, C, H, W).

    `generator` drives every random draw, so a seed gives the same images.
    """
    device = next(unet.parameters()).device
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", disable=not progress, unit="batch"):
        y = labels[i:i + batch_size].to(device)
        z = diffusion.ddim_sample(unet, (len(y), *latent_shape), y, steps, eta, generator)
        x = ae.decode(z / ae.scale_factor).clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def save_grid(images, path):
    """uint8 (N, C, H, W) -> a PNG grid, written atomically."""
    nrow = max(1, int(math.ceil(math.sqrt(len(images)))))

    def write(f):
        save_image(images.float() / 255.0, f, nrow=nrow, padding=2, format="png")
    atomic_write_bytes(path, write)
    return os.path.abspath(path)
