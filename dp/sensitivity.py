"""The sensitivity check: with the secret held fixed, adding one example x to a sampled batch changes the
clipped sum by at most C, wherever x stands in the batch, whatever the micro-batch size, the gradient method
and the number of processes.

    python -m dp.audit --check-sensitivity --preset quick     # prints the largest change over C; exit 1 above 1 + 1e-5

This is the claim the accountant relies on (sensitivity C under add/remove-one neighbours). It fails when
an example's randomness depends on the other examples (e.g. draws made as one block sized by the realised
batch), when clipping is not joint over all selected parameters, or when micro-batches or processes change
an example's contribution. It runs with sigma = 0 (no noise: the clipped sum itself is compared) through
`dp.step.gradient_sum`, the function training uses. Two processes are simulated exactly: the sum over the two
ranks' shards is what the all-reduce of a torchrun run computes.
"""

import dataclasses

import torch

from dp.select import select_trainable
from dp.step import Task, gradient_sum
from ldm.build import build_diffusion, build_unet, latent_shape
from ldm.data import num_classes
from ldm.distributed import Dist

TOLERANCE = 1e-5  # relative slack for fp32 rounding of the sums
POSITIONS = ("first", "middle", "last")


def with_example(idx, x, position):
    """idx (b,) with example index x inserted first, in the middle or last."""
    cut = {"first": 0, "middle": len(idx) // 2, "last": len(idx)}[position]
    return torch.cat([idx[:cut], torch.tensor([x], dtype=idx.dtype, device=idx.device), idx[cut:]])


def summed(task, clip, secret, step, idx, world):
    """The clipped sum over `idx` as `world` processes together compute it (the all-reduce of their shards)."""
    parts = [gradient_sum(task, clip, secret, step, idx, Dist(rank, world)) for rank in range(world)]
    return torch.cat([torch.stack(ts).sum(0).flatten() if len(ts) > 1 else ts[0].flatten()
                      for ts in zip(*parts)])


def sensitivity_ratios(task, clip, secret, step, idx, x, methods=("bookkeeping", "vmap"),
                       physical_batches=(1, 7, 64), worlds=(1, 2)):
    """{(method, physical batch, processes, position): ||sum(idx + x) - sum(idx)|| / C} for example x not in idx.

    task: a dp.step.Task whose latents/labels hold the examples; idx: (b,) the sampled batch without x.
    """
    ratios = {}
    for method in methods:
        for pb in physical_batches:
            t = dataclasses.replace(task, method=method, physical_batch=pb)
            for world in worlds:
                without = summed(t, clip, secret, step, idx, world).double()
                for position in POSITIONS:
                    change = summed(t, clip, secret, step, with_example(idx, x, position), world).double() - without
                    ratios[(method, pb, world, position)] = (change.norm() / clip).item()
    return ratios


def random_task(cfg, n, device):
    """The preset's UNet (with --dp-lora: adapted) with seeded random weights (zero-initialised ones, LoRA's up
    factors included, redrawn, so every selected tensor has a gradient) and n random latents and labels: the
    model side of a check that needs no training."""
    torch.manual_seed(cfg.run.seed)
    unet = build_unet(cfg)
    params = select_trainable(unet, cfg)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    unet = unet.to(device)
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    shape = (n, *latent_shape(cfg))
    latents = (torch.randn(shape, generator=gen).to(device), (0.1 * torch.rand(shape, generator=gen)).to(device))
    labels = torch.randint(0, num_classes(cfg.data), (n,), generator=gen).to(device)
    return Task(unet, build_diffusion(cfg), params, latents, labels, "bookkeeping", cfg.dp.physical_batch,
                cfg.dp.clip_backend)


def check_sensitivity(task, clip, secret, others=32):
    """The auditor's check (`python -m dp.audit --check-sensitivity`): examples 0..others-1 as the batch, example
    `others` as x. Returns a one-line report dict with the largest change over C and the verdict."""
    if len(task.labels) < others + 1:
        raise ValueError(f"the check needs at least {others + 1} examples, got {len(task.labels)}")
    idx = torch.arange(others, device=task.labels.device)
    ratios = sensitivity_ratios(task, clip, secret, 0, idx, others)
    worst = max(ratios, key=ratios.get)
    return dict(max_change_over_clip=ratios[worst], limit=1 + TOLERANCE,
                verdict="consistent" if ratios[worst] <= 1 + TOLERANCE else "inconsistent",
                worst_case=dict(zip(("method", "physical_batch", "processes", "position"), worst)),
                cases=len(ratios), batch=others)
