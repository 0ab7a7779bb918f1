"""Privacy accounting for DP-SGD: Poisson subsampling + the Gaussian mechanism.

One DP-SGD step samples each private example independently with probability q (Poisson
sampling), sums the per-example gradients clipped to L2 norm C, and adds N(0, (sigma C)^2 I)
noise. Scaling by C, one step is the Sampled Gaussian Mechanism (SGM) with sensitivity 1 and
noise multiplier sigma; `steps` steps are its adaptive composition.

Two accountants are implemented:

- `epsilon_prv`: the numerical PRV accountant of Gopi, Lee, Wutschitz 2021 ("Numerical
  Composition of Differential Privacy"), on prv-accountant 0.2.0, for BOTH directions of the
  add/remove relation: `epsilon_prv_remove` composes the pair ((1 - q) N(0, s^2) + q N(1, s^2),
  N(0, s^2)) with the package's own PRV; `epsilon_prv_add` composes the swapped pair with this
  `SubsampledGaussianAddPRV` (dp/prv_add.py) on the same grid. The larger *upper* value is reported.
  This is the epsilon the project reports.
- `epsilon_rdp`: this module's own Renyi-DP bound of the SGM (Mironov, Talwar, Zhang 2019),
  composed over steps and converted to (epsilon, delta) with Balle et al. 2020, Theorem 21.
  Looser than PRV, always computed as an independent cross-check, and the fallback when the
  PRV accountant fails.

Guarantees
    For the neighbouring relation "add or remove one private example" and Poisson sampling
    with rate q, a run of `steps` DP-SGD steps with noise multiplier sigma is
    (compute_epsilon(...).epsilon, delta)-DP with respect to the private data set. The PRV
    value is max(remove, add): each direction's upper value bounds its epsilon up to
    prv-accountant's discretisation error, which it adds on (eps_error) before returning, and
    `EpsilonResult` keeps both (epsilon_remove, epsilon_add). The RDP value is a rigorous bound
    for both directions (Mironov et al. 2019: the remove direction's Renyi divergence is the
    larger one, B_alpha <= A_alpha, so one bound covers both).
Not covered
    Replace-one neighbours (roughly double epsilon); fixed-size or shuffled batches (the
    accounting assumes Poisson sampling, with empty batches kept, not resampled); public
    pretraining data; privacy spent on hyperparameter search or repeated runs; floating-point
    attacks on the noise sampler. The Gaussian-DP (CLT) approximation is never used: it can
    under-report epsilon.
"""

import argparse
import dataclasses
import functools
import json
import math
import numbers
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
from prv_accountant import PRVAccountant
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from dp.prv_add import SubsampledGaussianAddPRV, add_direction_composition  # noqa: F401 - the add direction
from ldm.errors import UserError

neighbouring_relation = "add/remove one example"

# Renyi orders searched by `epsilon_rdp`: 1.1, 1.2, ..., 10.9, then 12..63, then a few large ones.
DEFAULT_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [128, 256])

PRV_EPS_ERROR = 0.01  # prv-accountant discretisation error in epsilon (added to the estimate)
PRV_DELTA_ERROR_FRACTION = 1e-3  # prv-accountant delta error, as a fraction of delta
PRV_MAX_GRID_POINTS = 5_000_000  # larger PRV grids (about 1.7 GB) fall back to RDP
SIGMA_MAX = 1000.0  # calibration refuses targets that would need more noise than this
_SERIES_MAX_TERMS = 1_000_000  # safety stop for the fractional-order series
_SECANT_ROUNDS = 6  # model-guided calibration rounds before plain bisection
_MAX_CALIBRATION_ROUNDS = 100  # bisection from [0, 1000] reaches tol 1e-6 long before this
_SERIES_REL_TOL_LOG = -30.0  # stop the series once a term is below e^-30 of the running sum


# ---- Input validation ----------------------------------------------------------------------


def _require_real(name: str, value) -> float:
    """Return `value` as a float; refuse booleans, non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} = {value!r} is not a number; pass a finite real number.")
    if not math.isfinite(value):
        raise UserError(f"{name} = {value!r} is not finite; pass a finite real number.")
    return float(value)


def _require_whole(name: str, value, minimum: int, what: str) -> int:
    """Return `value` as an int >= minimum; refuse fractions and booleans."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value != int(value)):
        raise UserError(f"{name} = {value!r} is not a whole number; pass {what}.")
    if value < minimum:
        raise UserError(f"{name} = {value!r} is not allowed: {name} must be >= {minimum}; pass {what}.")
    return int(value)


def validate_privacy_params(epsilon=None, delta=None, q=None, steps=None, sigma=None, n=None) -> None:
    """Refuse privacy parameters outside the range where the accounting is meaningful.

    Each argument is checked only when given. Raises `UserError` naming the bad value, the
    allowed range and what to do: epsilon > 0; 0 < delta < 1, and delta < 1/N when the
    private set size N = n is given (a larger delta allows releasing one example outright);
    0 < q <= 1; steps a whole number >= 1; sigma >= 0. All values must be finite.
    """
    for name, value in (("epsilon", epsilon), ("delta", delta), ("q", q), ("sigma", sigma)):
        if value is not None:
            _require_real(name, value)
    if steps is not None:
        _require_whole("steps", steps, 1, "the number of DP-SGD steps (noisy updates), at least 1")
    if n is not None:
        _require_whole("n", n, 1, "the number of private training examples N")
    if epsilon is not None and epsilon <= 0:
        raise UserError(f"epsilon = {epsilon!r} is not allowed: epsilon must be > 0; pass a positive "
                        "privacy budget such as 1, 3 or 8.")
    if delta is not None and not 0 < delta < 1:
        raise UserError(f"delta = {delta!r} is not allowed: delta must be in (0, 1); pass a small "
                        "positive delta such as 1e-5 (below 1/N for N private examples).")
    if delta is not None and n is not None and delta >= 1 / n:
        raise UserError(f"delta = {delta!r} is too large for N = {n} private examples: delta must be "
                        f"below 1/N = {1 / n:.3g}; choose e.g. delta = {0.1 / n:.1g} or smaller.")
    if q is not None and not 0 < q <= 1:
        raise UserError(f"q = {q!r} is not allowed: the sampling rate q must be in (0, 1]; pass "
                        "q = expected batch size / number of private examples.")
    if sigma is not None and sigma < 0:
        raise UserError(f"sigma = {sigma!r} is not allowed: the noise multiplier sigma must be >= 0; "
                        "pass the noise standard deviation divided by the clipping norm.")


def _validate_mechanism(sigma, q, steps, delta) -> None:
    """Checks for `epsilon_prv` / `epsilon_rdp`, which also accept the trivial q = 0, steps = 0."""
    validate_privacy_params(delta=delta, sigma=sigma)
    _require_whole("steps", steps, 0, "the number of DP-SGD steps, at least 0")
    if not 0 <= _require_real("q", q) <= 1:
        raise UserError(f"q = {q!r} is not allowed: the sampling rate q must be in [0, 1]; pass "
                        "q = expected batch size / number of private examples.")


# ---- Log-space arithmetic (all quantities below are logarithms of positive numbers) --------


def _log_add(log_x: float, log_y: float) -> float:
    """log(x + y) from log x and log y, without overflow: max + log1p(exp(min - max))."""
    hi, lo = max(log_x, log_y), min(log_x, log_y)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(log_x: float, log_y: float) -> float:
    """log(x - y) from log x and log y, for x >= y: log x + log(-expm1(log y - log x))."""
    if log_y > log_x:
        raise ArithmeticError(f"log-space subtraction would be negative: {log_x} - {log_y}")
    if log_y == log_x:
        return -math.inf
    return log_x + math.log(-math.expm1(log_y - log_x))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate where erfc(x) underflows (x above about 26).

    For x < 25, math.erfc keeps full relative precision (erfc(25) is about 8.3e-274). Above, the
    asymptotic expansion erfc(x) = exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4)
    - 15/(8x^6) + ...) (Abramowitz & Stegun 7.1.23) is used; the first omitted term is
    below 1e-10 relative at x = 25.
    """
    if x < 25.0:
        return math.log(math.erfc(x))
    inv2 = 1.0 / (2.0 * x * x)
    series = -inv2 + 3.0 * inv2**2 - 15.0 * inv2**3
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(series)


# ---- RDP of the Sampled Gaussian Mechanism (Mironov, Talwar, Zhang 2019) -------------------


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for an integer order alpha >= 2, exactly.

    A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^alpha]; expanding the
    power binomially and using E[exp(k z / s^2)] = exp(k^2 / (2 s^2)) gives (Mironov et al.
    2019, Section 3, integer alpha):
        A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 s^2)).
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_a = -math.inf
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        log_term = log_binom + k * log_q + (alpha - k) * log_1mq + (k * k - k) / (2 * sigma**2)
        log_a = _log_add(log_a, log_term)
    return log_a


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for a fractional order alpha > 1 (Mironov et al. 2019, Section 3.3).

    The integral of A_alpha is split at z0 = s^2 log(1/q - 1) + 1/2, where the two parts of
    the mixture ratio are equal, and each side is expanded as a generalised binomial series
    (C(alpha, k) is negative for odd k - floor(alpha) >= 2, so the tail alternates):
        A_alpha = sum_k C(alpha, k) q^k (1 - q)^(alpha - k) e^((k^2 - k)/(2 s^2))
                        * erfc((k - z0) / (sqrt(2) s)) / 2
                + sum_k C(alpha, k) q^(alpha - k) (1 - q)^k e^((j^2 - j)/(2 s^2))
                        * erfc((z0 - j) / (sqrt(2) s)) / 2,          with j = alpha - k.
    Positive and negative terms are summed separately in log space and subtracted once.

    Truncation: for k > alpha the signs alternate and both |terms| decrease strictly in k
    (|C(alpha, k)| decreases, and the remaining factors have negative log-derivative in k
    because d/dx log erfc(x) < -2x), so the omitted tail is smaller than the last computed
    term. The series stops once that term is below e^-30 of the sum, and the term's size is
    added to the result, so truncation can only over-estimate A_alpha (a looser, valid bound).
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    log_pos, log_neg = -math.inf, -math.inf
    log_abs_binom, sign = 0.0, 1.0  # C(alpha, 0) = 1
    for k in range(_SERIES_MAX_TERMS):
        j = alpha - k
        log_t0 = (log_abs_binom + k * log_q + j * log_1mq + (k * k - k) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * sigma)))
        log_t1 = (log_abs_binom + j * log_q + k * log_1mq + (j * j - j) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        if sign > 0:
            log_pos = _log_add(log_pos, _log_add(log_t0, log_t1))
        else:
            log_neg = _log_add(log_neg, _log_add(log_t0, log_t1))
        if k > alpha and max(log_t0, log_t1) < log_pos + _SERIES_REL_TOL_LOG:
            tail_bound = _log_add(log_t0, log_t1)
            return _log_sub(_log_add(log_pos, tail_bound), log_neg)
        # C(alpha, k + 1) = C(alpha, k) * (alpha - k) / (k + 1)
        log_abs_binom += math.log(abs(alpha - k)) - math.log(k + 1)
        sign *= math.copysign(1.0, alpha - k)
    raise ArithmeticError(f"RDP series did not converge for q={q}, sigma={sigma}, alpha={alpha}")


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    """Renyi DP of order alpha of ONE step of the Sampled Gaussian Mechanism.

    Returns eps_alpha = log(A_alpha) / (alpha - 1), where A_alpha is the alpha-th moment of the
    likelihood ratio of (1 - q) N(0, s^2) + q N(1, s^2) against N(0, s^2) (Mironov et al.
    2019: this "remove" direction dominates the "add" direction, so the value holds for the
    add/remove relation). Special cases: q = 0 -> 0; q = 1 -> alpha / (2 s^2), the Gaussian
    mechanism (Mironov 2017, Proposition 7); sigma = 0 -> inf.
    """
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, sigma, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, alpha)
    return max(log_a, 0.0) / (alpha - 1)


def _rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """Smallest epsilon over orders from an RDP curve (Balle et al. 2020, Theorem 21).

    An (alpha, r)-RDP mechanism is (eps, delta)-DP for
        eps = r + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).
    Clipped below at 0 (a larger epsilon is always a valid, weaker claim).
    """
    rdp = np.asarray(rdp, dtype=float)
    alpha = np.asarray(orders, dtype=float)
    eps = rdp + np.log((alpha - 1) / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)
    finite = eps[np.isfinite(eps)]
    return float(max(finite.min(), 0.0)) if finite.size else math.inf


def epsilon_rdp(sigma: float, q: float, steps: int, delta: float,
                orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """(eps, delta) of `steps` SGM steps by RDP: this module's own, looser, bound.

    RDP composes additively (Mironov 2017, Proposition 1): steps * _rdp_one_step at each
    order, then `_rdp_to_epsilon`.

    Guarantees: a valid upper bound on epsilon for add/remove-one neighbours under Poisson
    sampling with rate q, for every order list (more orders only tighten it). Not covered:
    replace-one neighbours, other sampling schemes.
    """
    _validate_mechanism(sigma, q, steps, delta)
    if any(not isinstance(a, numbers.Real) or not a > 1 for a in orders):
        raise UserError(f"orders = {list(orders)!r} is not allowed: every Renyi order must be > 1.")
    if steps == 0 or q == 0:
        return 0.0
    rdp = [steps * _rdp_one_step(q, sigma, alpha) for alpha in orders]
    return _rdp_to_epsilon(rdp, orders, delta)


# ---- PRV accountant (Gopi, Lee, Wutschitz 2021) through prv-accountant 0.2.0 ---------------


@functools.lru_cache(maxsize=256)
def _prv_grid_points(sigma: float, q: float, steps: int, delta: float) -> float:
    """Number of grid points prv-accountant 0.2.0 allocates for this mechanism (either direction).

    Domain [-L, L] with L = 3 + max(RDP epsilon of the composition at delta_error / 4, RDP
    epsilon of one step at delta_error / (8 steps), eps_error) (Gopi et al. 2021, Remark 5.6),
    and mesh eps_error / sqrt(steps / 2 * log(12 / delta_error)) (their Theorem 5.5).
    """
    delta_error = delta * PRV_DELTA_ERROR_FRACTION
    domain = 3 + max(epsilon_rdp(sigma, q, steps, delta_error / 4),
                     epsilon_rdp(sigma, q, 1, delta_error / (8 * steps)), PRV_EPS_ERROR)
    mesh = PRV_EPS_ERROR / math.sqrt(steps / 2 * math.log(12 / delta_error))
    return 2 * domain / mesh


def _refuse_large_grid(sigma: float, q: float, steps: int, delta: float) -> None:
    """MemoryError above PRV_MAX_GRID_POINTS (about 350 bytes a point; `compute_epsilon` then uses RDP)."""
    points = _prv_grid_points(sigma, q, steps, delta)
    if points > PRV_MAX_GRID_POINTS:
        raise MemoryError(f"the PRV grid would need {points:.3g} points (limit {PRV_MAX_GRID_POINTS:.3g}); "
                          "epsilon is too large for the PRV accountant here")


@functools.lru_cache(maxsize=256)
def _prv_upper_remove(sigma: float, q: float, steps: int, delta: float) -> float:
    """prv-accountant's upper epsilon of the remove pair; memoised because calibration re-evaluates points."""
    _refuse_large_grid(sigma, q, steps, delta)
    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    # prv-accountant's CDF overflows exp(t) far in the tail, where the CDF correctly becomes 1.
    with np.errstate(over="ignore"):
        accountant = PRVAccountant(prvs=[mechanism], max_self_compositions=[steps], eps_error=PRV_EPS_ERROR,
                                   delta_error=delta * PRV_DELTA_ERROR_FRACTION)
        _lower, _estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[steps])
    return float(upper)


@functools.lru_cache(maxsize=256)
def _prv_upper_add(sigma: float, q: float, steps: int, delta: float) -> float:
    """Upper epsilon of the add pair, as PRVAccountant.compute_epsilon reads it; memoised."""
    _refuse_large_grid(sigma, q, steps, delta)
    composed = add_direction_composition(sigma, q, steps, delta, PRV_EPS_ERROR, PRV_DELTA_ERROR_FRACTION)
    _lower, _estimate, upper = composed.compute_epsilon(delta, delta * PRV_DELTA_ERROR_FRACTION, PRV_EPS_ERROR)
    return float(upper)


def _trivial_epsilon(sigma: float, q: float, steps: int, delta: float) -> Optional[float]:
    """Validate; return the epsilon of a trivial mechanism (no steps or q = 0: 0; no noise: inf), else None."""
    _validate_mechanism(sigma, q, steps, delta)
    if steps == 0 or q == 0:
        return 0.0
    return math.inf if sigma == 0 else None


def epsilon_prv_remove(sigma: float, q: float, steps: int, delta: float) -> float:
    """PRV upper epsilon of `steps` SGM steps for the REMOVE pair ((1 - q) N(0, s^2) + q N(1, s^2), N(0, s^2)).

    Gopi, Lee, Wutschitz 2021: the PRV of one step is discretised on a grid, self-composed by
    FFT, and eps(delta) read off; Theorem 5.5 there bounds the error, and prv-accountant returns
    (lower, estimate, upper) with upper = estimate(delta - delta_error) + eps_error. Only `upper`
    is returned. May raise at large epsilon ("Discrete mean differs ... from continuous mean", or
    the grid-size refusal); `compute_epsilon` then falls back to `epsilon_rdp`.
    """
    trivial = _trivial_epsilon(sigma, q, steps, delta)
    if trivial is not None:
        return trivial
    return max(_prv_upper_remove(float(sigma), float(q), int(steps), float(delta)), 0.0)


def epsilon_prv_add(sigma: float, q: float, steps: int, delta: float) -> float:
    """PRV upper epsilon of `steps` SGM steps for the ADD pair (N(0, s^2), (1 - q) N(0, s^2) + q N(1, s^2)).

    `SubsampledGaussianAddPRV` composed on prv-accountant's grid by `dp.prv_add.add_direction_composition`,
    with the same error terms (eps_error, delta_error) as `epsilon_prv_remove`. Raises likewise.
    """
    trivial = _trivial_epsilon(sigma, q, steps, delta)
    if trivial is not None:
        return trivial
    return max(_prv_upper_add(float(sigma), float(q), int(steps), float(delta)), 0.0)


def epsilon_prv(sigma: float, q: float, steps: int, delta: float) -> float:
    """(eps, delta) of `steps` SGM steps by the PRV accountant: max(epsilon_prv_remove, epsilon_prv_add).

    Guarantees: an upper bound on epsilon for add/remove-one neighbours under Poisson sampling
    with rate q, both directions composed, up to the validity of prv-accountant's error analysis.
    Not covered: replace-one neighbours.
    """
    return max(epsilon_prv_remove(sigma, q, steps, delta), epsilon_prv_add(sigma, q, steps, delta))


# ---- The reported epsilon: PRV upper (max of both directions), RDP fallback and cross-check -


@dataclasses.dataclass(frozen=True)
class EpsilonResult:
    """The privacy of one DP-SGD run: epsilon as reported, and how it was obtained.

    epsilon: the reported bound (`epsilon_prv` when it succeeded, else `epsilon_rdp`).
    accountant: "prv" or "rdp", whichever produced `epsilon`.
    epsilon_prv: max(epsilon_remove, epsilon_add), or None when prv-accountant failed.
    epsilon_remove: the PRV upper value of the remove pair (`epsilon_prv_remove`), or None.
    epsilon_add: the PRV upper value of the add pair (`epsilon_prv_add`), or None.
    epsilon_rdp: the RDP bound, valid for both directions, always computed as a cross-check
        (>= the PRV value in practice).
    warning: why the fallback was used, or None.
    """

    epsilon: float
    accountant: str
    epsilon_prv: Optional[float]
    epsilon_remove: Optional[float]
    epsilon_add: Optional[float]
    epsilon_rdp: float
    warning: Optional[str]


def _prv_directions(sigma: float, q: float, steps: int, delta: float, stop_above: float = math.inf):
    """(epsilon_remove, epsilon_add, None) from the PRV accountant, or (None, None, warning) if it fails.

    epsilon_add is skipped (None) when epsilon_remove > stop_above: the max is above it anyway.
    """
    try:
        remove = epsilon_prv_remove(sigma, q, steps, delta)
        return remove, None if remove > stop_above else epsilon_prv_add(sigma, q, steps, delta), None
    except UserError:
        raise
    except Exception as error:  # prv-accountant can fail numerically at large epsilon
        return None, None, (f"prv-accountant failed ({type(error).__name__}: {error}); reporting the looser "
                            f"RDP bound instead (sigma={sigma}, q={q}, steps={steps}, delta={delta}).")


def _accounted_epsilon(sigma: float, q: float, steps: int, delta: float, stop_above: float = math.inf) -> float:
    """The reporting rule: the larger PRV direction, else (PRV failed) the RDP bound.

    Calibration passes its target as stop_above: a remove epsilon above it settles the side of
    the target (the max is larger still), so the add direction is not computed there.
    """
    remove, add, _warning = _prv_directions(sigma, q, steps, delta, stop_above)
    if remove is None:
        return epsilon_rdp(sigma, q, steps, delta)
    return remove if add is None else max(remove, add)


def compute_epsilon(sigma: float, q: float, steps: int, delta: float) -> EpsilonResult:
    """Epsilon of `steps` DP-SGD steps, as the project reports it.

    Computes both PRV directions and reports the larger; if prv-accountant raises anything in
    either, falls back to `epsilon_rdp`, records why in `warning` and emits a `warnings.warn`.
    The RDP value is always computed.

    Guarantees: the run is (epsilon, delta)-DP for add/remove-one neighbours of the private
    set under Poisson sampling with rate q (see the module docstring for what is not covered).
    """
    validate_privacy_params(delta=delta, q=q, steps=steps, sigma=sigma)
    remove, add, warning = _prv_directions(sigma, q, steps, delta)
    if warning is not None:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    eps_rdp = epsilon_rdp(sigma, q, steps, delta)
    eps_prv = None if remove is None else max(remove, add)
    return EpsilonResult(epsilon=eps_rdp if eps_prv is None else eps_prv,
                         accountant="rdp" if eps_prv is None else "prv", epsilon_prv=eps_prv,
                         epsilon_remove=remove, epsilon_add=add, epsilon_rdp=eps_rdp, warning=warning)


# ---- Noise calibration ---------------------------------------------------------------------


def _rdp_sigma(target: float, q: float, steps: int, delta: float) -> float:
    """Smallest sigma (relative precision 1e-3) with epsilon_rdp <= target: a starting point.

    Returns SIGMA_MAX when even SIGMA_MAX does not meet the target under RDP.
    """
    hi = 1.0
    while epsilon_rdp(hi, q, steps, delta) > target:
        if hi >= SIGMA_MAX:
            return SIGMA_MAX
        hi = min(2 * hi, SIGMA_MAX)
    lo = 0.0
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if epsilon_rdp(mid, q, steps, delta) <= target else (mid, hi)
    return hi


def _next_guess(points: dict, target: float, tol: float, slope_hint: float) -> float:
    """Sigma where epsilon is predicted to equal `target`: secant in (log sigma, log epsilon).

    Drawn through the evaluated point whose epsilon is nearest the target and the next-nearest
    point at least 2 tol away from it (closer pairs give a noisy slope); failing that, through
    the nearest point with `slope_hint` (d log eps / d log sigma of RDP). A proposal only: the
    bracket in `calibrate_sigma` is what guarantees the result. NaN when no model applies.
    """
    usable = sorted(((s, e) for s, e in points.items() if 0 < e < math.inf),
                    key=lambda point: abs(math.log(point[1] / target)))
    if not usable:
        return math.nan
    s1, e1 = usable[0]
    slope = slope_hint
    for s0, e0 in usable[1:]:
        if abs(s0 - s1) >= 2 * tol and e0 != e1:
            slope = math.log(e1 / e0) / math.log(s1 / s0)
            break
    if not slope < 0:
        return math.nan
    return s1 * math.exp(math.log(target / e1) / slope)


def _rdp_log_slope(sigma: float, q: float, steps: int, delta: float) -> float:
    """d log(epsilon_rdp) / d log(sigma) near sigma (a 5% finite difference); NaN if eps is 0."""
    eps_0, eps_1 = epsilon_rdp(sigma, q, steps, delta), epsilon_rdp(1.05 * sigma, q, steps, delta)
    if not 0 < eps_1 <= eps_0 < math.inf:
        return math.nan
    return math.log(eps_1 / eps_0) / math.log(1.05)


def _feasible_upper_end(target: float, q: float, steps: int, delta: float, sigma: float):
    """Raise sigma by factors of 1.5 until its accounted epsilon is <= target.

    Returns (lo, hi, points): lo the last infeasible sigma tried (0 if none), hi feasible, and
    points {sigma: accounted epsilon} for every evaluation. UserError above SIGMA_MAX.
    """
    lo, points = 0.0, {}
    while True:
        points[sigma] = _accounted_epsilon(sigma, q, steps, delta, stop_above=target)
        if points[sigma] <= target:
            return lo, sigma, points
        if sigma >= SIGMA_MAX:
            raise UserError(f"target epsilon = {target!r} (q = {q}, steps = {steps}, delta = {delta}) "
                            f"is a target that would need sigma above {SIGMA_MAX:g}; raise epsilon or "
                            "delta, or lower q or the number of steps.")
        lo, sigma = sigma, min(1.5 * sigma, SIGMA_MAX)


def calibrate_sigma(target_epsilon: float, q: float, steps: int, delta: float,
                    tol: float = 0.005) -> float:
    """Smallest noise multiplier whose accounted epsilon is <= target_epsilon, to within tol.

    "Accounted" is the `compute_epsilon` rule: the larger of the PRV upper values of the two
    directions, RDP when prv-accountant fails (a probe whose remove epsilon exceeds the target is
    infeasible whatever the add direction gives, which is then not computed). Search: the
    RDP-calibrated sigma (cheap; RDP >= PRV) starts the feasible upper end hi.
    Each round proposes a secant guess (`_next_guess`); far from the evaluated points it is
    probed once, near them it is straddled by probes at guess +/- 0.45 tol. After
    _SECANT_ROUNDS rounds the guess is the bracket midpoint (plain bisection), so the loop
    ends. Invariant: epsilon(hi) <= target and epsilon(lo) > target were both evaluated
    (or lo = 0, no noise). Returns hi once hi - lo <= tol.

    Guarantees: compute_epsilon(returned sigma, q, steps, delta).epsilon <= target_epsilon.
    The returned sigma is within tol of the smallest such sigma when epsilon is monotone in
    sigma (true for each accountant; a PRV failure at some sigmas only can break it).
    Raises UserError when the target would need sigma above SIGMA_MAX = 1000.
    """
    validate_privacy_params(epsilon=target_epsilon, delta=delta, q=q, steps=steps)
    if not 0 < _require_real("tol", tol) <= 0.1:
        raise UserError(f"tol = {tol!r} is not allowed: tol must be in (0, 0.1]; e.g. 0.005.")
    start = _rdp_sigma(target_epsilon, q, steps, delta)
    lo, hi, points = _feasible_upper_end(target_epsilon, q, steps, delta, start)
    slope = _rdp_log_slope(hi, q, steps, delta)
    for round_index in range(_MAX_CALIBRATION_ROUNDS):
        if hi - lo <= tol:
            return hi
        guess = _next_guess(points, target_epsilon, tol, slope)
        if round_index < _SECANT_ROUNDS and math.isfinite(guess):
            guess = min(max(guess, lo + 0.45 * tol), hi - 0.45 * tol)
        else:
            guess = 0.5 * (lo + hi)
        near = min(abs(guess - s) for s in points) < 4 * tol
        for probe in (guess + 0.45 * tol, guess - 0.45 * tol) if near else (guess,):
            if lo < probe < hi:
                points[probe] = _accounted_epsilon(probe, q, steps, delta, stop_above=target_epsilon)
                lo, hi = (lo, probe) if points[probe] <= target_epsilon else (probe, hi)
    raise ArithmeticError(f"sigma calibration did not converge: bracket [{lo}, {hi}], tol {tol}")


# ---- Command line --------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dp.accountant",
        description="Epsilon of DP-SGD (Poisson sampling, Gaussian noise, add/remove-one "
                    "neighbours) for a noise multiplier, or the noise multiplier for a target epsilon.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sigma", type=float, help="noise multiplier: print the epsilon it gives")
    mode.add_argument("--epsilon", type=float, help="target epsilon: print the calibrated sigma")
    parser.add_argument("--q", type=float, required=True, help="sampling rate = expected batch / N")
    parser.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps")
    parser.add_argument("--delta", type=float, required=True, help="target delta")
    parser.add_argument("--n", type=int, default=None, help="private set size N, to check delta < 1/N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _report(args: argparse.Namespace) -> dict:
    """Run the requested computation; return every input and output as one flat dict."""
    validate_privacy_params(epsilon=args.epsilon, delta=args.delta, q=args.q, steps=args.steps,
                            sigma=args.sigma, n=args.n)
    mode = "calibrate" if args.epsilon is not None else "account"
    if mode == "account":
        sigma = args.sigma
    else:
        sigma = calibrate_sigma(args.epsilon, args.q, args.steps, args.delta)
    with warnings.catch_warnings():  # a fallback is printed once, as the "warning:" line of `main`
        warnings.filterwarnings("ignore", message="prv-accountant failed", category=RuntimeWarning)
        result = compute_epsilon(sigma, args.q, args.steps, args.delta)
    return {"mode": mode, "target_epsilon": args.epsilon, "sigma": sigma, "q": args.q,
            "steps": args.steps, "delta": args.delta, "n": args.n, **dataclasses.asdict(result),
            "neighbouring_relation": neighbouring_relation, "sampling": "Poisson"}


def _human_line(report: dict) -> str:
    setting = (f"q = {report['q']:g}, {report['steps']} steps, delta = {report['delta']:g}, "
               f"Poisson sampling, {neighbouring_relation} neighbours")
    how = f"{report['accountant']} accountant"
    if report["accountant"] == "prv":
        how += f", max of remove {report['epsilon_remove']:.4f} and add {report['epsilon_add']:.4f}"
    privacy = f"epsilon = {report['epsilon']:.4f} ({how}; RDP cross-check {report['epsilon_rdp']:.4f})"
    if report["mode"] == "calibrate":
        return f"sigma = {report['sigma']:.4f} gives {privacy} <= target {report['target_epsilon']:g}; {setting}"
    return f"{privacy} for sigma = {report['sigma']:g}; {setting}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (2 on a UserError)."""
    args = _build_parser().parse_args(argv)
    try:
        report = _report(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else _human_line(report))
    if report["warning"] and not args.json:
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
