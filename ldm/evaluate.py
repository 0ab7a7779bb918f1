"""Evaluate a synthetic labelled data set: downstream accuracy, a digit-classifier Frechet distance, FID.

    python -m ldm.evaluate --synthetic synth.npz --real mnist --data-root ../shared/data
    python -m ldm.evaluate --synthetic synth.npz --real mnist --data-root DIR \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out eval.json

`synth.npz` is what `sample.py --out synth.npz` writes: uint8 `x` (N, H, W) or (N, H, W, C) at the
experiment's size and channels, int64 labels `y` (N,). Prints one JSON object on stdout; progress on stderr.

Downstream accuracy (the protocol of DPDM, see FACTS.md): each classifier is trained only on a synthetic
training split (default 50k), its epoch is chosen by accuracy on a held-out synthetic validation split
(default 10k), and only then is it run once on the real test set. Nothing is selected on the real test set.

Frechet distances, both between Gaussians fitted to features of the real test set and of all synthetic images:
- `fd_digit_classifier`: features from the penultimate layer of a small CNN trained on the real training
  set, cached as `<cache-dir>/eval/feature_cnn_<set>_<size>px_<channels>ch.pt` (never under --data-root, which
  may be read-only). It works offline but it is NOT FID: its values are comparable only with each other
  (same cache file), never with published FIDs.
- `fid`: pool3 features of the FID Inception network (`ldm/inception.py`), only with `--inception-weights`.
  Slow on a CPU (hours for 70k images at 299x299); use a GPU.

Privacy: this command reads the real (private) training and test sets. Like evaluation in the literature it is
outside the DP guarantee: its numbers are for the report, not private releases.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from ldm import classifiers
from ldm.checkpoint import atomic_write_bytes, atomic_write_json
from ldm.config import make_config
from ldm.data import REGISTRY, ImageSet, experiment_channels, load_dataset, to_unit_range
from ldm.errors import UserError
from ldm.inception import FID_WEIGHTS_NAME, fid_feature_batches, load_fid_inception
from ldm.runtime import pick_device

FEATURE_FORMAT = "dp-ldm-feature-cnn-v1"
PROTOCOL = ("classifiers trained only on the synthetic training split; epoch chosen by accuracy on the held-out "
            "synthetic validation split; the real test set is used once per classifier, after selection (DPDM protocol)")
FD_NOTE = ("Frechet distance on penultimate-layer features of a small CNN trained on the real training set: "
           "NOT FID, not comparable with published FID values")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ldm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", required=True, help=".npz with uint8 x and int64 y, as written by sample.py")
    p.add_argument("--real", default="mnist", help="real data set whose test split is the reference (default mnist)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--image-size", type=int, default=32, help="experiment image size (default 32)")
    p.add_argument("--channels", type=int, default=0, help="experiment channels (0: the real set's own)")
    p.add_argument("--n-train", type=int, default=None, help="synthetic training split (default min(50000, N - n_val))")
    p.add_argument("--n-val", type=int, default=10000, help="synthetic validation split for epoch selection")
    p.add_argument("--classifiers", default="cnn,mlp,logreg", help="comma-separated from cnn,mlp,logreg, or none")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seeds the train/val split and the classifiers")
    p.add_argument("--no-fd", action="store_true", help="skip the digit-classifier Frechet distance")
    p.add_argument("--cache-dir", default=None, help="derived files; the feature CNN goes to <cache-dir>/eval/ "
                   "(default: the project's ./data/cache)")
    p.add_argument("--inception-weights", default=None, help=f"pytorch-fid's {FID_WEIGHTS_NAME}, for FID")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, help="also write the JSON object to this file (atomically)")
    return p.parse_args(argv)


def check_args(args):
    for name in ("n_val", "epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.n_train is not None and args.n_train < 1:
        raise UserError(f"--n-train must be a positive integer, got {args.n_train}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    names = [] if args.classifiers.strip() == "none" else [c.strip() for c in args.classifiers.split(",") if c.strip()]
    bad = [c for c in names if c not in classifiers.CLASSIFIERS]
    if bad or len(set(names)) != len(names):
        raise UserError(f"--classifiers {args.classifiers!r}: choose distinct names from "
                        f"{', '.join(classifiers.CLASSIFIERS)}, or none")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --out {args.out}: folder {folder} does not exist or is not writable")
    return names


def real_data_config(args):
    """The data configuration that brings `args.real` to the experiment's size and channels (validated)."""
    if args.real not in REGISTRY:
        raise UserError(f"unknown --real data set {args.real!r}; valid sets: {', '.join(REGISTRY)}")
    return make_config("quick", {"public": args.real, "private": args.real, "data_root": args.data_root,
                                 "cache_dir": args.cache_dir, "image_size": args.image_size,
                                 "channels": args.channels}).data


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


def downstream_accuracy(names, train, val, test, args, device):
    """{name: {test_accuracy, val_accuracy_synthetic, epoch, ...}}: select on `val` (synthetic), then test once."""
    results = {}
    c, s = test.x.shape[1], test.x.shape[-1]
    for name in names:
        start = time.time()
        model = classifiers.build_classifier(name, c, s, test.num_classes, args.seed).to(device)
        model, sel = classifiers.train_and_select(model, *train, *val, args.epochs, args.batch_size, args.lr,
                                                  args.seed, desc=name)
        test_acc = classifiers.accuracy(model, test.x, test.y)  # the only use of the real test set
        results[name] = {"test_accuracy": test_acc, "val_accuracy_synthetic": sel.val_accuracy, "epoch": sel.epoch,
                         "epochs_trained": args.epochs, "val_history_synthetic": list(sel.val_history),
                         "seconds": round(time.time() - start, 1)}
    return results


def feature_cache_path(data_cfg):
    c = experiment_channels(data_cfg)
    return os.path.join(data_cfg.cache_dir, "eval", f"feature_cnn_{data_cfg.private}_{data_cfg.image_size}px_{c}ch.pt")


def _check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:
        raise UserError(f"cannot write the feature network cache folder {folder}; pass --cache-dir "
                        f"or --no-fd") from None


def feature_network(data_cfg, device, recipe=classifiers.FeatureRecipe()):
    """The digit feature CNN for the real set `data_cfg.private`: loaded from its cache or trained and cached.

    Trained on the real training split by `recipe` (fixed, seeded) so that distances from repeated evaluations
    are comparable; the cache records the recipe and is retrained when it differs. Returns (model, info).
    """
    path = feature_cache_path(data_cfg)
    c = experiment_channels(data_cfg)
    identity = {"real": data_cfg.private, "image_size": data_cfg.image_size, "channels": c,
                "num_classes": REGISTRY[data_cfg.private].num_classes, "recipe": asdict(recipe)}
    model = classifiers.build_classifier("cnn", c, data_cfg.image_size, identity["num_classes"], recipe.seed)
    if os.path.exists(path):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"feature network cache {path} is corrupt ({type(e).__name__}); delete it to retrain") from None
        if isinstance(payload, dict) and payload.get("format") == FEATURE_FORMAT and payload.get("identity") == identity:
            try:
                model.load_state_dict(payload["state"], strict=True)
            except RuntimeError as e:
                raise UserError(f"feature network cache {path} does not fit the network ({' '.join(str(e).split())[:200]}); "
                                f"delete it to retrain") from None
            return model.to(device).eval(), {"cache": path, "train_accuracy": payload["train_accuracy"], "trained_now": False}
        print(f"feature network cache {path} was made with another recipe; retraining it", file=sys.stderr)
    _check_writable(os.path.dirname(path))
    train = load_dataset(data_cfg.private, data_cfg, "private", split="train")
    model, train_acc = classifiers.train_feature_cnn(train.x, train.y, identity["num_classes"], recipe, device)
    payload = {"format": FEATURE_FORMAT, "identity": identity, "train_accuracy": train_acc,
               "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return model, {"cache": path, "train_accuracy": train_acc, "trained_now": True}


@torch.no_grad()
def cnn_feature_batches(model, x, batch=1000, desc="cnn features"):
    """Penultimate-layer features of uint8 images `x: (N, C, H, W)`, yielded as (B, hidden) float32 CPU tensors."""
    model.eval()
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch", leave=False):
        yield model.features(to_unit_range(x[i:i + batch]).to(device)).float().cpu()


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
    return frechet_distance(*feature_stats(batches_real), *feature_stats(batches_synth))


def run(argv=None):
    """Validate every input, then: downstream accuracy, digit-classifier Frechet distance, FID.

    Returns the JSON dict, also written to --out when given.
    """
    args = parse_args(argv)
    names = check_args(args)
    device = pick_device(args.device)
    data_cfg = real_data_config(args)
    test = load_dataset(args.real, data_cfg, "private", split="test")
    if names and test.num_classes < 2:
        raise UserError(f"{args.real} has no class labels, so downstream accuracy is undefined; pass --classifiers none")
    synth = load_synthetic(args.synthetic, test)
    train, val = split_synthetic(synth, args.n_train, args.n_val, args.seed)
    inception = load_fid_inception(args.inception_weights).to(device) if args.inception_weights else None
    if not args.no_fd and not os.path.exists(feature_cache_path(data_cfg)):
        _check_writable(os.path.dirname(feature_cache_path(data_cfg)))  # before any training, not after it

    accuracy = downstream_accuracy(names, train, val, test, args, device)
    fd = None
    if not args.no_fd:
        net, info = feature_network(data_cfg, device)
        value = frechet_between(cnn_feature_batches(net, test.x, desc="features: real test"),
                                cnn_feature_batches(net, synth.x, desc="features: synthetic"))
        fd = {"value": value, "note": FD_NOTE, "n_real": len(test), "n_synthetic": len(synth),
              "reference": f"{args.real} test split", "feature_cnn": info}
    fid = None
    if inception is not None:
        value = frechet_between(fid_feature_batches(inception, test.x, desc="inception: real test"),
                                fid_feature_batches(inception, synth.x, desc="inception: synthetic"))
        fid = {"value": value, "weights": os.path.abspath(args.inception_weights), "n_real": len(test),
               "n_synthetic": len(synth), "reference": f"{args.real} test split",
               "note": f"pytorch-fid's Inception features of {data_cfg.image_size}x{data_cfg.image_size} images "
                       "resized to 299; published values may use another reference split, size or sample count"}
    result = {
        "synthetic_file": os.path.abspath(args.synthetic), "n_synthetic": len(synth),
        "n_train": len(train[0]), "n_val": len(val[0]),
        "real_set": args.real, "n_real_test": len(test),
        "image_size": data_cfg.image_size, "channels": int(test.x.shape[1]),
        "accuracy": accuracy, "fd_digit_classifier": fd, "fid": fid,
        "seeds": {"split": args.seed, "classifiers": args.seed,
                  "feature_cnn": classifiers.FeatureRecipe().seed},
        "device": str(device), "protocol": PROTOCOL,
        "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                     "classifiers": names},
    }
    if args.out:
        atomic_write_json(args.out, result)
    return result


def main(argv=None):
    try:
        result = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
