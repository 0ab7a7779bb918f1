"""The Frechet distance between Gaussians fitted to two sets of features: the formula of FID.

`feature_stats` fits a Gaussian (mean, covariance) to features streamed in batches, in float64;
`frechet_distance` is the squared Frechet distance between two such Gaussians, with a matrix square root
that stays real and stable when the covariance product is singular. Which features are used (the digit
feature CNN of `metrics/feature_cnn.py`, the FID Inception of `metrics/inception.py`) is the caller's choice.
"""

import numpy as np
import torch

from ldm.errors import UserError


def feature_stats(batches):
    """Mean (D,) and unbiased covariance (D, D) in float64 of feature rows streamed as (B, D) tensors.

    Sums are taken of (f - shift), shift = the first batch's mean, so that a large mean does not cancel digits.
    """
    n, shift, total, outer = 0, None, None, None
    for f in batches:
        f = f.double()
        if shift is None:
            shift = f.mean(0)
            total, outer = torch.zeros_like(shift), torch.zeros(len(shift), len(shift), dtype=torch.float64)
        d = f - shift
        n += len(f)
        total += d.sum(0)
        outer += d.T @ d
    if n < 2:
        raise UserError(f"need at least 2 images for feature statistics, got {n}")
    mean_d = total / n
    cov = (outer - n * torch.outer(mean_d, mean_d)) / (n - 1)
    return (shift + mean_d).numpy(), cov.numpy()


def _sqrt_eigenvalues(w):
    """sqrt of the eigenvalues `w` of a symmetric PSD matrix. Eigenvalues below the float64 rounding floor
    (d * eps * max) are set to 0: they are noise, and sqrt would magnify them (1e-17 -> 3e-9 each)."""
    floor = len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0)
    return np.sqrt(np.where(w > floor, w, 0.0))


def _sqrt_psd(s):
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * _sqrt_eigenvalues(w)) @ v.T


def _trace_sqrt_product(s1, s2):
    """tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)), M = S1^(1/2) S2 S1^(1/2) symmetric PSD, similar to S1 S2."""
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    if w.min() < -1e-6 * max(w.max(), 1e-300):
        raise ValueError(f"covariance is not positive semi-definite (eigenvalue {w.min():.3g} of S1^1/2 S2 S1^1/2)")
    return float(_sqrt_eigenvalues(w).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Dowson and Landau 1982; FID, Heusel et al.
    2017). The trace of the matrix square root is computed from the symmetric form S1^(1/2) S2 S1^(1/2), which
    has the same eigenvalues as S1 S2 and stays real and stable when S1 S2 is singular. If the eigensolver
    fails, eps * I is added to both covariances, as pytorch-fid does for a singular product.
    mu: (D,), sigma: (D, D).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1)
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("Frechet distance of non-finite statistics")
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        offset = eps * np.eye(d)
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_between(batches_real, batches_synth):
    """frechet_distance between Gaussians fitted (`feature_stats`) to two streams of (B, D) feature batches."""
    return frechet_distance(*feature_stats(batches_real), *feature_stats(batches_synth))
