"""The secret randomness of the private stage: one 256-bit key from the OS, Philox streams derived from it.

Every random draw that touches private data comes from here: the Poisson sample of each step, each sampled
example's posterior sample, timestep and diffusion noise, and the Gaussian noise of the mechanism.

    secret (32 bytes, `secrets.token_bytes`)      -- never written anywhere in a release run
      -> stream key = HMAC-SHA256(secret, purpose | step)[:8], a 64-bit Philox key per (purpose, step)
      -> Philox4x32-10 (Salmon et al. 2011) with counter (offset, example index): kernels/philox.py,
         the same generator and counter layout as Triton's `tl.randn` (the DP noise of kernels/clip_noise.py
         draws four coordinates per counter: `tl.randn4x`)

Guarantees
- Unpredictability: the secret has 256 bits from the operating system. Each stream's key is a PRF of the
  secret, so no stream can be searched (unlike a torch CPU generator, whose Mersenne Twister is seeded with
  32 bits), and one key that leaks reveals neither the secret nor any other stream.
- Per-example independence: example i's draws at step s are Philox outputs at counters that contain i,
  under keys that depend only on (secret, purpose, s). They do not depend on which other examples are in
  the batch, on i's position in the batch, on the micro-batch size or on the number of processes: adding
  or removing one example changes no other example's draws (tests/test_sensitivity.py).
- Dataset-level add/remove of an example shifts the indices of the examples after it. Their draws then
  change, but to fresh values of a generator keyed by a secret the adversary does not know: the draws of
  the other examples are independent of x either way, which is what the sensitivity-C argument needs.
- Poisson sampling: example i is included at step s iff its 64-bit Philox word is below floor(q 2^64),
  independently of every other example; the inclusion probability is within 2^-64 below q (a smaller rate
  never costs privacy).
Not covered: Philox is a counter-based generator, not a cryptographic one; its security here rests on the
key being a secret PRF output. With --noise-seed the secret is derived from the seed: such a run is
reproducible by anyone and is for experiments only.
"""

import dataclasses
import hashlib
import hmac
import math
import secrets as os_random
import warnings
from fractions import Fraction

import torch

from kernels.philox import randint4x, randn

SECRET_BYTES = 32  # 256 bits from the operating system
PURPOSES = ("poisson", "noise", "posterior", "timestep", "diffusion-noise")


@dataclasses.dataclass(frozen=True)
class RunSecret:
    """The run's secret key. `repr` never shows it; it is written nowhere (with --noise-seed it is derivable)."""

    key: bytes = dataclasses.field(repr=False)
    source: str

    def stream_key(self, purpose, step):
        """The 64-bit Philox key of one stream: HMAC-SHA256(secret, purpose | step), first 8 bytes."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown randomness purpose {purpose!r}; one of {PURPOSES}")
        message = f"dp-ldm/v1/{purpose}/{int(step)}".encode()
        return int.from_bytes(hmac.new(self.key, message, hashlib.sha256).digest()[:8], "little")


def run_secret(noise_seed=None):
    """The secret of a run: 256 bits from the OS, or (experiments only, with a warning) a hash of --noise-seed."""
    if noise_seed is None:
        return RunSecret(os_random.token_bytes(SECRET_BYTES), "operating system (256-bit secret, never stored)")
    warnings.warn(f"--noise-seed {noise_seed}: Poisson sampling, per-example draws and noise are reproducible "
                  f"from this seed; the run is for experiments, not for release", stacklevel=2)
    return seeded_secret(noise_seed, f"fixed seed {noise_seed} (experiments only)")


def seeded_secret(seed, source):
    """A secret derived from a public seed: for experiments, the non-private baseline and benchmarks."""
    return RunSecret(hashlib.sha256(f"dp-ldm/seed/{int(seed)}".encode()).digest(), source)


def _counters(idx, k, device):
    """(b, k) int64 Philox offsets: example index in the high 32 bits (counter word c1), offset 0..k-1 in c0."""
    return idx.to(device=device, dtype=torch.int64)[:, None] * 2 ** 32 + torch.arange(k, device=device)[None]


def poisson_sample(secret, step, n, q, device="cpu"):
    """Indices (b,) of the examples included at `step`: each of range(n) independently with probability q.

    Example i's 64-bit word (w0 << 32 | w1 of Philox at counter (i, 0)) is compared with floor(q 2^64).
    """
    if not 0 < q <= 1:
        raise ValueError(f"the sampling rate q must lie in (0, 1], got {q}")
    threshold = math.floor(Fraction(q) * 2 ** 64)
    hi, lo = divmod(threshold, 2 ** 32)
    w0, w1, _, _ = randint4x(secret.stream_key("poisson", step), torch.arange(n, device=device))
    included = (w0 < hi) | ((w0 == hi) & (w1 < lo))  # hi may be 2^32 (q = 1): then every example is in
    return torch.nonzero(included).flatten()


def example_draws(secret, step, idx, shape, timesteps):
    """Each example's own draws at `step`: (posterior noise (b, *shape), timestep (b,), diffusion noise (b, *shape)).

    idx: (b,) example indices. Row j depends only on (secret, step, idx[j]).
    """
    device, k = idx.device, math.prod(shape)
    offsets = _counters(idx, k, device)
    posterior = randn(secret.stream_key("posterior", step), offsets).view(len(idx), *shape)
    noise = randn(secret.stream_key("diffusion-noise", step), offsets).view(len(idx), *shape)
    word = randint4x(secret.stream_key("timestep", step), _counters(idx, 1, device))[0].flatten()
    t = (word * timesteps) >> 32  # uniform on {0, ..., T-1} up to T / 2^32
    return posterior, t, noise


def noise_key(secret, step):
    """The 64-bit Philox key of the mechanism's noise at `step` (passed to kernels/clip_noise.py)."""
    return secret.stream_key("noise", step)
