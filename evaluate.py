"""Evaluate a synthetic labelled data set: downstream accuracy, a digit-classifier Frechet distance, FID.

    python evaluate.py --synthetic synth.npz --real mnist --data-root ../shared/data
    python evaluate.py --synthetic synth.npz --real mnist --data-root DIR \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out eval.json

`synth.npz` is what `sample.py --out synth.npz` writes: uint8 `x` (N, H, W) or (N, H, W, C) at the
experiment's size and channels, int64 labels `y` (N,). Prints one JSON object on stdout; progress on stderr.

Downstream accuracy (the protocol of DPDM, Dockhorn et al. 2023, "Differentially Private Diffusion Models";
`metrics/classifiers.py`): each classifier is trained only on a synthetic training split (default 50k), its
epoch is chosen by accuracy on a held-out synthetic validation split (default 10k), and only then is it run
once on the real test set. Nothing is selected on the real test set.

Frechet distances (`metrics/frechet.py`), both between Gaussians fitted to features of the real test set and of
all synthetic images:
- `fd_digit_classifier`: features from the penultimate layer of a small CNN trained on the real training
  set (`metrics/feature_cnn.py`), cached as `<cache-dir>/eval/feature_cnn_<set>_<size>px_<channels>ch.pt` (never
  under --data-root, which may be read-only). It works offline but it is NOT FID: its values are comparable only
  with each other (same cache file), never with published FIDs.
- `fid`: pool3 features of the FID Inception network (`metrics/inception.py`), only with `--inception-weights`.
  Slow on a CPU (hours for 70k images at 299x299); use a GPU.

Privacy: this command reads the real (private) training and test sets. Like evaluation in the literature it is
outside the DP guarantee: its numbers are for the report, not private releases.
"""

import argparse
import json
import os
import sys

from ldm.checkpoint import atomic_write_json
from ldm.config import DataConfig
from ldm.data import REGISTRY, load_dataset
from ldm.distributed import pick_device
from ldm.errors import UserError
from metrics import classifiers
from metrics.feature_cnn import FD_NOTE, check_writable, cnn_feature_batches, feature_cache_path, feature_network
from metrics.frechet import frechet_between
from metrics.inception import FID_WEIGHTS_NAME, fid_feature_batches, load_fid_inception
from metrics.synthetic import load_synthetic, split_synthetic


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__,
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
    """Refuse bad flags before any data is read; returns the classifier names to train."""
    for name in ("n_val", "epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.n_train is not None and args.n_train < 1:
        raise UserError(f"--n-train must be a positive integer, got {args.n_train}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.image_size < 4:
        raise UserError(f"--image-size must be at least 4 (the CNNs pool twice by 2), got {args.image_size}")
    if args.channels not in (0, 1, 3):
        raise UserError(f"--channels must be 0 (automatic), 1 or 3, got {args.channels}")
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
    """The data configuration that brings `args.real` to the experiment's size and channels.

    Built directly, not from a training preset: the real set is both public and private (so that its own
    channel count is the default), read from --data-root, with derived files under --cache-dir.
    """
    if args.real not in REGISTRY:
        raise UserError(f"unknown --real data set {args.real!r}; valid sets: {', '.join(REGISTRY)}")
    return DataConfig(public=args.real, private=args.real, data_root=args.data_root,
                      cache_dir=args.cache_dir or DataConfig.cache_dir, image_size=args.image_size,
                      channels=args.channels)


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
        check_writable(os.path.dirname(feature_cache_path(data_cfg)))  # before any training, not after it

    accuracy = classifiers.downstream_accuracy(names, train, val, test, args.epochs, args.batch_size, args.lr,
                                               args.seed, device)
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
        "device": str(device), "protocol": classifiers.PROTOCOL,
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
