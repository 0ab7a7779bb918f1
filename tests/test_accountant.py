"""Tests for dp/accountant.py: pinned public figures, independent numerical checks, the CLI.

Reference figures come from /work/shared/FACTS.md (public accountants), not from this code.
PRV calls cost about a second each; the module memoises them, so repeated parameters are free.
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

from dp import accountant as acc
from ldm.errors import UserError

# (sigma, q, steps, delta, PRV estimate, RDP epsilon), FACTS.md "Privacy accounting numbers".
REFERENCE = [
    (1.0, 256 / 60000, 2340, 1e-5, 1.099, 1.352),
    (0.6, 0.01, 1000, 1e-5, 7.434, 8.666),
    (2.0, 0.001, 100000, 1e-6, 0.697, 0.753),
    (5.0, 0.1, 500, 1e-5, 1.806, 1.969),
]
# (target epsilon, sigma) for q = 256/60000, steps = 2343, delta = 1e-5, FACTS.md "Calibration".
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
    assert exact <= eps_rdp <= 1.15 * exact


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
    log_a = (alpha - 1) * acc._rdp_one_step(q, sigma, alpha)
    assert log_a == pytest.approx(_log_a_by_quadrature(q, sigma, alpha), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("alpha", [2, 3, 6])
def test_fractional_series_agrees_with_integer_formula_at_integers(alpha):
    q, sigma = 0.05, 0.8
    exact = acc._log_a_integer(q, sigma, alpha)
    for nearby in (alpha - 1e-9, alpha + 1e-9):
        assert acc._log_a_fractional(q, sigma, nearby) == pytest.approx(exact, rel=1e-6)


def test_rdp_special_cases_follow_closed_forms():
    assert acc._rdp_one_step(1.0, 2.0, 5.0) == pytest.approx(5.0 / 8.0)  # Gaussian: alpha / (2 s^2)
    assert acc._rdp_one_step(0.0, 2.0, 5.0) == 0.0
    assert acc._rdp_one_step(0.1, 0.0, 5.0) == math.inf


@pytest.mark.parametrize("x", [-3.0, 0.0, 4.0, 24.9, 25.0, 25.5, 26.0, 26.5])
def test_log_erfc_matches_math_erfc_where_representable(x):
    assert acc._log_erfc(x) == pytest.approx(math.log(math.erfc(x)), rel=1e-12, abs=1e-15)


def test_log_erfc_stays_finite_beyond_underflow():
    assert math.erfc(40.0) == 0.0
    assert acc._log_erfc(40.0) == pytest.approx(-1600 - math.log(40 * math.sqrt(math.pi)), rel=1e-6)


def test_rdp_to_epsilon_is_balle_conversion():
    alpha, rdp, delta = 8.0, 0.7, 1e-5
    expected = rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
    assert acc._rdp_to_epsilon([rdp, 50.0], [alpha, 2.0], delta) == pytest.approx(expected)


# ---- monotonicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon_fn", [acc.epsilon_prv, acc.epsilon_rdp])
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
            assert acc.epsilon_rdp(sigma, q, 200, 1e-5) >= acc.epsilon_prv(sigma, q, 200, 1e-5)


def test_trivial_mechanisms():
    for epsilon_fn in (acc.epsilon_prv, acc.epsilon_rdp):
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


def test_fallback_to_rdp_when_prv_fails(monkeypatch):
    def failing_prv(*args, **kwargs):
        raise RuntimeError("Discrete mean differs significantly from continuous mean")

    monkeypatch.setattr(acc, "epsilon_prv", failing_prv)
    with pytest.warns(RuntimeWarning, match="RDP"):
        result = acc.compute_epsilon(1.0, 0.01, 200, 1e-5)
    assert result.accountant == "rdp" and result.epsilon_prv is None
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
    assert report["epsilon"] == report["epsilon_prv"]
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
