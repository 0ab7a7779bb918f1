"""The synthetic labelled data set under evaluation: loaded from the .npz that `sample.py` writes, checked, split.

The file holds uint8 images `x` (N, H, W) or (N, H, W, C) at the experiment's size and channels and integer
labels `y` (N,); nothing else in it is read. Every way it can be wrong is one UserError that says what was
expected. `split_synthetic` draws the synthetic training and validation splits of the downstream protocol
(`metrics/classifiers.py`) from a seeded public generator.
"""

import os

import numpy as np
import torch

from ldm.data import ImageSet
from ldm.errors import UserError


def load_synthetic(path, real):
    """The .npz at `path` as an ImageSet with x: (N, C, H, W) uint8, checked against the real set `real`.

    Refused with a UserError: a missing file, no `x` or `y`, x not uint8 of shape (N, H, W) / (N, H, W, C)
    with the real set's size and channels, labels not integers 0..K-1 of length N, a class of the real
    test set absent from the synthetic labels.
    """
    if not os.path.isfile(path):
        raise UserError(f"--synthetic {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear message
        raise UserError(f"--synthetic {path} is not a readable .npz file ({type(e).__name__})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UserError(f"--synthetic {path} has no {' or '.join(missing)} (found {', '.join(arrays) or 'nothing'}); "
                        f"it needs uint8 images x and integer labels y, as sample.py writes them")
    x, y = arrays["x"], arrays["y"]
    _, c, s, _ = real.x.shape
    want = f"(N, {s}, {s})" if c == 1 else f"(N, {s}, {s}, {c})"
    if x.dtype != np.uint8:
        raise UserError(f"--synthetic {path}: x must be uint8 images (0..255), got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (s, s, c):
        raise UserError(f"--synthetic {path}: x has shape {arrays['x'].shape}, but the real set {real.name!r} at "
                        f"the experiment size has {c} channel(s) of {s}x{s}: expected {want}")
    k = real.num_classes
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"--synthetic {path}: y must be {len(x)} integer labels (one per image), "
                        f"got {y.dtype} of shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise UserError(f"--synthetic {path}: labels must lie in 0..{k - 1} for {real.name}, "
                        f"found {int(y.min())}..{int(y.max())}")
    absent = sorted(set(real.y.unique().tolist()) - set(np.unique(y).tolist()))
    if absent:
        raise UserError(f"--synthetic {path}: class(es) {', '.join(map(str, absent))} of {real.name} have no "
                        f"synthetic images; sample every class (sample.py does by default)")
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ImageSet("synthetic", x, torch.from_numpy(y.astype(np.int64)), k)


def split_synthetic(synth, n_train, n_val, seed):
    """A random (train, val) split of the synthetic set: val n_val images, train n_train (default min(50k, N - n_val))."""
    n = len(synth)
    if n < 2 * n_val:
        raise UserError(f"the synthetic set has {n} images; --n-val {n_val} needs at least {2 * n_val} "
                        f"(2 x --n-val); sample more images or pass a smaller --n-val")
    n_train = min(50000, n - n_val) if n_train is None else n_train
    if n_train > n - n_val:
        raise UserError(f"--n-train {n_train} + --n-val {n_val} exceed the {n} synthetic images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:n_val + n_train]
    return (synth.x[train], synth.y[train]), (synth.x[val], synth.y[val])
