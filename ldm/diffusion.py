"""Gaussian diffusion in latent space: schedule, forward noising, the training loss, DDIM sampling, EMA.

Notation of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. Timesteps are 0-indexed: t in {0, ..., T-1}.
"""

import torch
from tqdm import tqdm


class Diffusion:
    def __init__(self, timesteps=1000, beta_start=0.0015, beta_end=0.0155):
        self.T = timesteps
        self.betas = linear_betas(timesteps, beta_start, beta_end)  # (T,) float64
        self.abar = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) float64

    @classmethod
    def from_config(cls, diffusion_cfg):
        return cls(diffusion_cfg.timesteps, diffusion_cfg.beta_start, diffusion_cfg.beta_end)

    def q_sample(self, x0, t, noise):
        """Closed-form forward process (Ho et al. 2020, Eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0, noise: (B, ...), t: (B,) long.
        """
        abar = self.abar.to(x0.device)[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_step(self, x_prev, t, noise):
        """One step of the forward chain (Ho et al. 2020, Eq. 2): sqrt(alpha_t) x_{t-1} + sqrt(beta_t) noise."""
        beta = self.betas.to(x_prev.device)[t].float().view(-1, *([1] * (x_prev.dim() - 1)))
        return (1.0 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def draw(self, x0, generator):
        """One timestep and one noise draw per example: t: (B,) long, noise like x0."""
        t = torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=generator.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device)
        return t.to(x0.device), noise.to(x0.device)

    def loss_per_example(self, model, x0, y, t, noise):
        """Epsilon-prediction L2 loss (Ho et al. 2020, Eq. 14), mean over coordinates: (B,)."""
        pred = model(self.q_sample(x0, t, noise), t, y)
        return (pred - noise).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def ddim_sample(self, model, shape, y, steps, eta, generator, progress=False):
        """DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 with sigma from Eq. 16).

        shape: (B, z, h, w), y: (B,) labels. eta = 0 is deterministic, eta = 1 matches DDPM's variance.
        Uses the uniform timestep subsequence of latent diffusion: 0, c, 2c, ... with c = T // steps, + 1.
        """
        device = y.device
        c = self.T // steps
        ts = list(range(0, self.T, c))[:steps]
        ts = [min(t + 1, self.T - 1) for t in ts]
        abar = self.abar.to(device)
        x = torch.randn(shape, generator=generator, device=generator.device).to(device)
        for i in tqdm(range(len(ts) - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
            t = ts[i]
            a_t = abar[t]
            a_prev = abar[ts[i - 1]] if i > 0 else torch.tensor(1.0, dtype=abar.dtype, device=device)
            eps = model(x, torch.full((shape[0],), t, device=device, dtype=torch.long), y).double()
            x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            direction = (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
            noise = torch.randn(shape, generator=generator, device=generator.device).to(device).double()
            x = (a_prev.sqrt() * x0 + direction + sigma * noise).float()
        return x


def linear_betas(timesteps, start, end):
    """The 'linear' schedule of latent diffusion (and DP-LDM): linear in sqrt(beta), from start to end."""
    return torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * params, for every parameter; buffers are copied."""
    for pe, p in zip(ema_model.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema_model.buffers(), model.buffers()):
        be.copy_(b)
