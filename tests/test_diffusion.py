"""The diffusion process: schedule, closed-form noising, DDIM, EMA."""

import torch

from ldm.diffusion import Diffusion, ema_update, linear_betas


def test_schedule_endpoints():
    b = linear_betas(1000, 0.0015, 0.0155)
    assert b.shape == (1000,)
    assert abs(b[0].item() - 0.0015) < 1e-12 and abs(b[-1].item() - 0.0155) < 1e-12
    assert torch.all(b[1:] > b[:-1])


def test_closed_form_matches_chain_in_distribution():
    """x_t from q(x_t | x_0) in one shot and from t steps of q(x_s | x_{s-1}) have the same mean and std."""
    d = Diffusion(1000, 0.0015, 0.0155)
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 300
    x0 = torch.full((n,), 0.7)
    chain = x0.clone()
    for s in range(t + 1):
        chain = d.q_step(chain, torch.full((n,), s), torch.randn(n, generator=g))
    direct = d.q_sample(x0, torch.full((n,), t), torch.randn(n, generator=g))
    abar = d.abar[t].item()
    for x in (chain, direct):
        assert abs(x.mean().item() - 0.7 * abar ** 0.5) < 5 * (1 / n) ** 0.5
        assert abs(x.std().item() - (1 - abar) ** 0.5) < 0.01
    assert abs(chain.mean().item() - direct.mean().item()) < 0.01


def test_loss_per_example_is_per_example():
    d = Diffusion()
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    loss = d.loss_per_example(model, x0, torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3]), noise)
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1))


def test_ddim_with_oracle_recovers_data_point():
    """With the exact noise predictor for a single data point, deterministic DDIM returns that point."""
    d = Diffusion()
    target = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    abar = d.abar.float()

    def oracle(x, t, y):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()
    g = torch.Generator().manual_seed(0)
    x = d.ddim_sample(oracle, (4, 3, 1, 1), torch.zeros(4, dtype=torch.long), steps=50, eta=0.0, generator=g)
    assert torch.allclose(x, target.expand(4, 3, 1, 1), atol=1e-3)
    x = d.ddim_sample(oracle, (4, 3, 1, 1), torch.zeros(4, dtype=torch.long), steps=20, eta=1.0, generator=g)
    assert torch.allclose(x, target.expand(4, 3, 1, 1), atol=1e-3)


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
