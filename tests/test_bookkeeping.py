"""Book-keeping clipping (dp/bookkeeping.py) computes the same clipped sum as materialised per-sample gradients."""

import pytest
import torch
import torch.nn as nn

import dp.bookkeeping as bk
from dp.finetune import resolve_grad_method
from dp.per_sample import per_sample_grads
from dp.randomness import seeded_secret
from dp.select import select_parameters
from dp.step import Mechanism, Task, private_gradient
from kernels.clip_noise import clip_and_noise_reference
from ldm.build import build_unet, latent_shape
from ldm.config import make_config
from ldm.diffusion import Diffusion
from ldm.errors import UserError


def random_unet(preset="smoke"):
    torch.manual_seed(0)
    unet = build_unet(make_config(preset))
    for p in unet.parameters():  # no zero-initialised block: every selected tensor gets a gradient
        nn.init.normal_(p, std=0.1)
    return unet


def batch(preset, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, *latent_shape(make_config(preset)), generator=g)
    t, noise = Diffusion().draw(z0, g)
    return z0, torch.arange(b) % 10, t, noise


def assert_same_sum(got, ref):
    """Equal up to fp32 rounding, relative to the size of the whole clipped sum."""
    scale = torch.sqrt(sum(r.double().pow(2).sum() for r in ref)).item()
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("preset,spec,embed", [("smoke", "all", True), ("smoke", "decoder", False),
                                               ("smoke", "levels=1", True), ("quick", "all", True)])
def test_clipped_sum_and_norms_equal_the_vmap_path(preset, spec, embed):
    unet, d = random_unet(preset), Diffusion()
    params = select_parameters(unet, spec, embed)
    z0, y, t, noise = batch(preset, 6)
    per = per_sample_grads(unet, d, params, z0, y, t, noise)
    _, norms_ref = clip_and_noise_reference([per[n] for n in params], 1.0, 0.0, 1.0, 0, return_norms=True)
    clip = norms_ref.median().item()  # half the examples are clipped
    ref = clip_and_noise_reference([per[n] for n in params], clip, 0.0, 1.0, 0)
    got, norms = bk.clipped_sum(unet, d, params, z0, y, t, noise, clip)
    torch.testing.assert_close(norms, norms_ref, rtol=1e-4, atol=0)
    assert_same_sum(got, ref)


@pytest.mark.parametrize("keep", ["all", "some", "none"])
def test_kept_per_sample_weight_gradients_give_the_same_sum(monkeypatch, keep):
    """Linear layers with many tokens keep their per-sample weight gradients for the clipped sum, up to
    KEEP_FLOATS numbers per micro-batch; past it, norms in chunks and one matrix product. Same sum either way."""
    unet, d = random_unet(), Diffusion()
    params = select_parameters(unet, "all")
    z0, y, t, noise = batch("smoke", 5)
    layers, _ = bk._capture(unet, d, params, z0, y, t, noise)
    linear = [isinstance(layer.module, nn.Linear) for layer in layers]
    wide = sum(is_linear and not bk._ghost(*bk._tokens(layer.calls[0][0]).shape[1:], layer.d.shape[-1])
               for is_linear, layer in zip(linear, layers))
    budget = {"all": bk.KEEP_FLOATS, "some": 5 * 16 * 16 * 3, "none": 0}[keep]  # "some": three 16x16 weights
    monkeypatch.setattr(bk, "KEEP_FLOATS", budget)
    kept = sum(is_linear and "weight" in ps for is_linear, ps in zip(linear, bk.tensor_sq_norms(layers)[1]))
    assert wide >= 4 and kept == {"all": wide, "some": 3, "none": 0}[keep]
    per = per_sample_grads(unet, d, params, z0, y, t, noise)
    _, norms_ref = clip_and_noise_reference([per[n] for n in params], 1.0, 0.0, 1.0, 0, return_norms=True)
    clip = norms_ref.median().item()
    got, norms = bk.clipped_sum(unet, d, params, z0, y, t, noise, clip)
    torch.testing.assert_close(norms, norms_ref, rtol=1e-4, atol=0)
    assert_same_sum(got, clip_and_noise_reference([per[n] for n in params], clip, 0.0, 1.0, 0))


def test_the_reused_workspace_never_carries_one_batch_into_the_next(monkeypatch):
    """The kept per-sample gradients live in one buffer reused call after call: each call's sum equals the sum
    computed with fresh memory, a call after a larger one reuses the buffer, and a larger one grows it. No result
    aliases the buffer: every call's result is unchanged after the later calls have overwritten it."""
    unet, d = random_unet(), Diffusion()
    params = select_parameters(unet, "all")
    inputs = {b: batch("smoke", b, seed=b) for b in (3, 5)}
    monkeypatch.setattr(bk, "_WORKSPACE", {})
    fresh = {}
    for b in (3, 5):
        with monkeypatch.context() as m:
            m.setattr(bk, "_workspace", lambda numel, device: torch.full((numel,), float("nan"), device=device))
            fresh[b] = bk.clipped_sum(unet, d, params, *inputs[b], 0.5)
    pointers, results = [], []
    for b in (3, 5, 3, 5):
        got, norms = bk.clipped_sum(unet, d, params, *inputs[b], 0.5)
        pointers.append(bk._WORKSPACE[torch.device("cpu")].data_ptr())
        assert_same_sum(got, fresh[b][0])
        torch.testing.assert_close(norms, fresh[b][1], rtol=0, atol=0)
        results.append((b, [g.clone() for g in got], got))
    for b, copy, got in results:  # still what it was when returned
        assert all(torch.equal(c, g) for c, g in zip(copy, got))
    buffer = bk._WORKSPACE[torch.device("cpu")]
    assert pointers[1] == pointers[2] == pointers[3]  # grown once, for 5 examples, then reused
    assert buffer.numel() == bk._kept(bk._capture(unet, d, params, *inputs[5])[0])[1] > 0


@pytest.mark.parametrize("tokens,d_in,d_out,limit", [(2, 8, 8, 1 << 22), (16, 4, 4, 1 << 22), (16, 4, 4, 40)])
def test_linear_weight_norms_ghost_and_materialised_branches(monkeypatch, tokens, d_in, d_out, limit):
    monkeypatch.setattr(bk, "MATERIALISE_FLOATS", limit)  # 40: two examples per chunk
    g = torch.Generator().manual_seed(1)
    a, dd = torch.randn(5, tokens, d_in, generator=g), torch.randn(5, tokens, d_out, generator=g)
    want = torch.einsum("bto,bti->boi", dd, a).square().sum((1, 2))
    torch.testing.assert_close(bk._linear_weight_sq_norms(a, dd), want, rtol=1e-5, atol=0)


def test_one_example_norm_does_not_depend_on_the_others():
    """Would fail if a layer mixed the examples of a batch (the backward of step 2 would leak between them)."""
    unet, d = random_unet(), Diffusion()
    params = select_parameters(unet, "all")
    z0, y, t, noise = batch("smoke", 4)
    _, norms = bk.clipped_sum(unet, d, params, z0, y, t, noise, 1.0)
    z0b, noiseb = z0.clone(), noise.clone()
    z0b[1:] *= 3.0
    noiseb[1:] = -noiseb[1:]
    _, norms_b = bk.clipped_sum(unet, d, params, z0b, y, t, noiseb, 1.0)
    torch.testing.assert_close(norms_b[0], norms[0], rtol=1e-5, atol=0)
    assert not torch.allclose(norms_b[1:], norms[1:])


@pytest.mark.parametrize("physical", [1, 4, 7])
def test_private_gradient_is_the_same_by_either_method(physical):
    unet, d = random_unet(), Diffusion()
    params = select_parameters(unet, "all")
    n = 7
    latents = (torch.randn(n, *latent_shape(make_config("smoke"))), torch.full((n, 3, 8, 8), 0.1))
    idx, labels = torch.tensor([0, 1, 2, 4, 5, 6]), torch.arange(n)
    out, mech = {}, Mechanism(q=0.5, clip=1e-3, sigma=0.5, divisor=3.0)
    for method in ("bookkeeping", "vmap"):
        task = Task(unet, d, params, latents, labels, method, physical)
        out[method] = private_gradient(task, mech, seeded_secret(2, "test"), 4, idx)
    assert_same_sum(out["bookkeeping"], out["vmap"])  # same examples, draws and noise key


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.conv = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 1)


def test_unsupported_models_fall_back_to_vmap_or_are_refused():
    model = WithBatchNorm()
    with pytest.raises(bk.Unsupported, match="batch norm"):
        bk.check_supported(model, {"lin.weight": model.lin.weight})
    del model.bn
    conv = {"conv.weight": model.conv.weight}
    with pytest.raises(bk.Unsupported, match="Conv1d"):
        bk.check_supported(model, conv)
    assert resolve_grad_method("auto", model, conv) == "vmap"
    with pytest.raises(UserError, match="--grad-method bookkeeping: .*Conv1d"):
        resolve_grad_method("bookkeeping", model, conv)
    unet = random_unet()
    assert resolve_grad_method("auto", unet, select_parameters(unet, "all")) == "bookkeeping"
    assert resolve_grad_method("vmap", unet, select_parameters(unet, "all")) == "vmap"


def test_a_module_called_twice_is_refused():
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, t, y):
            return self.lin(self.lin(x))

    class Loss:
        def loss_per_example(self, model, x, y, t, noise):
            return model(x, t, y).pow(2).sum(1)

    with pytest.raises(bk.Unsupported, match="called 2 times"):
        bk.clipped_sum(Twice(), Loss(), dict(lin.named_parameters(prefix="lin")), torch.randn(2, 3),
                       torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), 1.0)


def test_a_selected_module_off_the_forward_path_gets_zero_gradient():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x, t, y):
            return self.used(x)

    class Loss:
        def loss_per_example(self, model, x, y, t, noise):
            return model(x, t, y).pow(2).sum(1)

    model = Spare()
    params = dict(model.named_parameters())
    got, norms = bk.clipped_sum(model, Loss(), params, torch.randn(4, 3), torch.zeros(4), torch.zeros(4),
                                torch.zeros(4, 3), 1e6)
    grads = dict(zip(params, got))
    assert not grads["spare.weight"].any() and not grads["spare.bias"].any() and grads["used.weight"].any()
    x = torch.randn(4, 3)  # the used layer's result still matches autograd
    got, _ = bk.clipped_sum(model, Loss(), params, x, torch.zeros(4), torch.zeros(4), torch.zeros(4, 3), 1e6)
    model.zero_grad()
    model.used(x).pow(2).sum().backward()
    torch.testing.assert_close(got[0], model.used.weight.grad)


def test_configs_stored_before_grad_method_existed_load_as_vmap_and_others_stay_strict():
    from ldm.config import config_from_dict, config_to_dict
    stored = config_to_dict(make_config("smoke"))
    del stored["dp"]["grad_method"]  # a checkpoint written before --grad-method existed
    assert config_from_dict(stored).dp.grad_method == "vmap"  # what that code did
    del stored["dp"]["clip"]
    with pytest.raises(UserError, match="clip"):
        config_from_dict(stored)
