"""Tests for dp/accountant.py: pinned public figures, independent numerical checks, the CLI.

Reference figures were computed with public accountants (prv-accountant's PRV estimate, the RDP bound of
Mironov, Talwar, Zhang 2019), not with this code.
PRV calls cost about a second each; the module memoises them, so repeated parameters are free.
The add direction is checked against a Monte-Carlo CDF, the exact one-step hockey-stick
divergence, and a plain numpy PLD composition written here.
"""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism
from scipy import special

from dp import accountant as acc
from dp import rdp
from dp.finetune import privacy_plan
from ldm.config import make_config
from ldm.errors import UserError
from test_dp import finetune, fresh_run, pretrained  # noqa: F401 - the smoke fine-tuning helper and its fixture

# (sigma, q, steps, delta, PRV estimate, RDP epsilon), from those public accountants.
REFERENCE = [
    (1.0, 256 / 60000, 2340, 1e-5, 1.099, 1.352),
    (0.6, 0.01, 1000, 1e-5, 7.434, 8.666),
    (2.0, 0.001, 100000, 1e-6, 0.697, 0.753),
    (5.0, 0.1, 500, 1e-5, 1.806, 1.969),
]
# (target epsilon, sigma) for q = 256/60000, steps = 2343, delta = 1e-5, from those public accountants.
CALIBRATION = [(1.0, 1.06), (3.0, 0.694), (8.0, 0.524)]
CAL_Q, CAL_STEPS, CAL_DELTA = 256 / 60000, 2343, 1e-5


# ---- pinned reference values ----------------------------------------------------------------------


@pytest.mark.parametrize("sigma, q, steps, delta, prv_ref, rdp_ref", REFERENCE)
def test_prv_and_rdp_match_published_values(sigma, q, steps, delta, prv_ref, rdp_ref):
    eps_prv = acc.epsilon_prv(sigma, q, steps, delta)
    eps_rdp = acc.epsilon_rdp(sigma, q, steps, delta)
    # the upper value: the published estimate plus prv-accountant's eps_error (0.01), within 0.02
    assert prv_ref + 0.005 <= eps_prv <= prv_ref + 0.02
    assert abs(eps_rdp - rdp_ref) <= 0.02
    assert eps_rdp >= eps_prv


def test_compute_epsilon_reports_prv_upper_and_rdp_cross_check():
    sigma, q, steps, delta, prv_ref, rdp_ref = REFERENCE[1]
    result = acc.compute_epsilon(sigma, q, steps, delta)
    assert result.accountant == "prv" and result.warning is None
    assert result.epsilon == result.epsilon_prv == acc.epsilon_prv(sigma, q, steps, delta)
    assert result.epsilon_remove == acc.epsilon_prv_remove(sigma, q, steps, delta)
    assert result.epsilon_add == acc.epsilon_prv_add(sigma, q, steps, delta)
    assert result.epsilon == max(result.epsilon_remove, result.epsilon_add)
    assert result.epsilon_add < result.epsilon_remove - 1  # 3.19 against 7.44: two different numbers
    assert abs(result.epsilon - prv_ref) <= 0.02
    assert abs(result.epsilon_rdp - rdp_ref) <= 0.02
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.epsilon = 0.0


# ---- exact Gaussian mechanism (q = 1): both accountants bound the true epsilon from above --------


def _gaussian_exact_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/noise ratio mu (Balle & Wang
    2018, Theorem 8: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        excess = phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2) - delta
        lo, hi = (mid, hi) if excess > 0 else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma, steps", [(3.0, 10), (1.0, 1)])
def test_full_batch_gaussian_is_bounded_above_tightly(sigma, steps):
    # steps compositions of N(0, sigma^2) with sensitivity 1 = one Gaussian with mu = sqrt(steps)/sigma
    exact = _gaussian_exact_epsilon(math.sqrt(steps) / sigma, 1e-5)
    eps_prv = acc.epsilon_prv(sigma, 1.0, steps, 1e-5)
    eps_rdp = acc.epsilon_rdp(sigma, 1.0, steps, 1e-5)
    assert exact <= eps_prv <= exact + 0.02
    # at q = 1 the add pair is the remove pair mirrored (x -> 1 - x): the same Gaussian mechanism
    assert exact <= acc.epsilon_prv_add(sigma, 1.0, steps, 1e-5) <= exact + 0.02
    assert exact <= eps_rdp <= 1.15 * exact


# ---- the add direction: its PRV, its one-step delta, its composition, and the max ----------------


def _add_loss(sigma: float, q: float, x: np.ndarray) -> np.ndarray:
    """log(N(0, s^2)(x) / ((1 - q) N(0, s^2)(x) + q N(1, s^2)(x))), straight from the densities."""
    return -np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.6, 0.3), (2.0, 0.5)])
def test_add_prv_cdf_matches_monte_carlo(sigma, q):
    n = 1_000_000
    losses = np.sort(_add_loss(sigma, q, np.random.default_rng(20240611).normal(0.0, sigma, n)))
    t = np.quantile(losses, [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
    empirical = np.searchsorted(losses, t, side="right") / n
    tolerance = 5 * np.sqrt(empirical * (1 - empirical) / n)  # 5 binomial standard deviations, <= 2.5e-3
    assert np.all(np.abs(acc.SubsampledGaussianAddPRV(q, sigma).cdf(t) - empirical) <= tolerance)
    # the test can tell the directions apart: the remove PRV's CDF misses by far more
    remove = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    with np.errstate(over="ignore"):
        assert np.max(np.abs(remove.cdf(t).astype(float) - empirical) / tolerance) > 10


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.5, 0.01), (3.0, 0.5)])
def test_add_prv_tails_keep_relative_precision(sigma, q):
    prv = acc.SubsampledGaussianAddPRV(q, sigma)
    c = prv.loss_max
    for d in (1e-3, 1e-6, 1e-9, 1e-12):  # P[c - d < Y <= c] = P[x < x_d]; a naive 1 - F(c - d) loses it
        t = c - d
        d = c - t  # the d that floating point represents
        x_d = sigma**2 * math.log(math.expm1(d) * (1 - q) / q) + 0.5
        assert float(prv.probability(t, c)) == pytest.approx(special.ndtr(x_d / sigma), rel=1e-6, abs=0)
    for t in (-5.0, -30.0):  # lower tail: P[Y <= t] = P[x >= x(t)], x(t) from the inverse of Y
        x_t = sigma**2 * math.log((math.exp(-t) - (1 - q)) / q) + 0.5
        assert float(prv.cdf(t)) == pytest.approx(special.ndtr(-x_t / sigma), rel=1e-9, abs=0)
    assert prv.cdf(c) == 1.0 and prv.probability(c, c + 1.0) == 0.0  # no mass at or above c


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.6, 0.01), (0.3, 0.02)])
def test_add_prv_truncated_mean_matches_a_sum_over_x(sigma, q):
    prv = acc.SubsampledGaussianAddPRV(q, sigma)
    x = np.linspace(-40 * sigma, 40 * sigma + 1, 4_000_001)
    weight = np.exp(-x**2 / (2 * sigma**2))
    y = _add_loss(sigma, q, x)
    keep = np.abs(y) <= 9.0
    assert prv.truncated_mean(-9.0, 9.0) == pytest.approx(np.sum(y * weight * keep) / np.sum(weight * keep),
                                                          rel=1e-9, abs=1e-15)


def test_add_composition_carries_the_exact_mean():
    # E[sum of the losses] = steps * KL(N(0, s^2) || mixture), the KL by a sum over x. prv-accountant's
    # own truncated mean (a quadrature over t that steps over the kink at c) is 7.5e-4 off here.
    sigma, q, steps = 1.0, 0.1, 100
    composed = acc.add_direction_composition(sigma, q, steps, 1e-5, acc.PRV_EPS_ERROR, acc.PRV_DELTA_ERROR_FRACTION)
    x = np.linspace(-40 * sigma, 40 * sigma + 1, 4_000_001)
    weight = np.exp(-x**2 / (2 * sigma**2))
    kl = np.sum(_add_loss(sigma, q, x) * weight) / np.sum(weight)
    assert float(np.dot(composed.domain.ts(), composed.pmf)) == pytest.approx(steps * kl, abs=1e-7)


def _hockey_stick(log_p: np.ndarray, log_q: np.ndarray, eps: float, dx: float) -> float:
    """integral of max(0, P - e^eps Q) by the trapezoid rule on an even grid of step dx."""
    f = np.maximum(0.0, np.exp(log_p) - np.exp(eps + log_q))
    return dx * (f.sum() - 0.5 * (f[0] + f[-1]))


@pytest.mark.parametrize("sigma, q, epsilons", [(1.0, 0.5, (0.05, 0.2, 0.4)), (2.0, 0.8, (0.2, 0.6)),
                                                (0.5, 0.3, (0.2, 0.4))])
def test_add_one_step_delta_is_hockey_stick_of_swapped_pair(sigma, q, epsilons):
    x = np.linspace(-14 * sigma, 14 * sigma + 1, 2_000_001)
    log_n0 = -x**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_mix = np.logaddexp(math.log1p(-q) + log_n0, math.log(q) + log_n0 + (2 * x - 1) / (2 * sigma**2))
    dx = x[1] - x[0]
    composed = acc.add_direction_composition(sigma, q, 1, 1e-5, acc.PRV_EPS_ERROR, acc.PRV_DELTA_ERROR_FRACTION)
    delta_error = 1e-5 * acc.PRV_DELTA_ERROR_FRACTION
    for eps in epsilons:
        exact = _hockey_stick(log_n0, log_mix, eps, dx)  # P = N(0, s^2), Q = the mixture
        assert composed.compute_delta_estimate(eps) == pytest.approx(exact, rel=2e-4, abs=1e-12)
        assert composed.compute_delta_estimate(eps + acc.PRV_EPS_ERROR) - delta_error <= exact
        assert exact <= composed.compute_delta_estimate(eps - acc.PRV_EPS_ERROR) + delta_error
        assert _hockey_stick(log_mix, log_n0, eps, dx) > 1.03 * exact + 1e-3  # the remove pair differs
    above_c = -math.log1p(-q) + 0.02  # the add loss is below c = -log(1 - q): no delta beyond it
    assert _hockey_stick(log_n0, log_mix, above_c, dx) == 0.0
    assert abs(composed.compute_delta_estimate(above_c)) < 1e-12


def _add_pld_epsilon_bounds(sigma, q, steps, delta, h=1e-4, floor=3.0, cells=2_000_000):
    """(optimistic, pessimistic) epsilon of the add pair composed `steps` times by a plain numpy PLD.

    x-cells of N(0, s^2) carry their exact mass; the pessimistic PLD puts it at the largest loss
    over the cell rounded up to the grid h (losses below -floor raised to it, the x tails at their
    sup), the optimistic one at the smallest rounded down (tails dropped). Both are composed by
    zero-padded FFT (no wrap-around), and eps(delta) is found by bisection on
    delta(eps) = sum_y p(y) (1 - e^(eps - y))_+. The true epsilon lies between the two.
    """
    edges = np.linspace(-12 * sigma, 12 * sigma + 1, cells + 1)
    loss, mass = _add_loss(sigma, q, edges), np.diff(special.ndtr(edges / sigma))  # loss decreases in x
    k_floor, k_top = -math.ceil(floor / h), math.ceil(-math.log1p(-q) / h)
    k_pess = np.maximum(np.ceil(loss[:-1] / h).astype(int), k_floor)
    pess = np.bincount(k_pess - k_floor, mass, k_top - k_floor + 1)
    pess[-1] += special.ndtr(edges[0] / sigma)
    pess[max(math.ceil(loss[-1] / h), k_floor) - k_floor] += special.ndtr(-edges[-1] / sigma)
    k_opt = np.floor(loss[1:] / h).astype(int)
    opt = np.bincount(k_opt[k_opt >= k_floor] - k_floor, mass[k_opt >= k_floor], k_top - k_floor + 1)
    opt[math.floor(loss[0] / h) - k_floor] += special.ndtr(edges[0] / sigma)
    bounds = []
    for pmf in (opt, pess):
        n = steps * (len(pmf) - 1) + 1
        size = 1 << (n - 1).bit_length()
        composed = np.fft.irfft(np.fft.rfft(pmf, size) ** steps, size)[:n]
        y = (steps * k_floor + np.arange(n)) * h
        lo, hi = 0.0, float(y[-1])
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            delta_mid = np.sum(composed[y > mid] * -np.expm1(mid - y[y > mid]))
            lo, hi = (mid, hi) if delta_mid > delta else (lo, mid)
        bounds.append(hi)
    return tuple(bounds)


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.1, 100), (2.0, 0.5, 20)])
def test_composed_add_epsilon_matches_independent_pld(sigma, q, steps):
    optimistic, pessimistic = _add_pld_epsilon_bounds(sigma, q, steps, 1e-5)
    assert pessimistic - optimistic <= 0.015  # the grid bracket is narrow
    eps_add = acc.epsilon_prv_add(sigma, q, steps, 1e-5)  # an estimate plus eps_error = 0.01
    assert optimistic + acc.PRV_EPS_ERROR - 0.002 <= eps_add <= pessimistic + acc.PRV_EPS_ERROR + 0.002
    assert acc.epsilon_prv_remove(sigma, q, steps, 1e-5) > pessimistic + 1  # 7.06 and 5.70: another pair


def test_compute_epsilon_reports_the_larger_direction(monkeypatch):
    sigma, q, steps, delta = 1.0, 0.01, 200, 1e-5
    remove = acc.epsilon_prv_remove(sigma, q, steps, delta)
    # the add direction is the smaller one here; pretend it is the larger one
    monkeypatch.setattr(acc, "_prv_upper_add", lambda *args: remove + 0.5)
    result = acc.compute_epsilon(sigma, q, steps, delta)
    assert result.accountant == "prv" and result.epsilon_remove == remove
    assert result.epsilon == result.epsilon_prv == result.epsilon_add == remove + 0.5
    assert acc.epsilon_prv(sigma, q, steps, delta) == remove + 0.5


def test_calibration_uses_the_larger_direction(monkeypatch):
    q, steps, delta, target = 0.01, 200, 1e-5, 2.0
    plain = acc.calibrate_sigma(target, q, steps, delta)
    assert acc.epsilon_prv_add(plain, q, steps, delta) < acc.epsilon_prv_remove(plain, q, steps, delta)
    # an add direction 20% above the remove direction must cost noise
    monkeypatch.setattr(acc, "_prv_upper_add", lambda *args: 1.2 * acc._prv_upper_remove(*args))
    larger = acc.calibrate_sigma(target, q, steps, delta)
    assert larger > plain + 0.03  # 0.823 against 0.778
    assert acc.compute_epsilon(larger, q, steps, delta).epsilon <= target
    assert acc.compute_epsilon(larger - 0.01, q, steps, delta).epsilon > target


# ---- RDP formulas against brute-force numerical integration --------------------------------------


def _log_a_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """log of A_alpha = integral of mu0^(1-alpha) mu^alpha, mu0 = N(0, s^2), mu = (1-q) mu0 + q N(1, s^2),
    on a fine grid (trapezoid rule, integrand scaled by its maximum)."""
    z = np.linspace(-14 * sigma, alpha + 14 * sigma, 400_001)
    log_mu0 = -z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log(1 - q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_integrand = log_mu0 + alpha * log_ratio
    peak = log_integrand.max()
    dz = z[1] - z[0]
    values = np.exp(log_integrand - peak)
    return peak + math.log(dz * (values.sum() - 0.5 * (values[0] + values[-1])))


@pytest.mark.parametrize("q, sigma", [(0.1, 1.0), (0.02, 0.7), (0.3, 2.0)])
@pytest.mark.parametrize("alpha", [2, 3, 10, 1.1, 2.5, 7.3])
def test_rdp_one_step_matches_quadrature(q, sigma, alpha):
    # compared as log A_alpha = (alpha - 1) * rdp: the quadrature is good to about 1e-11 absolute there
    log_a = (alpha - 1) * rdp.rdp_one_step(q, sigma, alpha)
    assert log_a == pytest.approx(_log_a_by_quadrature(q, sigma, alpha), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("alpha", [2, 3, 6])
def test_fractional_series_agrees_with_integer_formula_at_integers(alpha):
    q, sigma = 0.05, 0.8
    exact = rdp._log_a_integer(q, sigma, alpha)
    for nearby in (alpha - 1e-9, alpha + 1e-9):
        assert rdp._log_a_fractional(q, sigma, nearby) == pytest.approx(exact, rel=1e-6)


def test_rdp_special_cases_follow_closed_forms():
    assert rdp.rdp_one_step(1.0, 2.0, 5.0) == pytest.approx(5.0 / 8.0)  # Gaussian: alpha / (2 s^2)
    assert rdp.rdp_one_step(0.0, 2.0, 5.0) == 0.0
    assert rdp.rdp_one_step(0.1, 0.0, 5.0) == math.inf


@pytest.mark.parametrize("x", [-3.0, 0.0, 4.0, 24.9, 25.0, 25.5, 26.0, 26.5])
def test_log_erfc_matches_math_erfc_where_representable(x):
    assert rdp._log_erfc(x) == pytest.approx(math.log(math.erfc(x)), rel=1e-12, abs=1e-15)


def test_log_erfc_stays_finite_beyond_underflow():
    assert math.erfc(40.0) == 0.0
    assert rdp._log_erfc(40.0) == pytest.approx(-1600 - math.log(40 * math.sqrt(math.pi)), rel=1e-6)


def test_rdp_to_epsilon_is_balle_conversion():
    alpha, r, delta = 8.0, 0.7, 1e-5
    expected = r + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
    assert rdp.rdp_to_epsilon([r, 50.0], [alpha, 2.0], delta) == pytest.approx(expected)


# ---- monotonicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon_fn", [acc.epsilon_prv, acc.epsilon_prv_add, acc.epsilon_rdp])
def test_epsilon_is_monotone(epsilon_fn):
    base = dict(sigma=1.0, q=0.01, steps=200, delta=1e-5)
    by_sigma = [epsilon_fn(**{**base, "sigma": s}) for s in (0.8, 1.0, 1.5)]
    by_steps = [epsilon_fn(**{**base, "steps": t}) for t in (100, 200, 400)]
    by_q = [epsilon_fn(**{**base, "q": q}) for q in (0.005, 0.01, 0.02)]
    assert by_sigma[0] > by_sigma[1] > by_sigma[2] > 0
    assert 0 < by_steps[0] < by_steps[1] < by_steps[2]
    assert 0 < by_q[0] < by_q[1] < by_q[2]


def test_rdp_is_never_below_prv_on_a_grid():
    for sigma in (0.8, 2.0):
        for q in (0.005, 0.05):
            eps_rdp = acc.epsilon_rdp(sigma, q, 200, 1e-5)
            assert eps_rdp >= acc.epsilon_prv_remove(sigma, q, 200, 1e-5)
            assert eps_rdp >= acc.epsilon_prv_add(sigma, q, 200, 1e-5)


def test_trivial_mechanisms():
    for epsilon_fn in (acc.epsilon_prv, acc.epsilon_prv_remove, acc.epsilon_prv_add, acc.epsilon_rdp):
        assert epsilon_fn(1.0, 0.0, 100, 1e-5) == 0.0
        assert epsilon_fn(1.0, 0.01, 0, 1e-5) == 0.0
        assert epsilon_fn(0.0, 0.01, 100, 1e-5) == math.inf


# ---- calibration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target, sigma_ref", CALIBRATION)
def test_calibrate_sigma_matches_reference_and_meets_target(target, sigma_ref):
    sigma = acc.calibrate_sigma(target, CAL_Q, CAL_STEPS, CAL_DELTA)
    assert abs(sigma - sigma_ref) <= 0.01
    assert acc.compute_epsilon(sigma, CAL_Q, CAL_STEPS, CAL_DELTA).epsilon <= target


def test_calibrate_sigma_refuses_targets_needing_huge_noise():
    with pytest.raises(UserError, match="sigma above 1000"):
        acc.calibrate_sigma(1e-6, 1.0, 1, 1e-5)


# ---- fallback to RDP ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["epsilon_prv_remove", "epsilon_prv_add"])
def test_fallback_to_rdp_when_prv_fails(monkeypatch, direction):
    def failing_prv(*args, **kwargs):
        raise RuntimeError("Discrete mean differs significantly from continuous mean")

    monkeypatch.setattr(acc, direction, failing_prv)
    with pytest.warns(RuntimeWarning, match="RDP"):
        result = acc.compute_epsilon(1.0, 0.01, 200, 1e-5)
    assert result.accountant == "rdp" and result.epsilon_prv is None
    assert result.epsilon_remove is None and result.epsilon_add is None
    assert result.epsilon == result.epsilon_rdp == acc.epsilon_rdp(1.0, 0.01, 200, 1e-5)
    assert "Discrete mean differs" in result.warning and "RDP" in result.warning


def test_fallback_when_prv_grid_would_exhaust_memory():
    with pytest.warns(RuntimeWarning, match="PRV grid"):
        result = acc.compute_epsilon(0.1, 0.05, 2000, 1e-5)
    assert result.accountant == "rdp" and result.epsilon > 1000


# ---- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, named", [
    (dict(epsilon=0.0), "epsilon = 0.0"),
    (dict(epsilon=-1.0), "epsilon = -1.0"),
    (dict(delta=0.0), "delta = 0.0"),
    (dict(delta=1.0), "delta = 1.0"),
    (dict(delta=1e-3, n=10000), "delta = 0.001"),
    (dict(q=0.0), "q = 0.0"),
    (dict(q=1.5), "q = 1.5"),
    (dict(steps=0), "steps = 0"),
    (dict(steps=2.5), "steps = 2.5"),
    (dict(sigma=-1.0), "sigma = -1.0"),
    (dict(sigma=math.inf), "sigma = inf"),
    (dict(q=math.nan), "q = nan"),
    (dict(steps=math.inf), "steps = inf"),
])
def test_validate_privacy_params_names_bad_value(kwargs, named):
    with pytest.raises(UserError) as info:
        acc.validate_privacy_params(**kwargs)
    assert named in str(info.value)


def test_delta_above_one_over_n_names_the_limit():
    with pytest.raises(UserError, match=r"below 1/N = 0\.0001"):
        acc.validate_privacy_params(delta=1e-3, n=10000)
    acc.validate_privacy_params(epsilon=8.0, delta=1e-5, q=0.01, steps=10, sigma=1.0, n=60000)


@pytest.mark.parametrize("call", [
    lambda: acc.compute_epsilon(-1.0, 0.01, 100, 1e-5),
    lambda: acc.compute_epsilon(1.0, 0.01, 0, 1e-5),
    lambda: acc.epsilon_prv(1.0, 1.5, 100, 1e-5),
    lambda: acc.epsilon_rdp(1.0, 0.01, 100, 0.0),
    lambda: acc.epsilon_rdp(1.0, 0.01, 100, 1e-5, orders=[0.5, 2.0]),
    lambda: acc.calibrate_sigma(0.0, 0.01, 100, 1e-5),
])
def test_public_functions_validate_inputs(call):
    with pytest.raises(UserError):
        call()


# ---- command line --------------------------------------------------------------------------------


def _number_after(label: str, text: str) -> float:
    return float(re.search(label + r" = ([0-9.]+)", text).group(1))


def test_cli_epsilon_mode(capsys):
    assert acc.main(["--sigma", "0.6", "--q", "0.01", "--steps", "1000", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    assert abs(_number_after("epsilon", out) - 7.434) <= 0.02
    assert "prv accountant" in out and "RDP cross-check 8.66" in out and "add/remove" in out
    remove, add = map(float, re.search(r"max of remove ([0-9.]+) and add ([0-9.]+)", out).groups())
    assert abs(remove - 7.444) <= 0.01 and abs(add - 3.188) <= 0.01


def test_cli_calibrate_mode(capsys):
    argv = ["--epsilon", "8", "--q", repr(CAL_Q), "--steps", str(CAL_STEPS), "--delta", "1e-5"]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert abs(_number_after("sigma", out) - 0.524) <= 0.01
    assert _number_after("epsilon", out) <= 8.0


def test_cli_json_has_every_input_and_output(capsys):
    argv = ["--sigma", "0.6", "--q", "0.01", "--steps", "1000", "--delta", "1e-5", "--n", "60000", "--json"]
    assert acc.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "account"
    assert (report["sigma"], report["q"], report["steps"], report["delta"]) == (0.6, 0.01, 1000, 1e-5)
    assert report["accountant"] == "prv" and report["warning"] is None
    assert report["epsilon"] == report["epsilon_prv"] == max(report["epsilon_remove"], report["epsilon_add"])
    assert abs(report["epsilon_add"] - 3.19) <= 0.01
    assert abs(report["epsilon"] - 7.434) <= 0.02 and abs(report["epsilon_rdp"] - 8.666) <= 0.02
    assert report["neighbouring_relation"] == acc.neighbouring_relation


def test_cli_json_calibrate(capsys):
    argv = ["--epsilon", "3", "--q", repr(CAL_Q), "--steps", str(CAL_STEPS), "--delta", "1e-5", "--json"]
    assert acc.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "calibrate" and report["target_epsilon"] == 3.0
    assert abs(report["sigma"] - 0.694) <= 0.01 and report["epsilon"] <= 3.0


@pytest.mark.parametrize("argv, named", [
    (["--sigma", "-1", "--q", "0.01", "--steps", "100", "--delta", "1e-5"], "sigma = -1.0"),
    (["--sigma", "1", "--q", "0.01", "--steps", "100", "--delta", "1e-3", "--n", "10000"], "1/N"),
])
def test_cli_bad_input_prints_one_error_line(capsys, argv, named):
    assert acc.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert captured.out == ""


def test_module_entry_point_exits_2_without_traceback():
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "dp.accountant",
            "--sigma", "1", "--q", "2", "--steps", "10", "--delta", "1e-5"]
    completed = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith("error: q = 2.0") and "Traceback" not in completed.stderr


@pytest.mark.parametrize("q,sigma", [(0.0, 1.0), (1.5, 1.0), (0.1, 0.0)])
def test_add_direction_prv_refuses_parameters_outside_its_domain_with_a_user_error(q, sigma):
    with pytest.raises(UserError, match="add-direction PRV needs 0 < q <= 1 and sigma > 0"):
        acc.SubsampledGaussianAddPRV(q, sigma)


# ---- command line in training terms: --n, --expected-batch, --epochs ---------------------------------------------

# (N, expected batch, epochs, T): epochs / q = 234.375, 83.33, 12.5 (Python's round: half to even, 12) and 16, the
# smoke preset; T = round(epochs / q) as dp/poisson.py `num_steps` rounds it for training.
TRAINING_TERMS = [(60000, 256, 1.0, 234), (1000, 30, 2.5, 83), (1000, 80, 1.0, 12), (256, 16, 1.0, 16)]


def _cli_json(capsys, argv):
    assert acc.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1  # one line
    return json.loads(out)


def _terms(n, batch, epochs, delta=1e-5):
    return ["--n", str(n), "--expected-batch", str(batch), "--epochs", repr(epochs), "--delta", repr(delta)]


@pytest.mark.parametrize("n, batch, epochs, steps", TRAINING_TERMS)
def test_cli_training_terms_give_privacy_plan_q_steps_sigma_and_epsilon(capsys, n, batch, epochs, steps):
    dp_cfg = make_config("smoke", dict(epsilon=3.0, delta=1e-5, expected_batch=batch, epochs=epochs)).dp
    q, planned_steps, sigma = privacy_plan(dp_cfg, n)  # what training would run
    assert planned_steps == steps
    calibrated = _cli_json(capsys, [*_terms(n, batch, epochs), "--epsilon", "3"])
    assert (calibrated["q"], calibrated["steps"], calibrated["sigma"]) == (q, steps, sigma)
    assert calibrated["epsilon"] == acc.compute_epsilon(sigma, q, steps, 1e-5).epsilon <= 3.0
    assert (calibrated["n"], calibrated["expected_batch"], calibrated["epochs"]) == (n, batch, epochs)
    accounted = _cli_json(capsys, [*_terms(n, batch, epochs), "--sigma", repr(sigma)])
    assert accounted == dict(calibrated, mode="account", target_epsilon=None)


def test_cli_training_terms_agree_with_a_smoke_run_privacy_report(pretrained, tmp_path, capsys):  # noqa: F811
    cfg, report = finetune(fresh_run(pretrained, tmp_path))  # 16 steps of the smoke preset, N = 256
    capsys.readouterr()  # the run's own lines
    terms = _terms(report["n_private"], report["expected_batch"], cfg.dp.epochs, report["delta"])
    calibrated = _cli_json(capsys, [*terms, "--epsilon", repr(cfg.dp.epsilon)])
    assert (calibrated["q"], calibrated["steps"], calibrated["sigma"]) == (report["q"], report["steps"],
                                                                          report["sigma"])
    accounted = _cli_json(capsys, [*terms, "--sigma", repr(report["sigma"])])
    assert (accounted["epsilon"], accounted["epsilon_rdp"]) == (report["epsilon"], report["epsilon_rdp_crosscheck"])
    assert (accounted["epsilon_remove"], accounted["epsilon_add"]) == (report["epsilon_remove"], report["epsilon_add"])


def test_cli_training_terms_in_words(capsys):
    assert acc.main([*_terms(60000, 256, 1.0), "--sigma", "0.4037"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    assert "N = 60000, expected batch 256, 1 epochs: q = 0.00426667, 234 steps = round(epochs / q)" in out
    assert abs(_number_after("epsilon", out) - 9.69) <= 0.01  # the quick preset's DP run (README)


@pytest.mark.parametrize("argv, named", [
    (["--q", "0.01", "--epochs", "1", "--n", "1000"], "--q cannot be combined with --epochs"),
    (["--steps", "10", "--expected-batch", "8", "--n", "1000"], "--steps cannot be combined with --expected-batch"),
    (["--q", "0.01", "--steps", "10", "--expected-batch", "8", "--epochs", "1", "--n", "1000"],
     "--q and --steps cannot be combined with --expected-batch and --epochs"),
    (["--expected-batch", "8", "--epochs", "1"], "--n missing"),
    (["--n", "1000", "--epochs", "1"], "--expected-batch missing"),
    (["--n", "1000", "--expected-batch", "8"], "--epochs missing"),
    (["--q", "0.01"], "--steps missing"),
    ([], "--q and --steps missing"),
    (["--n", "1000", "--expected-batch", "2000", "--epochs", "1"], "--expected-batch 2000 must lie in [1, N = 1000]"),
    (["--n", "1000", "--expected-batch", "8", "--epochs", "0"], "--epochs must be a positive number"),
    (["--n", "0", "--expected-batch", "8", "--epochs", "1"], "n = 0 is not allowed"),
])
def test_cli_mixed_or_incomplete_mechanism_is_one_error_line(capsys, argv, named):
    assert acc.main([*argv, "--sigma", "1", "--delta", "1e-5", "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert captured.out == ""


def test_module_entry_point_in_training_terms_prints_one_json_line():
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "dp.accountant", *_terms(60000, 256, 1.0), "--sigma", "0.4037", "--json"]
    completed = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stderr == ""
    assert completed.stdout.endswith("\n") and completed.stdout.count("\n") == 1
    report = json.loads(completed.stdout)
    assert (report["q"], report["steps"], report["sigma"]) == (256 / 60000, 234, 0.4037)
    assert abs(report["epsilon"] - 9.69) <= 0.01
