"""Shapes, gradients and zero-initialisation of every module."""

import pytest
import torch

from ldm.attention import Attention, FeedForward, SpatialTransformer
from ldm.autoencoder import Autoencoder
from ldm.nn import ResBlock, timestep_embedding
from ldm.unet import UNet


def grads_flow(module, out, structurally_zero=None):
    """Backpropagate mean(out^2) and check every parameter of `module` got a usable gradient from it.

    Fails when a gradient is None, not finite or all zero. `structurally_zero` maps the name of each parameter whose
    gradient is zero by construction to the reason; those gradients must then be exactly zero or absent (None: the
    forward never used the parameter; an exemption that no longer holds fails too), so nothing is skipped silently.
    """
    structurally_zero = structurally_zero or {}
    params = dict(module.named_parameters())
    unknown = sorted(set(structurally_zero) - set(params))
    assert not unknown, f"exemptions that name no parameter: {unknown}"
    module.zero_grad(set_to_none=True)
    out.square().mean().backward()
    missing = [n for n, p in params.items() if p.grad is None and n not in structurally_zero]
    assert not missing, f"no gradient reached {missing}"
    not_finite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradient in {not_finite}"
    zero = {n for n, p in params.items() if p.grad is None or not p.grad.any()}
    unexplained = sorted(zero - set(structurally_zero))
    assert not unexplained, f"all-zero gradient in {unexplained}"
    stale = {n: structurally_zero[n] for n in sorted(set(structurally_zero) - zero)}
    assert not stale, f"gradients said to be zero by construction are not: {stale}"


BEFORE_ZERO_CONV = "residual path before a ResBlock's zero-initialised conv2, whose zero weight passes back no gradient"
SINGLE_TOKEN = ("cross-attention to one context token: its softmax is identically 1 whatever q and k, so the forward "
                "never calls the query and key weights or the LayerNorm before them (Attention.one_key)")


def before_zero_conv(module):
    """Names of the parameters of every ResBlock in `module` that sit before its conv2 (all but conv2 and skip)."""
    names = {}
    for prefix, m in module.named_modules():
        if isinstance(m, ResBlock):
            for n, _ in m.named_parameters():
                if not n.startswith(("conv2.", "skip.")):
                    names[f"{prefix}.{n}" if prefix else n] = BEFORE_ZERO_CONV
    return names


def single_token_query_key(module):
    """Names of attn2.to_q, attn2.to_k and norm2 parameters of every SpatialTransformer in `module`."""
    names = {}
    for prefix, m in module.named_modules():
        if isinstance(m, SpatialTransformer):
            for n in ("attn2.to_q.weight", "attn2.to_k.weight", "norm2.weight", "norm2.bias"):
                names[f"{prefix}.{n}" if prefix else n] = SINGLE_TOKEN
    return names


def test_grads_flow_rejects_silent_gradients():
    """The helper itself: a missing, a non-finite or an all-zero gradient fails, and so does a stale exemption."""
    layer, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    with pytest.raises(AssertionError, match=r"no gradient reached \['weight'\]"):
        grads_flow(layer, x @ layer.weight.detach().T + layer.bias)  # the weight is cut out of the graph
    with pytest.raises(AssertionError, match=r"non-finite gradient in \['weight', 'bias'\]"):
        grads_flow(layer, layer(x) * float("nan"))
    with pytest.raises(AssertionError, match=r"all-zero gradient in \['bias', 'weight'\]"):
        grads_flow(layer, layer(x) * 0.0)
    with pytest.raises(AssertionError, match="said to be zero by construction are not: {'bias': 'claimed'}"):
        grads_flow(layer, layer(x), {"bias": "claimed"})
    grads_flow(layer, layer(x))


def test_timestep_embedding_shape_and_distinct():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 33)
    assert e.shape == (3, 33)
    assert not torch.allclose(e[0], e[1])


def test_resblock_starts_as_skip_and_trains():
    block = ResBlock(8, 16, emb_dim=12)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    out = block(x, emb)
    assert out.shape == (2, 16, 6, 6)
    assert torch.allclose(out, block.skip(x))  # zero-initialised conv2: the residual path is 0
    grads_flow(block, out, before_zero_conv(block))  # norm1, conv1, emb, norm2: zero until conv2 has moved
    torch.nn.init.normal_(block.conv2.weight, std=0.05)  # as after a training step
    grads_flow(block, block(x, emb))


def test_attention_self_and_cross_shapes():
    x, ctx = torch.randn(2, 10, 8), torch.randn(2, 1, 5)
    assert Attention(8, 2)(x).shape == (2, 10, 8)
    assert Attention(8, 2, context_dim=5)(x, ctx).shape == (2, 10, 8)
    assert FeedForward(8)(x).shape == (2, 10, 8)


def test_attention_matches_reference_softmax():
    torch.manual_seed(0)
    att = Attention(8, 2)
    x = torch.randn(1, 5, 8)
    q, k, v = att.to_q(x), att.to_k(x), att.to_v(x)
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[0, :, s] @ k[0, :, s].T / 2.0, dim=-1)
        heads.append(w @ v[0, :, s])
    assert torch.allclose(att(x)[0], att.to_out(torch.cat(heads, -1)), atol=1e-6)


def test_one_key_is_attention_to_a_single_context_token_whatever_the_queries():
    torch.manual_seed(0)
    att = Attention(8, 2, context_dim=5)
    ctx = torch.randn(3, 1, 5)
    for x in (torch.randn(3, 10, 8), 100 * torch.randn(3, 10, 8)):
        assert torch.allclose(att(x, ctx), att.one_key(ctx).expand(3, 10, 8), atol=1e-6)


def test_spatial_transformer_takes_the_one_key_path_for_one_token_with_the_same_output():
    """Two copies of the class token take the general path (softmax 1/2 each over equal values): the same output
    and the same gradients of every parameter as the one-token path, which never calls to_q, to_k or norm2."""
    torch.manual_seed(0)
    st = SpatialTransformer(8, 2, 6)
    torch.nn.init.normal_(st.proj_out.weight, std=0.05)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 1, 6)
    grads = {}
    for name, context in (("one", ctx), ("two", ctx.repeat(1, 2, 1))):
        st.zero_grad(set_to_none=True)
        out = st(x, context)
        out.square().sum().backward()
        grads[name] = (out.detach(), {n: p.grad for n, p in st.named_parameters()})
    assert torch.allclose(grads["one"][0], grads["two"][0], atol=1e-6)
    skipped = {n for n, g in grads["one"][1].items() if g is None}
    assert skipped == {"attn2.to_q.weight", "attn2.to_k.weight", "norm2.weight", "norm2.bias"}
    for n, g in grads["two"][1].items():
        want = torch.zeros_like(g) if n in skipped else grads["one"][1][n]
        assert torch.allclose(g, want, atol=1e-6), n


def test_spatial_transformer_is_identity_at_init_and_gets_gradients():
    st = SpatialTransformer(8, 2, 6)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 1, 6)
    out = st(x, ctx)
    assert torch.equal(out, x)  # proj_out is zero-initialised
    before_proj_out = {n: "before the zero-initialised proj_out, whose zero weight passes back no gradient"
                       for n, _ in st.named_parameters() if not n.startswith("proj_out.")}
    grads_flow(st, out, before_proj_out)
    torch.nn.init.normal_(st.proj_out.weight, std=0.05)  # as after a training step
    grads_flow(st, st(x, ctx), single_token_query_key(st))


def test_autoencoder_shapes_kl_and_gradients():
    ae = Autoencoder(1, 8, (1, 2, 2), 1, 3)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    post = ae.encode(x)
    assert post.mean.shape == (2, 3, 8, 8) and ae.factor == 4
    assert ae.decode(post.sample()).shape == x.shape
    assert torch.all(post.kl() >= 0)
    loss, rec, kl = ae.loss(x, "l1", 1e-6, torch.randn(2, 3, 8, 8))
    assert loss.shape == rec.shape == kl.shape == (2,)
    grads_flow(ae, loss, before_zero_conv(ae))
    for m in ae.modules():
        if isinstance(m, ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.05)  # as after a training step
    grads_flow(ae, ae.loss(x, "l1", 1e-6, torch.randn(2, 3, 8, 8))[0])


def test_autoencoder_has_no_batchnorm():
    ae = Autoencoder(3, 8, (1, 2), 1, 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ae.modules())


@pytest.mark.parametrize("mult,levels", [((1, 2), (1, 2)), ((1, 2, 2), (2,))])
def test_unet_shapes_names_zero_output(mult, levels):
    unet = UNet(3, 16, mult, 1, levels, 2, 12, 10)
    x = torch.randn(2, 3, 8, 8)
    out = unet(x, torch.tensor([3, 900]), torch.tensor([1, 7]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # conv_out is zero-initialised
    assert "mid" in unet.attn
    for name in unet.attn:
        assert name == "mid" or unet.block_level(name) in levels
    assert all(n.startswith("attn.") for n, _ in unet.named_parameters() if ".attn1." in n)


def test_unet_gradients_reach_every_parameter_after_one_step():
    torch.manual_seed(0)
    unet = UNet(3, 16, (1, 2), 1, (1, 2), 2, 12, 10)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    target = torch.randn(4, 3, 8, 8)
    for _ in range(3):  # zero-initialised layers pass gradients on after they have moved once
        opt.zero_grad()
        (unet(x, t, y) - target).square().mean().backward()
        opt.step()
    # nothing but the cross-attention query/key path is silent (as in latent diffusion's class-conditional models)
    grads_flow(unet, unet(x, t, y) - target, single_token_query_key(unet))


def test_unet_class_conditioning_changes_output():
    torch.manual_seed(0)
    unet = UNet(3, 16, (1, 2), 1, (1,), 2, 12, 10)
    for p in unet.parameters():  # undo zero-initialisation so the label can show through
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    assert not torch.allclose(unet(x, t, torch.tensor([0])), unet(x, t, torch.tensor([5])))
