"""Turning a trained latent diffusion model into images: DDIM in latent space, then the frozen decoder."""

import json
import math
import os

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid
from tqdm import tqdm

from ldm.build import build_diffusion, latent_shape
from ldm.checkpoint import atomic_write_bytes

METADATA_KEY = "metadata"  # the PNG text chunk (and the .npz entry sample.py writes) holding provenance JSON


@torch.inference_mode()
def generate(ae, unet, diffusion, labels, shape, steps, eta, generator, batch_size=256, progress=True,
             sampler="ddim"):
    """labels: (N,) long, shape: (z, h, w) of one latent -> uint8 images (N, C, H, W), by `sampler`.

    `generator` drives every random draw, so a seed gives the same images.
    """
    device = next(unet.parameters()).device
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", disable=not progress, unit="batch"):
        y = labels[i:i + batch_size].to(device)
        z = diffusion.sample(unet, (len(y), *shape), y, steps, generator, sampler, eta)
        x = ae.decode(z / ae.scale_factor).clamp(-1, 1)
        out.append(((x + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def save_grid(images, path, metadata=None):
    """uint8 (N, C, H, W) -> a PNG grid (one channel is repeated to RGB), written atomically.

    `metadata`, a dict of plain JSON values, is stored as one JSON object in the iTXt chunk `metadata`
    (read it back with `json.loads(PIL.Image.open(path).text["metadata"])`). Returns the absolute path.
    """
    nrow = max(1, int(math.ceil(math.sqrt(len(images)))))
    grid = make_grid(images, nrow=nrow, padding=2)  # (3, H', W') uint8, the same pixels as torchvision's save_image
    info = None
    if metadata is not None:
        info = PngInfo()
        info.add_itxt(METADATA_KEY, json.dumps(metadata))
    picture = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    atomic_write_bytes(path, lambda f: picture.save(f, format="png", pnginfo=info))
    return os.path.abspath(path)


def write_samples(cfg, ae, unet, path, classes, metadata=None):
    """A class-ordered grid of `grid_n` samples (DDIM, `sample_steps`, `eta`) from `unet`, seeded by the run;
    `metadata` (provenance: stage, DP or not, epsilon) goes into the PNG file itself. Returns the path."""
    labels = torch.arange(cfg.run.grid_n) % min(classes, 10)
    gen = torch.Generator().manual_seed(cfg.run.seed + 2)
    images = generate(ae, unet, build_diffusion(cfg), labels, latent_shape(cfg), cfg.diffusion.sample_steps,
                      cfg.diffusion.eta, gen, sampler=cfg.diffusion.sampler)
    return save_grid(images, path, metadata)
