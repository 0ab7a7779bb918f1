"""Gaussian diffusion in latent space: schedule, forward noising, the training loss, two samplers, EMA.

Samplers (`sample`, `--sampler`): DDIM (Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022), both on the
trained epsilon-prediction model; neither changes training.

Notation of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"): beta_t, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s. Timesteps are 0-indexed: t in {0, ..., T-1}.
"""

import math

import torch
from tqdm import tqdm

from ldm.config import SAMPLERS


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

    def sample(self, model, shape, y, steps, generator, sampler="ddim", eta=1.0, progress=False):
        """Latents (B, z, h, w) from `steps` model evaluations of `sampler` (one of SAMPLERS)."""
        if sampler == "dpm++2m":
            return self.dpm_solver_sample(model, shape, y, steps, generator, progress)
        if sampler != "ddim":
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        return self.ddim_sample(model, shape, y, steps, eta, generator, progress)

    def log_snr_timesteps(self, steps):
        """Up to `steps` timesteps, largest first, whose lambda_t = log(sqrt(abar_t / (1 - abar_t))) lies nearest
        to `steps` points uniform in lambda from lambda_{T-1} to lambda_0 (duplicates dropped): the spacing
        DPM-Solver recommends (Lu et al. 2022, Sec. 3.3)."""
        lam = 0.5 * torch.log(self.abar / (1.0 - self.abar))  # (T,) increasing as t decreases
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
        return list(dict.fromkeys(nearest))

    @torch.no_grad()
    def dpm_solver_sample(self, model, shape, y, steps, generator, progress=False):
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
        Probabilistic Models", Algorithm 2): the data prediction x0 = (x - sigma_t eps) / alpha_t, a multistep
        second-order update in lambda = log(alpha_t / sigma_t), first order on the first step.

        alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). At most `steps` evaluations, at `log_snr_timesteps`;
        the result is the last x0 prediction, at t = 0. Deterministic: the generator draws only the starting
        noise. The update is in float32 (its coefficients in float64).
        """
        device = y.device
        ts = self.log_snr_timesteps(steps)
        alpha, sigma = self.abar.sqrt(), (1.0 - self.abar).sqrt()
        lam = torch.log(alpha / sigma)
        x = torch.randn(shape, generator=generator, device=generator.device).to(device)
        x0_prev, h_prev = None, None
        for i in tqdm(range(len(ts)), desc="dpm-solver++", disable=not progress, leave=False):
            t = ts[i]
            eps = model(x, torch.full((shape[0],), t, device=device, dtype=torch.long), y)
            x0 = (x - float(sigma[t]) * eps) / float(alpha[t])
            if i == len(ts) - 1:
                return x0
            s = ts[i + 1]
            h = float(lam[s] - lam[t])
            blend = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - (h / (2 * h_prev)) * x0_prev
            x = float(sigma[s] / sigma[t]) * x - float(alpha[s]) * math.expm1(-h) * blend
            x0_prev, h_prev = x0, h
        return x

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
    """ema <- decay * ema + (1 - decay) * params, for every parameter; buffers are copied.

    model: a module of ema_model's architecture, or its {name: tensor} state dict (the private stage passes a
    LoRA model's weights merged into the plain architecture, dp/lora.py `merged_state`)."""
    state = model if isinstance(model, dict) else model.state_dict()
    for name, pe in ema_model.named_parameters():
        pe.lerp_(state[name].detach(), 1.0 - decay)
    for name, be in ema_model.named_buffers():
        be.copy_(state[name])
