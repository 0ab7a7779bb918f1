"""The comparison peer of `python -m dp.bench`: the same DP step taken by Opacus (a benchmark-only dependency,
imported only here and only when a method needs it), in hook mode (c) and with ghost clipping (g), and Opacus's
clipped sum for the bench's sanity check.

  (c) `opacus.GradSampleModule` (hooks materialise per-sample gradients) + `opacus.optimizers.DPOptimizer` (flat
      clipping: a norm per tensor, stack, norm of norms, clamped factor, an einsum per tensor);
  (g) fast gradient clipping (Li et al. 2022, Bu et al. 2023): `GradSampleModuleFastGradientClipping` (ghost norms
      for Linear layers, per-sample norms for the rest) + `DPOptimizerFastGradientClipping`, driven by
      `DPTensorFastGradientClipping.backward`: two backward passes per micro-batch (norms, then the loss reweighted
      by the clip factors).
Both take the bench's micro-batches (what `opacus.utils.BatchMemoryManager` does: every micro-batch but the last
is a skipped step), the same C, noise multiplier and expected batch size B, and the preset's optimiser.

Opacus is given only the selected parameters that a backward reaches (`opacus_params`): it raises for one that
none does, and attn2.to_q, to_k and norm2 are never called (ldm/attention.py `Attention.one_key`).
`s` is dp/bench.py's Setup (config, Task, secret, sampled indices, step counter).
"""

import warnings

import torch

from dp.step import example_inputs, make_optimizer


def on_forward_path(s):
    """Names of the selected parameters that receive a gradient at all (one backward on two examples): all but
    attn2.to_q, attn2.to_k and norm2 of every block, which the forward never calls (ldm/attention.py
    `Attention.one_key`: cross-attention to the one class token does not depend on its queries and keys)."""
    z0, y, t, noise = (v[:2] for v in example_inputs(s.task, s.secret, s.step, s.idx))
    loss = s.task.diffusion.loss_per_example(s.task.unet, z0, y, t, noise).sum()
    grads = torch.autograd.grad(loss, list(s.task.params.values()), allow_unused=True)
    return [n for n, g in zip(s.task.params, grads) if g is not None]


def opacus_params(s):
    """The selected parameters Opacus is given: those on the forward path. Opacus needs a per-sample gradient for
    every trainable parameter and raises for a module that is never called, so the others are frozen while it
    runs (`thaw` undoes it); they get no noise from Opacus (ours adds theirs: 7.5% of the quick preset's
    coordinates, a few ms per step in Opacus's favour)."""
    reached = set(on_forward_path(s))
    for n, p in s.task.params.items():
        p.requires_grad_(n in reached)
    return {n: p for n, p in s.task.params.items() if n in reached}


def thaw(s):
    """Make every selected parameter trainable again after `opacus_params`."""
    for p in s.task.params.values():
        p.requires_grad_(True)


def opacus_wrap(s, sigma, clip):
    """(GradSampleModule around the UNet, DPOptimizer over the selected parameters) with clip C and expected batch B."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    # the latents need no gradient, so torch says Opacus's backward hooks see gradients w.r.t. outputs only: expected
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    params = opacus_params(s)
    model = GradSampleModule(s.task.unet, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(make_optimizer(s.cfg.dp, params), noise_multiplier=sigma, max_grad_norm=clip,
                      expected_batch_size=len(s.idx), loss_reduction="mean")
    return model, opt


def opacus_backward(s, model, opt):
    """Per-sample gradients by Opacus's hooks, clipped and accumulated one physical micro-batch at a time
    (what opacus.utils.BatchMemoryManager does: every micro-batch but the last is a skipped step)."""
    z0, y, t, noise = example_inputs(s.task, s.secret, s.step, s.idx)
    chunks = torch.arange(len(z0), device=z0.device).split(s.cfg.dp.physical_batch)
    for i, c in enumerate(chunks):
        s.task.diffusion.loss_per_example(model, z0[c], y[c], t[c], noise[c]).mean().backward()
        if i < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)


def opacus_ghost_wrap(s, sigma, clip):
    """(GradSampleModuleFastGradientClipping around the UNet, DPOptimizerFastGradientClipping), clip C, batch B."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    params = opacus_params(s)
    model = GradSampleModuleFastGradientClipping(s.task.unet, batch_first=True, loss_reduction="mean",
                                                 max_grad_norm=clip, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(make_optimizer(s.cfg.dp, params), noise_multiplier=sigma,
                                          max_grad_norm=clip, expected_batch_size=len(s.idx), loss_reduction="mean")
    return model, opt


def opacus_ghost_backward(s, model, opt):
    """Clipped gradients by Opacus's two backward passes, accumulated one physical micro-batch at a time."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
    z0, y, t, noise = example_inputs(s.task, s.secret, s.step, s.idx)
    chunks = torch.arange(len(z0), device=z0.device).split(s.cfg.dp.physical_batch)
    for i, c in enumerate(chunks):
        losses = s.task.diffusion.loss_per_example(model, z0[c], y[c], t[c], noise[c])
        DPTensorFastGradientClipping(model, opt, losses, loss_reduction="mean").backward()
        if i < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)


OPACUS = {"c": (opacus_wrap, opacus_backward), "g": (opacus_ghost_wrap, opacus_ghost_backward)}


def opacus_step(s, method, sigma):
    """(c, g) Opacus, hook mode or ghost clipping, with the same clipping, noise multiplier and divisor as ours."""
    wrap, backward = OPACUS[method]
    model, opt = wrap(s, sigma, s.cfg.dp.clip)

    def step():
        backward(s, model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        s.step += 1
    return step


def opacus_clipped_sum(s, method, clip, names):
    """Opacus's (hook mode c or ghost g) clipped gradient sum / B with sigma 0, on the batch ours used."""
    wrap, backward = OPACUS[method]
    model, opt = wrap(s, 0.0, clip)
    backward(s, model, opt)  # the same step: the same z0, t and noise as ours drew
    opt.pre_step()  # clip (hook mode) and accumulate the last micro-batch, add (zero) noise, divide by B
    theirs = [zero_if_none(s.task.params[n]) for n in names]
    model._close()
    thaw(s)
    s.task.unet.zero_grad(set_to_none=True)
    return theirs


def opacus_coverage(unet):
    """One line: the layer types that hold trainable parameters and whether Opacus has a grad sampler for each."""
    from opacus import GradSampleModule
    types = sorted({type(m).__name__: type(m) for m in unet.modules()
                    if any(p.requires_grad for p in m.parameters(recurse=False))}.items())
    missing = [name for name, cls in types if cls not in GradSampleModule.GRAD_SAMPLERS]
    names = ", ".join(name for name, _ in types)
    if missing:
        return f"opacus: no grad sampler for {', '.join(missing)} (Opacus falls back to functorch for them); " \
               f"trainable layer types: {names}"
    return f"opacus: grad samplers for every trainable layer type ({names})"


def zero_if_none(p):
    """A copy of p.grad, or zeros when no gradient reached p (a module the forward never called)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()
