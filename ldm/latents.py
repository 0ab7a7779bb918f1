"""A data set's latents under the frozen autoencoder: what the diffusion stages train on."""

import torch
from tqdm import tqdm

from ldm.data import to_unit_range


@torch.no_grad()
def encode_latents(ae, data, device, desc, batch=500):
    """Scaled posterior mean and std of every image of `data` under the frozen autoencoder: two (N, z, h, w)
    tensors on `device`. A latent sample is mean + std * noise, one noise draw per example and step."""
    means, stds = [], []
    for i in tqdm(range(0, len(data), batch), desc=desc, unit="batch", leave=False):
        post = ae.encode(to_unit_range(data.x[i:i + batch]).to(device))
        means.append(post.mean * ae.scale_factor)
        stds.append(post.std * ae.scale_factor)
    return torch.cat(means), torch.cat(stds)
