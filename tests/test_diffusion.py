"""The diffusion process: schedule, closed-form noising, DDIM, EMA."""

import pytest
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


def ddim_timesteps(T, steps):
    """The documented spacing (Diffusion.ddim_sample): Song et al. 2021's uniform subsequence tau_i = c i with
    c = floor(T / steps), i = 0 .. steps - 1, shifted by + 1 as latent diffusion does."""
    return [(T // steps) * i + 1 for i in range(steps)]


def ddim_reference(eps_model, x, taus, abar):
    """Deterministic DDIM (Song et al. 2021, Eq. 12, sigma = 0) over the timesteps `taus`, from the largest down,
    in float64; abar before the first timestep is 1 (the last update returns the predicted x_0)."""
    x = x.double()
    for i in range(len(taus) - 1, -1, -1):
        a_t = abar[taus[i]]
        a_prev = abar[taus[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = eps_model(x, taus[i])
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


class Recorder:
    """Wraps eps(x, t) as a model(x, t, y) that records the timestep of each call (one per batch: all equal)."""

    def __init__(self, eps):
        self.eps, self.timesteps = eps, []

    def __call__(self, x, t, y):
        assert t.dtype == torch.long and torch.all(t == t[0])
        self.timesteps.append(t[0].item())
        return self.eps(x.double(), t[0].item())


def test_ddim_timestep_sequence_is_pinned():
    """The timesteps DDIM visits are exactly tau_{steps-1} > ... > tau_0 of the documented spacing."""
    cases = {(1000, 50): list(range(1, 1000, 20)), (1000, 20): list(range(1, 1000, 50)),
             (1000, 30): [33 * i + 1 for i in range(30)],  # range(0, 1000, 33) has 31 items: only 30 are used
             (10, 3): [1, 4, 7]}
    for (T, steps), expected in cases.items():
        assert ddim_timesteps(T, steps) == expected
        d = Diffusion(T)
        model = Recorder(lambda x, t: torch.zeros_like(x))
        y, g = torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0)
        d.ddim_sample(model, (2, 1, 1, 1), y, steps, 0.0, g)
        assert model.timesteps == expected[::-1], (T, steps)


def test_ddim_with_oracle_recovers_data_point():
    """With the exact noise predictor for a single data point, DDIM returns that point (at any timesteps:
    the timesteps themselves are pinned by the tests above and below)."""
    d = Diffusion()
    target = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1).double()

    def oracle(x, t):
        return (x - d.abar[t].sqrt() * target) / (1 - d.abar[t]).sqrt()
    for steps, eta in ((50, 0.0), (20, 1.0)):
        model = Recorder(oracle)
        g = torch.Generator().manual_seed(0)
        x = d.ddim_sample(model, (4, 3, 1, 1), torch.zeros(4, dtype=torch.long), steps=steps, eta=eta, generator=g)
        assert torch.allclose(x, target.float().expand(4, 3, 1, 1), atol=1e-3)
        assert model.timesteps == ddim_timesteps(1000, steps)[::-1]


def test_ddim_matches_the_reference_update_on_the_pinned_timesteps():
    """Gaussian data x_0 ~ N(mu, s^2) has the exact noise predictor
    E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t); with it DDIM's output
    depends on the timesteps, so it must equal Eq. 12 run on the pinned sequence, and not on a shifted one."""
    d = Diffusion()
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    s2 = torch.tensor([0.01, 0.25, 4.0], dtype=torch.float64).view(1, 3, 1, 1)

    def oracle(x, t):
        a = d.abar[t]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)
    shape, y = (8, 3, 2, 2), torch.zeros(8, dtype=torch.long)
    for steps in (10, 30):
        model = Recorder(oracle)
        x = d.ddim_sample(model, shape, y, steps, 0.0, torch.Generator().manual_seed(1))
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # the sampler's first draw
        pinned = ddim_timesteps(1000, steps)
        assert model.timesteps == pinned[::-1]
        want = ddim_reference(oracle, x_T, pinned, d.abar)
        assert torch.allclose(x.double(), want, rtol=1e-5, atol=1e-5)
        shifted = ddim_reference(oracle, x_T, [t - 1 for t in pinned], d.abar)  # the same spacing without the + 1
        assert (shifted - want).abs().max() > 100 * 1e-5, "the reference cannot tell the sequences apart"


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def gaussian_oracle(d, mu, s2):
    """The exact noise predictor of Gaussian data x_0 ~ N(mu, s2) (see the DDIM test above)."""
    def eps(x, t):
        a = d.abar[t]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)
    return eps


def exact_x0_prediction(d, x_start, t_start, t_end, mu, s2):
    """Along the exact probability-flow ODE of Gaussian data, x_t = sqrt(abar_t) mu + sqrt(abar_t s2 + 1 - abar_t) z
    with z fixed: start at x_start at t_start, go to t_end, return E[x_0 | x_{t_end}] (what both samplers output)."""
    a0, a1 = d.abar[t_start], d.abar[t_end]
    z = (x_start.double() - a0.sqrt() * mu) / (a0 * s2 + 1 - a0).sqrt()
    x1 = a1.sqrt() * mu + (a1 * s2 + 1 - a1).sqrt() * z
    return mu + a1.sqrt() * s2 * (x1 - a1.sqrt() * mu) / (a1 * s2 + 1 - a1)


def test_dpm_solver_converges_to_the_exact_ode_solution_faster_than_ddim():
    d = Diffusion()
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    s2 = torch.tensor([0.01, 0.25, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    shape, y = (16, 3, 2, 2), torch.zeros(16, dtype=torch.long)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))  # each sampler's first draw
    errors = {}
    for steps in (5, 10, 20, 40):
        model = Recorder(gaussian_oracle(d, mu, s2))
        x = d.sample(model, shape, y, steps, torch.Generator().manual_seed(1), sampler="dpm++2m")
        lam = 0.5 * torch.log(d.abar / (1 - d.abar))
        nearest = [int((lam - v).abs().argmin()) for v in torch.linspace(float(lam[999]), float(lam[0]), steps,
                                                                           dtype=torch.float64)]
        assert model.timesteps == list(dict.fromkeys(nearest)) and model.timesteps[0] == 999
        assert model.timesteps[-1] == 0 and len(model.timesteps) <= steps
        errors[steps] = (x.double() - exact_x0_prediction(d, x_T, 999, 0, mu, s2)).abs().max().item()
    assert errors[5] > errors[10] > errors[20] > errors[40] and errors[40] < 1e-2
    assert errors[20] / errors[40] > 3  # second order: about 4x per halving of the step (first order: 2x)
    ddim = d.sample(Recorder(gaussian_oracle(d, mu, s2)), shape, y, 10, torch.Generator().manual_seed(1),
                    sampler="ddim", eta=0.0)
    ddim_error = (ddim.double() - exact_x0_prediction(d, x_T, ddim_timesteps(1000, 10)[-1], 1, mu, s2)).abs().max()
    assert errors[10] < ddim_error.item()


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="ddim, dpm\\+\\+2m"):
        Diffusion().sample(None, (1, 1, 1, 1), torch.zeros(1, dtype=torch.long), 2, torch.Generator(), sampler="euler")
