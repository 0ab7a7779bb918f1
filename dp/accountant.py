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

from dp.poisson import num_steps, sampling_rate
from dp.prv_add import SubsampledGaussianAddPRV, add_direction_composition  # noqa: F401 - the add direction
from dp.rdp import DEFAULT_ORDERS, rdp_one_step, rdp_to_epsilon
from ldm.errors import UserError

neighbouring_relation = "add/remove one example"

PRV_EPS_ERROR = 0.01  # prv-accountant discretisation error in epsilon (added to the estimate)
PRV_DELTA_ERROR_FRACTION = 1e-3  # prv-accountant delta error, as a fraction of delta
PRV_MAX_GRID_POINTS = 5_000_000  # larger PRV grids (about 1.7 GB) fall back to RDP
SIGMA_MAX = 1000.0  # calibration refuses targets that would need more noise than this
_SECANT_ROUNDS = 6  # model-guided calibration rounds before plain bisection
_MAX_CALIBRATION_ROUNDS = 100  # bisection from [0, 1000] reaches tol 1e-6 long before this


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


# ---- RDP (the math is in dp/rdp.py) -------------------------------------------------------


def epsilon_rdp(sigma: float, q: float, steps: int, delta: float,
                orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """(eps, delta) of `steps` SGM steps by RDP: this module's own, looser, bound.

    RDP composes additively (Mironov 2017, Proposition 1): steps * `rdp_one_step` at each
    order, then `rdp_to_epsilon` (dp/rdp.py).

    Guarantees: a valid upper bound on epsilon for add/remove-one neighbours under Poisson
    sampling with rate q, for every order list (more orders only tighten it). Not covered:
    replace-one neighbours, other sampling schemes.
    """
    _validate_mechanism(sigma, q, steps, delta)
    if any(not isinstance(a, numbers.Real) or not a > 1 for a in orders):
        raise UserError(f"orders = {list(orders)!r} is not allowed: every Renyi order must be > 1.")
    if steps == 0 or q == 0:
        return 0.0
    rdp = [steps * rdp_one_step(q, sigma, alpha) for alpha in orders]
    return rdp_to_epsilon(rdp, orders, delta)


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
        description="Epsilon of DP-SGD (Poisson sampling, Gaussian noise, add/remove-one neighbours) for a noise "
                    "multiplier, or the noise multiplier for a target epsilon. The mechanism: --q and --steps, or "
                    "training terms --n, --expected-batch, --epochs, turned into q = expected_batch / N and "
                    "T = round(epochs / q) by the functions training uses (dp/poisson.py).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sigma", type=float, help="noise multiplier: print the epsilon it gives")
    mode.add_argument("--epsilon", type=float, help="target epsilon: print the calibrated sigma")
    parser.add_argument("--q", type=float, default=None, help="sampling rate = expected batch / N")
    parser.add_argument("--steps", type=int, default=None, help="number of DP-SGD steps")
    parser.add_argument("--expected-batch", type=int, default=None,
                        help="training terms: expected Poisson batch size q N (needs --n and --epochs)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="training terms: epochs, T = round(epochs / q) steps (needs --n and --expected-batch)")
    parser.add_argument("--delta", type=float, required=True, help="target delta")
    parser.add_argument("--n", type=int, default=None,
                        help="private set size N: checks delta < 1/N; with --expected-batch and --epochs, gives q")
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    return parser


def _flags(args: argparse.Namespace, flags: Sequence[str], given: bool) -> list:
    """The flags among `flags` that were given (given=True) or left out (given=False)."""
    return [f for f in flags if (getattr(args, f[2:].replace("-", "_")) is not None) == given]


def _mechanism(args: argparse.Namespace):
    """(q, steps) from --q/--steps, or from --n/--expected-batch/--epochs exactly as training derives them.

    Training terms go through `dp.poisson.sampling_rate` and `dp.poisson.num_steps`, the functions
    dp/finetune.py's `privacy_plan` uses, so the rounding of T = round(epochs / q) is training's.
    """
    direct, training = _flags(args, ("--q", "--steps"), True), _flags(args, ("--expected-batch", "--epochs"), True)
    either = "give either --q and --steps, or --n, --expected-batch and --epochs (training terms)"
    if direct and training:
        raise UserError(f"{' and '.join(direct)} cannot be combined with {' and '.join(training)}: {either}.")
    if not training:
        if len(direct) < 2:
            raise UserError(f"{either}; {' and '.join(_flags(args, ('--q', '--steps'), False))} missing.")
        return args.q, args.steps
    missing = _flags(args, ("--n", "--expected-batch", "--epochs"), False)
    if missing:
        raise UserError(f"{either}; training terms need --n, --expected-batch and --epochs, "
                        f"{' and '.join(missing)} missing.")
    validate_privacy_params(n=args.n)
    q = sampling_rate(args.expected_batch, args.n)
    return q, num_steps(args.epochs, q)


def _report(args: argparse.Namespace) -> dict:
    """Run the requested computation; return every input and output as one flat dict."""
    q, steps = _mechanism(args)
    validate_privacy_params(epsilon=args.epsilon, delta=args.delta, q=q, steps=steps,
                            sigma=args.sigma, n=args.n)
    mode = "calibrate" if args.epsilon is not None else "account"
    if mode == "account":
        sigma = args.sigma
    else:
        sigma = calibrate_sigma(args.epsilon, q, steps, args.delta)
    with warnings.catch_warnings():  # a fallback is printed once, as the "warning:" line of `main`
        warnings.filterwarnings("ignore", message="prv-accountant failed", category=RuntimeWarning)
        result = compute_epsilon(sigma, q, steps, args.delta)
    return {"mode": mode, "target_epsilon": args.epsilon, "sigma": sigma, "q": q,
            "steps": steps, "delta": args.delta, "n": args.n, "expected_batch": args.expected_batch,
            "epochs": args.epochs, **dataclasses.asdict(result),
            "neighbouring_relation": neighbouring_relation, "sampling": "Poisson"}


def _human_line(report: dict) -> str:
    mechanism = f"q = {report['q']:g}, {report['steps']} steps"
    if report["epochs"] is not None:  # training terms
        mechanism = (f"N = {report['n']}, expected batch {report['expected_batch']}, {report['epochs']:g} epochs: "
                     f"q = {report['q']:g}, {report['steps']} steps = round(epochs / q)")
    setting = f"{mechanism}, delta = {report['delta']:g}, Poisson sampling, {neighbouring_relation} neighbours"
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
