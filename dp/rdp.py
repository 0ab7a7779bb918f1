"""Renyi DP of the Sampled Gaussian Mechanism (Mironov, Talwar, Zhang 2019), the math of `epsilon_rdp`.

`rdp_one_step(q, sigma, alpha)` is the order-alpha RDP of one step (Poisson rate q, noise multiplier sigma,
sensitivity 1), in log space throughout; `rdp_to_epsilon` converts composed RDP to (epsilon, delta) with
Balle et al. 2020, Theorem 21. dp/accountant.py validates the inputs and composes; nothing here is checked.
"""

import math
from typing import Sequence

import numpy as np

# Renyi orders searched by `epsilon_rdp`: 1.1, 1.2, ..., 10.9, then 12..63, then a few large ones.
DEFAULT_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [128, 256])
_SERIES_MAX_TERMS = 1_000_000  # safety stop for the fractional-order series
_SERIES_REL_TOL_LOG = -30.0  # stop the series once a term is below e^-30 of the running sum


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


def rdp_one_step(q: float, sigma: float, alpha: float) -> float:
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


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
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
