"""The secret randomness (dp/randomness.py): 256 bits from the OS, searchable by no one, per example."""

import pytest
import torch

import dp.step
from dp.randomness import RunSecret, example_draws, noise_key, poisson_sample, run_secret, seeded_secret
from dp.select import select_parameters
from dp.step import Mechanism, Task, dp_step, make_optimizer
from kernels.clip_noise import gaussian_noise
from ldm.build import build_unet
from ldm.config import make_config
from ldm.diffusion import Diffusion


def secret_from_int(value):
    return RunSecret(value.to_bytes(32, "little"), "test")


def test_a_release_secret_is_256_bits_from_the_os_and_never_shown():
    a, b = run_secret(None), run_secret(None)
    assert len(a.key) == 32 and a.key != b.key and "operating system" in a.source
    assert a.key.hex() not in repr(a) and "key" not in repr(a)
    keys = {a.stream_key(p, s) for p in ("poisson", "noise", "posterior") for s in range(50)}
    assert len(keys) == 150 and max(keys) >= 2**63  # distinct 64-bit keys per purpose and step


@pytest.mark.parametrize("bit", [32, 64, 128])
def test_secrets_that_differ_only_above_a_bit_give_other_noise_and_other_samples(bit):
    low, high = secret_from_int(12345), secret_from_int(12345 + 2**bit)
    noise = [gaussian_noise([(10_000,)], 1.0, noise_key(s, 0))[0] for s in (low, high)]
    assert not torch.equal(*noise) and abs(torch.corrcoef(torch.stack(noise))[0, 1]) < 0.05
    samples = [poisson_sample(s, 0, 10_000, 0.5) for s in (low, high)]
    assert not torch.equal(*samples)
    draws = [example_draws(s, 0, torch.arange(4), (3, 8, 8), 1000)[0] for s in (low, high)]
    assert not torch.equal(*draws)


def test_stream_keys_that_differ_only_above_bit_32_give_other_noise():
    a, b = (gaussian_noise([(5000,)], 1.0, key)[0] for key in (77, 77 + 2**32))
    c = gaussian_noise([(5000,)], 1.0, 77 + 2**63)[0]
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_each_examples_draws_depend_only_on_the_secret_the_step_and_its_index():
    secret = seeded_secret(0, "test")
    idx = torch.tensor([5, 17, 2, 40, 3])
    posterior, t, noise = example_draws(secret, 7, idx, (3, 8, 8), 1000)
    again = example_draws(secret, 7, torch.tensor([40, 999, 17]), (3, 8, 8), 1000)  # others, other order
    for full, part in zip((posterior, t, noise), again):
        assert torch.equal(part[0], full[3]) and torch.equal(part[2], full[1])
    later = example_draws(secret, 8, idx, (3, 8, 8), 1000)[0]
    assert not torch.equal(later, posterior)  # a fresh draw every step
    assert not torch.equal(posterior, noise)  # posterior sample and diffusion noise are separate streams
    ts = example_draws(secret, 0, torch.arange(20_000), (1,), 1000)[1]
    assert ts.min() == 0 and ts.max() == 999 and abs(ts.float().mean().item() - 499.5) < 6


FORBIDDEN = ("Generator", "manual_seed", "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial")


def test_no_secret_stream_is_a_torch_generator(monkeypatch):
    """A whole DP step (sampling, per-example draws, clipping, noise, update) draws nothing from torch's generators."""
    torch.manual_seed(0)
    unet = build_unet(make_config("smoke"))
    params = select_parameters(unet, "all")
    task = Task(unet, Diffusion(), params, (torch.randn(50, 3, 8, 8), torch.rand(50, 3, 8, 8)), torch.arange(50) % 10)
    opt, secret = make_optimizer(make_config("smoke").dp, params), run_secret(None)

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch generator was used in the DP step")
    for name in FORBIDDEN:
        monkeypatch.setattr(torch, name, forbidden)
    for method in ("bookkeeping", "vmap"):
        task.method = method
        released = dp_step(task, Mechanism(q=0.2, clip=1.0, sigma=1.0, divisor=10.0), secret, 0, opt, 1e-3)
        assert torch.cat([g.flatten() for g in released]).std() > 0
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="torch generator"):  # the spy does catch a draw
        monkeypatch.setattr(dp.step, "example_draws", lambda *a: forbidden())
        dp_step(task, Mechanism(q=1.0, clip=1.0, sigma=1.0, divisor=10.0), secret, 0, opt, 1e-3)
