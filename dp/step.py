"""The DP-SGD update (Abadi et al. 2016, Algorithm 1, with Poisson sampling) as pure functions.

    per-sample gradients -> clip each to L2 norm C over all selected parameters jointly -> sum
    -> add N(0, sigma^2 C^2) to every coordinate -> divide by the EXPECTED batch size q N

Guarantees: for a fixed example, changing whether it is in the private set (add/remove one example)
changes the clipped sum by a vector of norm at most C, whatever the model, data or micro-batching; the
Gaussian noise of standard deviation sigma*C is added once per coordinate per logical step, from a
secret generator; the divisor q N does not depend on the data. Under Poisson sampling with rate q this
is the subsampled Gaussian mechanism that dp/accountant.py accounts for. Not covered: the public data,
the choice of hyperparameters (each tuning run on private data spends privacy too), floating-point
artefacts of the Gaussian sampler (Jin et al. 2022).
"""

import torch

from kernels.clip_noise import clip_and_noise


class ClippedSum(list):
    """A micro-batch whose per-sample gradients were already clipped to C and summed (dp/bookkeeping.py):
    one fp32 tensor per parameter, each example's contribution of joint norm <= C."""


def draw_seed(noise_generator):
    """A fresh 62-bit seed for one step's noise, from the step's secret generator."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=noise_generator).item())


def noisy_clipped_gradient(grad_batches, shapes, clip, sigma, divisor, seed, backend="auto", device="cpu",
                           add_noise=True, reduce=None):
    """(sum of clipped per-sample gradients + N(0, (sigma C)^2)) / divisor, per selected parameter.

    grad_batches: an iterable over micro-batches, each a list of per-sample gradient tensors (b, *shape),
    one per parameter in the order of `shapes`, clipped and summed here by `clip_and_noise` with no noise;
    or a `ClippedSum`, already clipped and summed by dp/bookkeeping.py, only divided here. Empty for an
    empty Poisson sample. The noise is added once, at the end, by `clip_and_noise` called with zero
    examples. Returns a list of fp32 tensors of `shapes`.

    Several processes (ldm/distributed.py): each passes its own examples, exactly one passes
    add_noise=True, and `reduce` (an in-place sum over processes) runs before the result is returned, so
    the noise enters once per coordinate whatever the number of processes.
    """
    total = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes]
    for grads in grad_batches:
        if isinstance(grads, ClippedSum):
            part = [g / divisor for g in grads]
        else:
            part = clip_and_noise(grads, clip, 0.0, divisor, 0, backend=backend)
        del grads  # free this micro-batch's per-sample gradients before the next one is computed
        for acc, g in zip(total, part):
            acc.add_(g)
    if add_noise:
        empty = [torch.zeros((0, *s), dtype=torch.float32, device=device) for s in shapes]
        noise = clip_and_noise(empty, clip, sigma * clip, divisor, seed, backend=backend)
        for acc, n in zip(total, noise):
            acc.add_(n)
    if reduce is not None:
        reduce(total)
    return total


def apply_update(optimizer, params, grads, lr):
    """Set each selected parameter's .grad to its noisy gradient and take one optimiser step at `lr`."""
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
