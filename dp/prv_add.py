"""The "add" direction of add/remove-one for the Poisson-subsampled Gaussian, as a prv-accountant 0.2.0 PRV.

prv-accountant's `PoissonSubsampledGaussianMechanism` is the "remove" pair (P = (1-q) N(0, s^2) + q N(1, s^2)
vs Q = N(0, s^2)). This module gives the swapped pair and its composition on the remove direction's grid;
dp/accountant.py reports the larger epsilon of the two. It rebuilds what PRVAccountant builds, so it relies on
the package's internals: prv-accountant is pinned to 0.2.0 in requirements.txt.
"""

import math

import numpy as np
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.composers import Fourier
from prv_accountant.discretisers import CellCentred
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import (PoissonSubsampledGaussianMechanism, PrivacyRandomVariable,
                                                     PrivacyRandomVariableTruncated)
from scipy import integrate, special

from ldm.errors import UserError


class SubsampledGaussianAddPRV(PrivacyRandomVariable):
    """Privacy loss random variable of one SGM step in the "add" direction, for prv-accountant 0.2.0.

    The pair is P = N(0, s^2) (data set without the example) against Q = (1 - q) N(0, s^2)
    + q N(1, s^2) (with it): `PoissonSubsampledGaussianMechanism`'s "remove" pair swapped. The
    add/remove relation needs both (Zhu, Dong, Wang 2022, "Optimal Accounting of Differential
    Privacy via Characteristic Function": under Poisson subsampling each direction has its own
    dominating pair). The PRV (Gopi et al. 2021, Section 3) is Y = log(P(x) / Q(x)), x ~ P:
        Y(x) = -log(1 - q + q exp((2x - 1) / (2 s^2))),  decreasing in x, Y < c = -log(1 - q).
    For t < c, Y <= t iff x >= x(t) = s^2 z(t) + 1/2, with
        z(t) = log((e^-t - (1 - q)) / q) = log(-expm1(t - c)) - t - log q,
    so, with Phi the standard normal CDF and w(t) = x(t) / s = s z(t) + 1 / (2 s),
        F(t) = P[Y <= t] = Phi(-w(t)),   1 - F(t) = Phi(w(t)),   and F(t) = 1 for t >= c.
    The expm1 form of z has no cancellation as t -> c and no overflow as t -> -inf; masses are
    differences of lower tails below the median and of upper tails above it (`probability`).
    q = 1 gives c = inf and Y ~ N(1/(2 s^2), 1/s^2), the Gaussian mechanism, as it should.
    """

    def __init__(self, sampling_probability: float, noise_multiplier: float) -> None:
        if not (0 < sampling_probability <= 1 and noise_multiplier > 0):
            raise UserError(f"q = {sampling_probability!r}, sigma = {noise_multiplier!r}: the add-direction PRV "
                            "needs 0 < q <= 1 and sigma > 0.")
        self.q, self.sigma = float(sampling_probability), float(noise_multiplier)
        self.log_q = math.log(self.q)
        self.loss_max = -math.log1p(-self.q) if self.q < 1 else math.inf  # c

    def _w(self, t) -> np.ndarray:
        """w(t) = x(t) / s, so that F(t) = Phi(-w(t)); -inf where t >= c.  t: any shape."""
        t = np.asarray(t, dtype=np.float64)
        below = t < self.loss_max
        gap = np.where(below, t - self.loss_max, -1.0)  # t - c < 0: -expm1 keeps its relative precision
        z = np.log(-np.expm1(gap)) - t - self.log_q
        return np.where(below, self.sigma * z + 0.5 / self.sigma, -np.inf)

    def cdf(self, t) -> np.ndarray:
        """F(t) = P[Y <= t] = Phi(-w(t)), 1 for t >= c.  t: any shape."""
        return special.ndtr(-self._w(t))

    def probability(self, a, b) -> np.ndarray:
        """P[a < Y <= b] elementwise, in long double like prv-accountant's own PRV (same FFT precision).

        Where a is above the median (w(a) < 0) it is Phi(w(a)) - Phi(w(b)), upper tails, so the
        masses near c keep their relative precision instead of cancelling in F(b) - F(a).
        """
        w_a, w_b = self._w(a), self._w(b)
        upper = special.ndtr(w_a) - special.ndtr(w_b)
        lower = special.ndtr(-w_b) - special.ndtr(-w_a)
        return np.where(w_a < 0, upper, lower).astype(np.longdouble)

    def loss(self, x) -> np.ndarray:
        """Y(x) = -log(1 - q + q exp((2x - 1) / (2 s^2))), in log space.  x: any shape."""
        return -np.logaddexp(-self.loss_max, self.log_q + (2 * np.asarray(x) - 1) / (2 * self.sigma**2))

    def truncated_mean(self, t_min: float, t_max: float) -> float:
        """E[Y | t_min <= Y <= t_max], integrated over x ~ N(0, s^2), where Y(x) is smooth.

        prv-accountant 0.2.0 integrates F over t between fixed break points instead; F has a
        kink at c, and that quadrature can step over [break point, c] (at sigma 0.6, q 0.01 it
        missed 1.7e-7). Here that lowers the mean, which shifts the composed loss down by `steps`
        times the error: an under-estimate of epsilon. (In the remove direction the kink at
        log(1 - q) errs the safe way.) N(0, s^2) has mass e^-800 beyond 40 s, dropped here.
        """
        s = self.sigma
        x_lo = max(s * float(self._w(t_max)), -40 * s)  # Y <= t_max iff x >= x(t_max)
        x_hi = min(s * float(self._w(t_min)), 40 * s + 1)
        crossover = s**2 * (math.log1p(-self.q) - self.log_q) + 0.5 if self.q < 1 else 0.0

        def integrand(x: float) -> float:
            return float(self.loss(x)) * math.exp(-x * x / (2 * s * s)) / (s * math.sqrt(2 * math.pi))

        points = [p for p in (-s, 0.0, s, crossover) if x_lo < p < x_hi]
        integral, _abs_error = integrate.quad(integrand, x_lo, x_hi, points=points or None, limit=500,
                                              epsabs=1e-15, epsrel=1e-12)
        return integral / float(self.probability(t_min, t_max))


class _TruncatedAddPRV(PrivacyRandomVariableTruncated):
    """prv-accountant's truncation of a PRV to the grid, with the mean from `truncated_mean`."""

    def mean(self) -> float:
        return self.prv.truncated_mean(self.t_min, self.t_max)


def add_direction_composition(sigma: float, q: float, steps: int, delta: float, eps_error: float,
                              delta_fraction: float):
    """The add-direction PRV composed `steps` times: a prv-accountant DiscretePrivacyRandomVariable.

    Builds what PRVAccountant 0.2.0 builds (aligned domain, cell-centred discretisation with the
    mean correction, Fourier self-composition), on the remove direction's grid: the same
    half-width L (from the remove pair's RDP) and mesh. That grid is safe here too: the add RDP
    is at most the remove RDP (Mironov, Talwar, Zhang 2019, Section 3: B_alpha <= A_alpha), which
    bounds the upper tail, and the lower tail is P_P[sum Y <= -L] = E_Q[e^(sum Y); sum Y <= -L]
    <= e^-L P[remove loss >= L], e^-L times the remove direction's upper tail.
    """
    delta_error = delta * delta_fraction
    remove = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    half_width = compute_safe_domain_size([remove], [steps], eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(steps / 2 * math.log(12 / delta_error))  # Gopi et al. Theorem 5.5
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    truncated = _TruncatedAddPRV(SubsampledGaussianAddPRV(q, sigma), domain.t_min(), domain.t_max())
    discrete = CellCentred().discretise(truncated, domain)
    return Fourier([discrete]).compute_composition([steps])
