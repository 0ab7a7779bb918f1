"""White-box example canaries: real examples through the default DP step, one canary per logical step.

Canary j is an image (uniform noise, a random label) encoded by the frozen autoencoder and appended to the
private set as example n_real + j. When it is in, it goes through everything a private example goes through:
the Poisson sampler, its own posterior sample, timestep and noise draws, the per-example clipping of the
configured --grad-method (book-keeping by default), the Gaussian noise and the divisor of dp/step.py's
`private_gradient`. A bug in any of them reaches the canary as it would reach a private example.

Canary j owns the logical steps j S .. j S + S - 1 (S = `steps` per canary). Their batch holds canary j alone
when it is in and Poisson-sampled (rate q), and nothing otherwise. The other examples are known to the
adversary, who can subtract their contribution, so leaving them out is the same test without their cost. A
canary thus changes only its own steps: by parallel composition each canary is protected by the subsampled
Gaussian mechanism with (sigma, q, S), which is what the audit accounts. Nothing is updated between steps:
an update is post-processing of the released gradient, which the score reads directly.

Why not a class-embedding row per canary, scored on that row only: measured on the smoke model, the row
carries 0.4% of an example's gradient norm (the transformer blocks' proj_out most of it), so the row sees
almost nothing of the canary. One canary per step lets the score use the whole released gradient.

Scores (white-box). At each of its steps the auditor recomputes the canary's gradient by plain autograd on
that one example at the same draws, independently of dp/bookkeeping.py and dp/per_sample.py, and clips it
    joint   to C over all selected tensors together: what the mechanism claims to release;
    tensor  each tensor to C on its own: what the commonest clipping bug releases (up to sqrt(#tensors) C).
A score is the released gradient times the divisor, projected on that direction and summed over the
canary's steps, over C sqrt(sum of the direction's squared norms): for an excluded canary it is N(0, sigma^2)
whatever the direction, so any leak beyond sensitivity C shows as a shift of the included canaries' scores.
The auditor reads the canary's draws (the guarantee holds for any fixed draws), never the Poisson sample,
the noise or which canaries are in.
"""

import torch
from tqdm import tqdm

from dp.randomness import poisson_sample
from dp.step import example_inputs, private_gradient
from ldm.data import ImageSet

SCORES = ("joint", "tensor")


def input_canaries(m, like, generator):
    """m uniform-noise images of the private set's shape with random labels (example and black-box canaries)."""
    x = torch.randint(0, 256, (m, *like.x.shape[1:]), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, like.num_classes, (m,), generator=generator)
    return ImageSet("canaries", x, y, like.num_classes)


def reference_directions(task, clip, inputs):
    """The auditor's own clipped gradients of ONE example, by plain autograd: (joint, tensor), each a (P,)
    float64 vector over the selected tensors in order. inputs: (z0, y, t, noise) of that example, batch 1."""
    params = list(task.params.values())
    with torch.enable_grad():
        loss = task.diffusion.loss_per_example(task.unet, *inputs).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.double().flatten().cpu()
             for g, p in zip(grads, params)]
    norms = [float(g.norm()) for g in grads]
    total = sum(n * n for n in norms) ** 0.5
    joint = torch.cat(grads) * (clip / total if total > clip else 1.0)
    tensor = torch.cat([g * (clip / n if n > clip else 1.0) for g, n in zip(grads, norms)])
    return joint, tensor


def example_canary_scores(task, n_real, included, mech, secret, steps):
    """m * steps logical DP steps through `private_gradient`, canary j alone in its own `steps`; returns
    {score name: (m,) float64} (see the module docstring). task: the private task with the canaries appended."""
    m, n, device = len(included), n_real + len(included), task.latents[0].device
    dots = torch.zeros(len(SCORES), m, dtype=torch.float64)
    squares = torch.zeros(len(SCORES), m, dtype=torch.float64)
    for j in tqdm(range(m), desc=f"audit: {m} example canaries, {steps} step(s) each"):
        slot = torch.tensor([n_real + j], device=device)
        for s in range(steps):
            step = j * steps + s
            sampled = bool((poisson_sample(secret, step, n, mech.q) == n_real + j).any())
            idx = slot if sampled and bool(included[j]) else slot[:0]
            grads = private_gradient(task, mech, secret, step, idx)
            released = torch.cat([g.flatten() for g in grads]).double().cpu() * mech.divisor
            for k, h in enumerate(reference_directions(task, mech.clip, example_inputs(task, secret, step, slot))):
                dots[k, j] += released @ h
                squares[k, j] += h @ h
    scores = dots / (mech.clip * squares.sqrt().clamp_min(1e-300))
    return dict(zip(SCORES, scores))
