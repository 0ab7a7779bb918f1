"""Poisson subsampling (the sampling the accountant assumes): the rate q and the number of steps T.

The sample itself is drawn from the run's secret by dp/randomness.py (`poisson_sample`).

At every logical step each of the N private examples is included independently with probability q.
The realised batch size is random; an empty sample is still a step (noise only). Batches are never
resampled, padded or truncated, and the number of steps is fixed before training.
"""

import math

from ldm.errors import UserError


def sampling_rate(expected_batch, n):
    """q = expected_batch / N, refused unless 1 <= expected_batch <= N."""
    if n < 1:
        raise UserError("the private data set is empty")
    if not 1 <= expected_batch <= n:
        raise UserError(f"--expected-batch {expected_batch} must lie in [1, N = {n}] (N: private examples)")
    return expected_batch / n


def num_steps(epochs, q):
    """Logical steps T = round(epochs / q) (at least 1): fixed before training, used by the accountant."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise UserError(f"--epochs must be a positive number, got {epochs}")
    return max(1, round(epochs / q))
