"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the attention
projections of the fine-tuned transformer blocks (`--dp-lora RANK`), as the original DP-LDM code and DP-LoRA
(Yu et al. 2022, "Differentially private fine-tuning of language models") do.

A projection y = x W^T + b, W: (out, in), becomes (Hu et al. 2021, Eq. 3)

    y = x W^T + b + scale * (x A^T) B^T,    A = down.weight: (r, in),  B = up.weight: (out, r),  scale = alpha / r

with W and b frozen. B starts at zero, so the adapted model starts exactly equal to the pretrained one; A
starts uniform in +-1/sqrt(in) (nn.Linear's own initialisation, as in Hu et al.'s code), from a generator seeded
by --seed: public randomness. alpha = r, so scale = 1 (Hu et al. 2021, Sec. 4.1: alpha is set to the first r
tried and not tuned). DP-SGD then trains r (in + out) numbers per projection instead of in * out + out: less
total noise for the same sigma. The privacy argument is unchanged: the clipped, noised gradient is that of the
LoRA factors (and the class embedding), and the released model is a function of them and public weights.

`merge_lora` folds every adapter back into its projection, W' = W + scale * B A, so that what a checkpoint
releases (its EMA UNet) has the plain architecture of ldm/unet.py and every reader loads it unchanged.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserError

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")  # of Attention, ldm/attention.py
ATTENTIONS = ("attn1", "attn2")  # self- and cross-attention of SpatialTransformer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a rank-r update: x: (..., in) -> (..., out), x W^T + b + scale * up(down(x)).

    The base layer's own parameters are kept under their own names (`weight`, `bias`), so that the adapted
    model's state dict is the pretrained one plus `down.weight` and `up.weight` for each adapted projection.
    """

    def __init__(self, base, rank, generator):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the pretrained parameters, frozen by dp/select.py
        self.scale = 1.0  # alpha / r with alpha = r (module docstring)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        bound = 1 / math.sqrt(base.in_features)
        down = torch.empty(self.down.weight.shape).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.zero_()
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.up(self.down(x)) * self.scale

    def merged_weight(self):
        """W + scale * B A: (out, in), the weight of the plain layer that computes the same function."""
        return self.weight + self.scale * (self.up.weight @ self.down.weight)


def lora_generator(seed):
    """The public generator of the adapters' initialisation (--seed)."""
    return torch.Generator().manual_seed(seed)


def add_lora(unet, blocks, rank, generator):
    """Replace to_q, to_k, to_v, to_out of attn1 and attn2 in the transformer blocks `blocks` (names from
    dp/select.py's `parse_blocks`) by LoRALinear adapters of rank `rank`, in place; returns `unet`."""
    for block in blocks:
        for attn_name in ATTENTIONS:
            attention = getattr(unet.attn[block], attn_name)
            for proj in PROJECTIONS:
                base = getattr(attention, proj)
                smallest = min(base.in_features, base.out_features)
                if not 1 <= rank <= smallest:
                    raise UserError(f"--dp-lora {rank}: the rank must lie in 1..{smallest}, the smallest side of "
                                    f"attn.{block}.{attn_name}.{proj} ({base.out_features} x {base.in_features})")
                setattr(attention, proj, LoRALinear(base, rank, generator))
    return unet


def lora_modules(unet):
    """[(name, LoRALinear)] of the adapted projections, in model order."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, LoRALinear)]


def factor_projections(unet):
    """{factor name: its projection's weight name}, e.g. `attn.mid.attn1.to_q.down.weight` -> `...to_q.weight`,
    for both factors of every adapter."""
    return {f"{name}.{factor}.weight": f"{name}.weight" for name, _ in lora_modules(unet) for factor in ("down", "up")}


def merged_names(unet, names):
    """The plain-architecture names whose merged value depends on the parameters `names` of `unet`: an adapter's
    factor maps to its projection's weight, any other name to itself."""
    projection = factor_projections(unet)
    return {projection.get(n, n) for n in names}


def merged_state(unet):
    """{name: tensor}: the state dict of the plain architecture computing what `unet` computes, with every
    adapter folded into its projection's weight (its factors dropped). A plain UNet gives its own state dict."""
    state = unet.state_dict()
    with torch.no_grad():
        for name, m in lora_modules(unet):
            state[f"{name}.weight"] = m.merged_weight()
            del state[f"{name}.down.weight"], state[f"{name}.up.weight"]
    return state


def merge_lora(unet):
    """Replace every LoRALinear of `unet` by a plain nn.Linear with weight W + scale * B A, in place; returns it."""
    for name, m in lora_modules(unet):
        parent_name, _, child = name.rpartition(".")
        plain = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None,
                          device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(m.merged_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        setattr(unet.get_submodule(parent_name), child, plain)
    return unet


def merged_copy(unet):
    """A frozen copy of `unet` in the plain architecture (adapters merged): the EMA model of the private stage."""
    return merge_lora(copy.deepcopy(unet)).requires_grad_(False)
