"""Shapes, gradients and zero-initialisation of every module."""

import pytest
import torch

from ldm.attention import Attention, FeedForward, SpatialTransformer
from ldm.autoencoder import Autoencoder
from ldm.nn import ResBlock, timestep_embedding
from ldm.unet import UNet


def grads_flow(module, out):
    out.square().mean().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


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
    grads_flow(block, out + block.conv2.weight.sum())


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


def test_spatial_transformer_is_identity_at_init_and_gets_gradients():
    st = SpatialTransformer(8, 2, 6)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 1, 6)
    out = st(x, ctx)
    assert torch.equal(out, x)  # proj_out is zero-initialised
    out.square().mean().backward()
    assert st.proj_out.weight.grad.abs().sum() > 0


def test_autoencoder_shapes_kl_and_gradients():
    ae = Autoencoder(1, 8, (1, 2, 2), 1, 3)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    post = ae.encode(x)
    assert post.mean.shape == (2, 3, 8, 8) and ae.factor == 4
    assert ae.decode(post.sample()).shape == x.shape
    assert torch.all(post.kl() >= 0)
    loss, rec, kl = ae.loss(x, "l1", 1e-6, torch.randn(2, 3, 8, 8))
    assert loss.shape == rec.shape == kl.shape == (2,)
    loss.sum().backward()
    assert all(p.grad is not None for p in ae.parameters())


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
    for _ in range(4):  # zero-initialised layers pass gradients on after they have moved once
        opt.zero_grad()
        (unet(x, t, y) - target).square().mean().backward()
        opt.step()
    silent = {n for n, p in unet.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    # with a single context token the cross-attention softmax is identically 1: its queries, keys and the
    # norm before them get no gradient (as in latent diffusion's class-conditional models); nothing else is silent
    expected = {n for n, _ in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n or (n.startswith("attn.") and ".norm2." in n)}
    assert silent == expected


def test_unet_class_conditioning_changes_output():
    torch.manual_seed(0)
    unet = UNet(3, 16, (1, 2), 1, (1,), 2, 12, 10)
    for p in unet.parameters():  # undo zero-initialisation so the label can show through
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    assert not torch.allclose(unet(x, t, torch.tensor([0])), unet(x, t, torch.tensor([5])))
