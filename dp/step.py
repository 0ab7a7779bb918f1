"""One logical DP-SGD step (Abadi et al. 2016, Algorithm 1, with Poisson sampling), the only one in the project.

    sample (Poisson, rate q) -> ledger -> per-example gradients, each clipped to L2 norm C over all selected
    parameters jointly -> sum -> + N(0, sigma^2 C^2) per coordinate -> / q N (the EXPECTED batch size) -> update

Training (dp/finetune.py), the non-private baseline (dp/nonprivate.py, with clipping and noise switched off
explicitly), the audit (dp/audit.py) and the benchmark (dp/bench.py) all call `dp_step` or `private_gradient`.

Guarantees: for a fixed secret (dp/randomness.py), adding or removing one example changes the clipped sum by a
vector of norm at most C, whatever the model, the data, the micro-batching or the number of processes: every
example's own draws (posterior sample, timestep, diffusion noise) depend only on (secret, step, its index), and
an example whose gradient is not finite contributes exactly zero. The Gaussian noise of standard deviation
sigma*C is added once per coordinate per logical step, from the secret; the divisor q N does not depend on the
data. Under Poisson sampling with rate q this is the subsampled Gaussian mechanism that dp/accountant.py
accounts for. Not covered: the public data, the choice of hyperparameters (each tuning run on private data
spends privacy too), floating-point artefacts of the Gaussian sampler (Jin et al. 2022).
"""

import dataclasses
from typing import Optional

import torch

from dp.bookkeeping import clipped_sum
from dp.per_sample import per_sample_grads
from dp.phases import phase
from dp.randomness import example_draws, noise_key, poisson_sample
from kernels.clip_noise import clip_and_noise, gaussian_noise
from ldm.distributed import Dist, all_reduce_sum_, broadcast_, shard


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """What one step releases: Poisson rate q, clipping bound C, noise multiplier sigma, divisor q N.

    clip None and sigma 0: the NON-private baseline's step (no clipping, no noise), named so that it is explicit.
    """

    q: float
    clip: Optional[float]
    sigma: float
    divisor: float

    @property
    def private(self):
        return self.clip is not None and self.sigma > 0


@dataclasses.dataclass
class Task:
    """The model side of a step: what is trained, on which latents, and how per-example gradients are formed.

    latents: (mean, std), each (N, z, h, w), the frozen encoder's scaled posterior of every example; labels: (N,).
    method: "bookkeeping" or "vmap" (dp/bookkeeping.py, dp/per_sample.py). backend: for kernels/clip_noise.py.
    """

    unet: torch.nn.Module
    diffusion: object
    params: dict
    latents: tuple
    labels: torch.Tensor
    method: str = "bookkeeping"
    physical_batch: int = 64
    backend: str = "auto"

    @property
    def shapes(self):
        return [p.shape for p in self.params.values()]


def example_inputs(task, secret, step, idx):
    """(z0, y, t, noise) of the examples `idx` (b,) at `step`: one posterior sample, timestep and noise draw
    each, from that example's own counters (dp/randomness.py)."""
    mean, std = task.latents
    posterior, t, noise = example_draws(secret, step, idx, mean.shape[1:], task.diffusion.T)
    z0 = mean[idx] + std[idx] * posterior.to(mean.device)
    return z0, task.labels[idx], t.to(mean.device), noise.to(mean.device)


def summed_gradients(task, clip, inputs):
    """Sum over one micro-batch of the examples' gradients, each clipped to joint norm `clip` (None: unclipped).

    inputs: (z0, y, t, noise). Returns a list of fp32 tensors shaped like task.params.
    """
    if clip is None:
        losses = task.diffusion.loss_per_example(task.unet, *inputs)
        grads = torch.autograd.grad(losses.sum(), list(task.params.values()), allow_unused=True)
        return [torch.zeros(p.shape) if g is None else g.float() for g, p in zip(grads, task.params.values())]
    if task.method == "bookkeeping":
        return clipped_sum(task.unet, task.diffusion, task.params, *inputs, clip)[0]
    grads = per_sample_grads(task.unet, task.diffusion, task.params, *inputs)
    return clip_and_noise([grads.pop(n) for n in list(grads)], clip, 0.0, 1.0, 0, backend=task.backend)


def gradient_sum(task, clip, secret, step, idx, dist=Dist()):
    """Sum of the (clipped) gradients of the sampled examples `idx`, over physical micro-batches of this rank's
    shard of `idx`: a list of fp32 tensors. The micro-batch size changes memory only, never the result."""
    device = task.latents[0].device
    total = [torch.zeros(s, dtype=torch.float32, device=device) for s in task.shapes]
    local = idx[shard(len(idx), dist)]
    for chunk in local.split(task.physical_batch) if len(local) else ():
        with phase("dp.inputs"):
            inputs = example_inputs(task, secret, step, chunk)
        for acc, g in zip(total, summed_gradients(task, clip, inputs)):
            acc.add_(g)
    return total


def private_gradient(task, mech, secret, step, idx, dist=Dist(), extra=None):
    """(sum of clipped gradients of `idx` + N(0, (sigma C)^2)) / (q N): what the optimiser receives.

    extra: an optional list of tensors added to the clipped sum before the noise (the audit's planted
    contributions; None in training). With several processes the sums are all-reduced and rank 0 alone adds the
    noise, so every rank returns the same gradient and the noise enters once per coordinate.
    """
    total = gradient_sum(task, mech.clip, secret, step, idx, dist)
    if extra is not None and dist.main:
        for acc, e in zip(total, extra):
            acc.add_(e)
    if mech.sigma > 0 and dist.main:
        with phase("dp.noise"):
            noise = gaussian_noise(task.shapes, mech.sigma * mech.clip, noise_key(secret, step),
                                   backend=task.backend, device=total[0].device)
            for acc, n in zip(total, noise):
                acc.add_(n)
    all_reduce_sum_(total, dist)
    return [t.div_(mech.divisor) for t in total]


def shared_poisson_sample(secret, step, n, q, dist=Dist(), device="cpu"):
    """The step's Poisson sample, drawn by rank 0 and broadcast, so that every rank holds the same indices."""
    mask = torch.zeros(n, dtype=torch.uint8, device=device)
    if dist.main:
        mask[poisson_sample(secret, step, n, q).to(device)] = 1
    broadcast_(mask, dist)
    return torch.nonzero(mask).flatten()


def dp_step(task, mech, secret, step, optimizer, lr, ledger=None, dist=Dist()):
    """One logical step: Poisson sample, ledger entry (durable before the update), noisy gradient, update.

    Returns the released gradient (a list of tensors shaped like task.params).
    """
    with phase("dp.sample"):
        idx = shared_poisson_sample(secret, step, len(task.labels), mech.q, dist, task.labels.device)
    if ledger is not None and dist.main:
        ledger.record(step)
    grads = private_gradient(task, mech, secret, step, idx, dist)
    with phase("dp.update"):
        apply_update(optimizer, list(task.params.values()), grads, lr)
    return grads


def apply_update(optimizer, params, grads, lr):
    """Set each selected parameter's .grad to its noisy gradient and take one optimiser step at `lr`."""
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(dp_cfg, params):
    """The fine-tuning optimiser (--optimizer adamw|sgd, --lr, --weight-decay) over the selected parameters."""
    cls = torch.optim.AdamW if dp_cfg.optimizer == "adamw" else torch.optim.SGD
    return cls(params.values(), lr=dp_cfg.lr, weight_decay=dp_cfg.weight_decay)
