"""Clipped per-sample gradient sums without a (b, P) per-sample gradient ("book-keeping" clipping).

The vmap path (dp/per_sample.py) materialises a (b, P) per-sample gradient for every micro-batch and
then clips and sums it; on a CPU writing and reading those b x P numbers is most of a DP step. This
module computes exactly the same quantity, sum_i min(1, C / (||g_i|| + EPS)) g_i, from one forward and
one backward pass of the micro-batch (Bu et al. 2023, "Differentially private optimization on large
model at small cost", book-keeping; Li et al. 2022 for the ghost norm):

  1-2. `_capture`: a forward with hooks that keep, for every module owning a selected parameter, its input a
     and output; one backward to those outputs only (no weight gradients). The output gradient d of each
     example depends on that example alone, because no layer of the UNet mixes examples (GroupNorm and
     LayerNorm are per example; there is no BatchNorm: `check_supported` refuses modules it does not know);
  3. `tensor_sq_norms`: each example's squared gradient norm, tensor by tensor. For a Linear layer the
     per-sample weight gradient is d_i^T a_i, whose squared norm is sum((a_i a_i^T) * (d_i d_i^T)) ("ghost
     norm", cheap for few tokens). When that is dearer (many tokens T, narrow layers: T (i + o) > i o), d_i^T a_i
     is built, which costs what the layer's weight gradient costs, and kept for step 5 (up to KEEP_FLOATS
     numbers per micro-batch, in one reused workspace; beyond that its norm is taken a few examples at a time
     and it is dropped). Norms,
     biases, the class embedding: their small per-sample gradients are formed directly;
  4. `tensor_factors`: ONE clip factor per example over all tensors jointly, c_i = min(1, C / (||g_i|| + EPS)),
     ||g_i||^2 the sum of every tensor's term (`joint_norms`), with EPS and the formula of kernels/clip_noise.py;
     an example whose norm is not finite gets c_i = 0 and its activations and output gradients are zeroed,
     so that it contributes exactly zero (never 0 x inf = NaN);
  5. `_layer_sums`: the clipped sum layer by layer: sum_i c_i g_i over a kept per-sample gradient, else
     (c * d)^T a for a Linear weight: one matrix product.

Each step, and each layer's share of steps 3 and 5 by `_kind`, is a named range for profiles (dp/phases.py: a
`torch.profiler.record_function` while a profiler records, else nothing): `python -m dp.breakdown` times them.

Supported owners of selected parameters: nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding, each
called at most once per forward (a module not called has a zero gradient). Anything else raises
`Unsupported` (use --grad-method vmap).
tests/test_bookkeeping.py checks the result against the vmap path and a batch-size-1 loop.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dp.phases import phase
from kernels.clip_noise import clip_factors

SUPPORTED = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
MATERIALISE_FLOATS = 1 << 18  # per-sample weight gradients built at once: 1 MiB, stays in cache for the norm
KEEP_FLOATS = 1 << 26  # per-sample weight gradients kept for the clipped sum, all layers of a micro-batch: 256 MiB


class Unsupported(ValueError):
    """The model or the selection is outside what book-keeping handles; --grad-method vmap handles it."""


def owners(unet, params):
    """[(module, {local name: full name})] for the modules that own selected parameters, in model order."""
    found = []
    for prefix, module in unet.named_modules():
        own = {local: f"{prefix}.{local}" if prefix else local for local, _ in module.named_parameters(recurse=False)}
        chosen = {k: v for k, v in own.items() if v in params}
        if chosen:
            found.append((module, chosen))
    return found


def check_supported(unet, params):
    """Raise Unsupported naming the first selected parameter this module cannot handle, or a layer
    that mixes the examples of a batch (batch norm), which would break the per-example backward of step 2."""
    for name, module in unet.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise Unsupported(f"book-keeping clipping cannot run a model with batch norm ({name}): it mixes "
                                      f"examples; use --grad-method vmap")
    for module, chosen in owners(unet, params):
        if not isinstance(module, SUPPORTED):
            raise Unsupported(f"book-keeping clipping does not support {type(module).__name__} "
                                      f"(parameter {next(iter(chosen.values()))}); use --grad-method vmap")


def _tokens(x):
    """(b, ..., f) -> (b, T, f)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _sq_norms(g):
    """(b, ...) -> (b,) squared norm of each example's slice: one fused reduction, no squared copy of g."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def _ghost(tokens, d_in, d_out):
    """True when the ghost norm, two (T, T) Gram matrices per example, is cheaper than building d_i^T a_i (o, i)."""
    return tokens * (d_in + d_out) <= d_in * d_out


def _linear_weight_sq_norms(a, d):
    """Squared Frobenius norms of d_i^T a_i, a: (b, T, i), d: (b, T, o) -> (b,)."""
    b, T, i = a.shape
    o = d.shape[-1]
    if _ghost(T, i, o):
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    chunk = max(1, MATERIALISE_FLOATS // (i * o))
    return torch.cat([torch.linalg.vector_norm(d[s:s + chunk].transpose(1, 2) @ a[s:s + chunk], dim=(1, 2)).square()
                      for s in range(0, b, chunk)])


class _Layer:
    """One module's captured input/output and what it needs for norms and the clipped sum."""

    def __init__(self, module, chosen):
        self.module, self.chosen, self.calls = module, chosen, []

    def hook(self, module, inputs, output):
        self.calls.append((inputs[0].detach(), output))

    def per_sample(self, d):
        """{local name: (b, ...) per-sample gradient} of the small parameters (norm weights, biases)."""
        m, (a, _) = self.module, self.calls[0]
        if isinstance(m, nn.Linear):
            return {"bias": _tokens(d).sum(1)} if "bias" in self.chosen else {}
        if isinstance(m, nn.Embedding):
            return {}
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
            dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
        else:  # GroupNorm over (b, C, *spatial)
            xhat = F.group_norm(a, m.num_groups, eps=m.eps)
            dims = tuple(range(2, a.dim()))
        grads = {"weight": (d * xhat).sum(dims), "bias": d.sum(dims)}
        return {k: v for k, v in grads.items() if k in self.chosen}


def _drop_examples(layers, direct, keep):
    """Zero every captured tensor of the examples not in `keep` (b,) bool: they then contribute exactly zero."""
    def zeroed(x):
        return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))
    for layer, ps in zip(layers, direct):
        a, out = layer.calls[0]
        layer.calls[0] = (a if a.dtype == torch.long else zeroed(a), out)
        layer.d = zeroed(layer.d)
        for k in ps:
            ps[k] = zeroed(ps[k])


def _capture(unet, diffusion, params, z0, y, t, noise):
    """Step 1-2: one forward with hooks and one backward to the hooked outputs. Returns the layers that ran, each
    holding its input a and output gradient d (`layer.d`), and the layers off the forward path (zero gradient)."""
    layers = [_Layer(m, chosen) for m, chosen in owners(unet, params)]
    handles = [layer.module.register_forward_hook(layer.hook) for layer in layers]
    try:
        with torch.enable_grad():
            losses = diffusion.loss_per_example(unet, z0, y, t, noise)
    finally:
        for h in handles:
            h.remove()
    unused = [layer for layer in layers if not layer.calls]
    layers = [layer for layer in layers if layer.calls]
    for layer in layers:
        if len(layer.calls) != 1:
            raise Unsupported(f"book-keeping clipping needs each selected module called at most once per forward; "
                              f"{type(layer.module).__name__} owning {next(iter(layer.chosen.values()))} "
                              f"was called {len(layer.calls)} times; use --grad-method vmap")
    grads_out = torch.autograd.grad(losses.sum(), [layer.calls[0][1] for layer in layers], allow_unused=True)
    for layer, d in zip(layers, grads_out):
        layer.d = torch.zeros_like(layer.calls[0][1]) if d is None else d.float()
    return layers, unused


def _kept(layers):
    """{index in layers: (start, stop) in the workspace} of the Linear weights whose per-sample gradients are
    built and kept (many tokens: not `_ghost`), in model order while they fit in KEEP_FLOATS; and the numbers
    they need."""
    kept, total = {}, 0
    for i, layer in enumerate(layers):
        m, a = layer.module, layer.calls[0][0]
        if isinstance(m, nn.Linear) and "weight" in layer.chosen:
            n, tokens = len(a) * m.weight.numel(), math.prod(a.shape[1:-1])
            if not _ghost(tokens, m.in_features, m.out_features) and total + n <= KEEP_FLOATS:
                kept[i], total = (total, total + n), total + n
    return kept, total


def _kind(layer, kept):
    """How steps 3 and 5 treat this layer, as its profile range names it: 'Linear kept' (per-sample weight
    gradients kept: `kept` True), 'Linear ghost' (ghost norm, then one matrix product), or the module type
    (per-sample gradients formed directly: norm layers, a Linear whose weight is not selected, the embedding)."""
    if isinstance(layer.module, nn.Linear) and "weight" in layer.chosen:
        return "Linear kept" if kept else "Linear ghost"
    return type(layer.module).__name__


_WORKSPACE = {}  # device -> flat fp32 tensor: the kept per-sample gradients of the micro-batch being clipped


def _workspace(numel, device):
    """A flat fp32 tensor of at least `numel` numbers, the same memory call after call (grown when too small).

    Fresh memory for the kept gradients (up to 256 MiB per micro-batch) cost ~27k page faults per micro-batch of
    128 on the CPU, about 35 ms of the 80 ms their products took; reusing one buffer removes them. Its content is
    overwritten before it is read, and nothing returned by `clipped_sum` aliases it (it is not re-entrant).
    """
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def tensor_sq_norms(layers):
    """Step 3: ({full name: (b,) squared norm of each example's gradient of that tensor}, [per-layer direct
    per-sample gradients {local name: (b, ...)}]), one entry per selected tensor on the forward path.
    Kept per-sample weight gradients are views of the workspace, valid until the next call."""
    sq, direct = {}, []
    kept, total = _kept(layers)
    space = _workspace(total, layers[0].d.device) if kept else None
    for i, layer in enumerate(layers):
        with phase(f"bookkeeping.norms {_kind(layer, i in kept)}"):
            direct.append(_layer_sq_norms(layer, sq, space[slice(*kept[i])] if i in kept else None))
    return sq, direct


def _layer_sq_norms(layer, sq, slot):
    """Step 3 for one layer: adds its tensors' (b,) squared norms to `sq` and returns its direct per-sample
    gradients; a Linear weight's are built in `slot` (its part of the workspace) when kept, else ghost-normed."""
    m, a, d = layer.module, layer.calls[0][0], layer.d
    ps = layer.per_sample(d)
    if isinstance(m, nn.Linear) and "weight" in layer.chosen:
        a2, d2 = _tokens(a.float()), _tokens(d)
        if slot is not None:  # (b, o, i), kept: the clipped sum is then a weighted sum
            ps["weight"] = torch.bmm(d2.transpose(1, 2), a2, out=slot.view(len(a2), *m.weight.shape))
        else:
            sq[layer.chosen["weight"]] = _linear_weight_sq_norms(a2, d2)
    for local, g in ps.items():
        sq[layer.chosen[local]] = _sq_norms(g)
    if isinstance(m, nn.Embedding):
        sq[layer.chosen["weight"]] = _sq_norms(d)  # example i's gradient: d_i in row y_i
    return ps


def joint_norms(sq):
    """Each example's gradient norm over ALL selected tensors jointly: sqrt of the sum of every tensor's term."""
    return torch.stack(list(sq.values())).sum(0).sqrt()


def tensor_factors(sq, clip):
    """Step 4: {full name: (b,) clip factor}, the SAME joint factor min(1, C / (||g_i|| + EPS)) for every tensor
    (clipping each tensor on its own would let up to sqrt(#tensors) C through), and the joint norms (b,)."""
    norms = joint_norms(sq)
    factor = clip_factors(norms, clip)
    return {name: factor for name in sq}, norms


def _layer_sums(layer, ps, factors):
    """Step 5 for one layer: {full name: sum_i c_i g_i} of its selected tensors."""
    m, a, d = layer.module, layer.calls[0][0], layer.d
    out = {}
    for local, full in layer.chosen.items():
        factor = factors[full]
        if local in ps:
            out[full] = factor @ ps[local].flatten(1)
        elif isinstance(m, nn.Linear):  # weight: sum_i c_i d_i^T a_i, scaling the narrower of d and a
            a2, d2 = _tokens(a.float()), _tokens(d)
            if d2.shape[-1] <= a2.shape[-1]:
                d2 = d2 * factor.view(-1, 1, 1)
            else:
                a2 = a2 * factor.view(-1, 1, 1)
            out[full] = d2.flatten(0, 1).T @ a2.flatten(0, 1)
        else:  # Embedding: example i adds c_i d_i to row y_i
            cd = d * factor.view(-1, 1)
            out[full] = torch.zeros_like(m.weight, dtype=torch.float32).index_add_(0, a.flatten(), cd)
    return out


def clipped_sum(unet, diffusion, params, z0, y, t, noise, clip):
    """sum_i min(1, C / (||g_i|| + EPS)) g_i over the b examples, g_i the gradient of example i's diffusion
    loss w.r.t. all selected parameters jointly. Returns ([fp32 tensor per parameter in `params` order], norms (b,)).
    """
    with phase("bookkeeping.capture"):
        layers, unused = _capture(unet, diffusion, params, z0, y, t, noise)
    out = {full: torch.zeros(params[full].shape, device=z0.device)
           for layer in unused for full in layer.chosen.values()}
    if not layers:  # nothing selected lies on the forward path: every gradient is zero
        return [out[n] for n in params], torch.zeros(len(z0), device=z0.device)
    sq, direct = tensor_sq_norms(layers)
    with phase("bookkeeping.factors"):
        factors, norms = tensor_factors(sq, clip)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            _drop_examples(layers, direct, finite)
    for layer, ps in zip(layers, direct):
        with phase(f"bookkeeping.sums {_kind(layer, 'weight' in ps)}"):
            out.update(_layer_sums(layer, ps, factors))
        layer.calls, layer.d = [], None
    return [out[n].reshape(p.shape) for n, p in params.items()], norms
