"""Evaluate a synthetic labelled data set: downstream accuracy, a digit-classifier Frechet distance, FID.

    python evaluate.py --synthetic synth.npz --real mnist --data-root ../shared/data
    python -m ldm.evaluate --synthetic synth.npz --real mnist --data-root ../shared/data     # the same command
    python evaluate.py --synthetic synth/ --real mnist --data-root DIR \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --fid-reference train --out eval.json

`--synthetic` is an `.npz` with images `x` and labels `y` (or `labels`), as `sample.py --out synth.npz` writes it,
or a folder of PNGs in ImageFolder layout, as `sample.py --out synth/` writes it. `x` may be (N, H, W),
(N, C, H, W) or (N, H, W, C), uint8 or float in [0, 1] or [-1, 1], at any square size: `metrics/synthetic.py`
states how layout and value range are decided, and what is refused. Prints one JSON object, on one line, on
stdout; progress on stderr.

Evaluation size (`--eval-size`; default the real set's native side: 28 for mnist and emnist-letters, 32 for svhn,
cifar10 and imagenet32, and 32 for the sets without one: celeba, synthdigits, synthsvhn, fake). The real images are
loaded at that size by ldm/data.py (MNIST at 28 is the original digits, untouched); the synthetic images are brought
to it by one rule (larger ones by the least-squares inverse of ldm/data.py's resize, smaller ones by that resize:
`metrics/synthetic.py`). So this project's 32x32 samples are evaluated at 28x28 for MNIST, as DPDM and DPImageBench
evaluate MNIST. `--eval-size 32` evaluates as earlier versions did, at the experiment's size.

Downstream accuracy (the protocol of DPDM, Dockhorn et al. 2023, "Differentially Private Diffusion Models";
`metrics/classifiers.py`): each classifier is trained only on a synthetic training split (default 50k), its
epoch is chosen by accuracy on a held-out synthetic validation split (default 10k), and only then is it run
once on the real test set. Nothing is selected on the real test set.

Tuning (`--real-split tune --tune-holdout K`): to choose a run's settings without the test set, train the private
stage with `--tune-holdout K`, which keeps the last K images of the private training split out of the private set,
and score on exactly those K images instead of the test split. They are tuning data outside the guarantee (the
privacy report says so); report numbers only on the test split, once per row. (The digit-classifier network of
`fd_digit_classifier` was trained on the whole training split, tuning images included: use --no-fd when tuning.)

Frechet distances (`metrics/frechet.py`), between Gaussians fitted to features of a real split and of all
synthetic images:
- `fd_digit_classifier`: features from the penultimate layer of a small CNN trained on the real training
  set (`metrics/feature_cnn.py`), cached as `<cache-dir>/eval/feature_cnn_<set>_<size>px_<channels>ch.pt` (never
  under --data-root, which may be read-only). Reference: always the real test split (the network was trained on
  the training split). It works offline but it is NOT FID: its values are comparable only with each other (same
  cache file), never with published FIDs.
- `fid`: pool3 features of the FID Inception network (`metrics/inception.py`), only with `--inception-weights`.
  Reference (`--fid-reference`): `test`, the real test split (default; 10k images for MNIST), or `train`, the real
  training split (60k for MNIST). Published FIDs use one or the other: compare only values with the same reference,
  size and sample count. Slow on a CPU (hours for 70k images at 299x299); use a GPU.

Paths in the output are relative to the repository when inside it, else file names: never absolute.

Privacy: this command reads the real (private) training and test sets. Like evaluation in the literature it is
outside the DP guarantee: its numbers are for the report, not private releases.
"""

import argparse
import json
import os
import sys

from ldm.checkpoint import atomic_write_json
from ldm.config import DataConfig
from ldm.data import REGISTRY, load_dataset, load_tuning_split
from ldm.distributed import pick_device
from ldm.errors import UserError
from metrics import classifiers
from metrics.feature_cnn import FD_NOTE, check_writable, cnn_feature_batches, feature_cache_path, feature_network
from metrics.frechet import frechet_between
from metrics.inception import FID_WEIGHTS_NAME, fid_feature_batches, load_fid_inception
from metrics.synthetic import NATIVE_SIZE, OTHER_SIZE, load_synthetic, native_size, split_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the repository


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", required=True, help=".npz with images x and labels y (or labels), or an "
                   "ImageFolder of PNGs, as sample.py writes them (forms: metrics/synthetic.py)")
    p.add_argument("--real", default="mnist", help="real data set; its test split scores the classifiers (default mnist)")
    p.add_argument("--data-root", default="./data")
    p.add_argument("--real-split", default="test", choices=("test", "tune"),
                   help="real split that scores the classifiers: test (report numbers), or tune, the last "
                        "--tune-holdout training images a private stage held out (to choose settings)")
    p.add_argument("--tune-holdout", type=int, default=0,
                   help="with --real-split tune: the K of the private stage's --tune-holdout")
    sizes = ", ".join(f"{k} {v}" for k, v in NATIVE_SIZE.items())
    p.add_argument("--eval-size", type=int, default=None, help=f"side in pixels at which real and synthetic images are "
                   f"compared (default the real set's native side: {sizes}; others {OTHER_SIZE})")
    p.add_argument("--channels", type=int, default=0, help="evaluation channels (0: the real set's own)")
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
    p.add_argument("--fid-reference", default=None, choices=("train", "test"),
                   help="real split the FID compares with: test (default) or train; needs --inception-weights")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=None, help="also write the JSON object to this file (atomically)")
    args = p.parse_args(argv)
    if args.eval_size is None:
        args.eval_size = native_size(args.real)
    return args


def check_args(args):
    """Refuse bad flags before any data is read; returns the classifier names to train."""
    for name in ("n_val", "epochs", "batch_size", "eval_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.n_train is not None and args.n_train < 1:
        raise UserError(f"--n-train must be a positive integer, got {args.n_train}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.eval_size < 4:
        raise UserError(f"--eval-size must be at least 4 (the CNNs pool twice by 2), got {args.eval_size}")
    if args.channels not in (0, 1, 3):
        raise UserError(f"--channels must be 0 (automatic), 1 or 3, got {args.channels}")
    names = [] if args.classifiers.strip() == "none" else [c.strip() for c in args.classifiers.split(",") if c.strip()]
    bad = [c for c in names if c not in classifiers.CLASSIFIERS]
    if bad or len(set(names)) != len(names):
        raise UserError(f"--classifiers {args.classifiers!r}: choose distinct names from "
                        f"{', '.join(classifiers.CLASSIFIERS)}, or none")
    if args.fid_reference and not args.inception_weights:
        raise UserError(f"--fid-reference {args.fid_reference} needs --inception-weights (FID is computed only with them)")
    if args.real_split == "tune" and args.tune_holdout < 1:
        raise UserError(f"--real-split tune needs --tune-holdout K >= 1, the K the private stage held out; "
                        f"got {args.tune_holdout}")
    if args.real_split == "test" and args.tune_holdout:
        raise UserError(f"--tune-holdout {args.tune_holdout} is read only with --real-split tune")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --out {args.out}: folder {folder} does not exist or is not writable")
    return names


def real_data_config(args):
    """The data configuration that loads `args.real` at the evaluation size and channels.

    Built directly, not from a training preset: the real set is both public and private (so that its own
    channel count is the default), read from --data-root, with derived files under --cache-dir.
    """
    if args.real not in REGISTRY:
        raise UserError(f"unknown --real data set {args.real!r}; valid sets: {', '.join(REGISTRY)}")
    return DataConfig(public=args.real, private=args.real, data_root=args.data_root,
                      cache_dir=args.cache_dir or DataConfig.cache_dir, image_size=args.eval_size,
                      channels=args.channels)


def real_split_name(args):
    if args.real_split == "tune":
        return f"tune: the last {args.tune_holdout} images of the training split (tuning data, never a reported number)"
    return "test"


def scoring_split(args, data_cfg):
    """The real images that score the classifiers (and the digit-classifier distance): the test split, or the
    tuning split that `--tune-holdout` kept out of a private set."""
    if args.real_split == "tune":
        return load_tuning_split(args.real, data_cfg, args.tune_holdout)
    return load_dataset(args.real, data_cfg, "private", split="test")


def portable_path(path):
    """`path` relative to the repository when it lies inside it, else its file name: never an absolute path."""
    full = os.path.realpath(path)
    if os.path.commonpath([full, ROOT]) == ROOT:
        return os.path.relpath(full, ROOT)
    return os.path.basename(full.rstrip(os.sep))


def fd_entry(args, data_cfg, test, synth, device):
    """The `fd_digit_classifier` entry: Frechet distance of feature-CNN features, real test split vs synthetic."""
    net, info = feature_network(data_cfg, device)
    value = frechet_between(cnn_feature_batches(net, test.x, desc="features: real test"),
                            cnn_feature_batches(net, synth.x, desc="features: synthetic"))
    return {"value": value, "note": FD_NOTE, "n_real": len(test), "n_synthetic": len(synth),
            "reference": f"{args.real} {args.real_split} split", "feature_cnn": {**info, "cache": portable_path(info["cache"])}}


def fid_entry(args, inception, reference, synth, split):
    """The `fid` entry: Frechet distance of FID Inception pool3 features, real `split` split vs synthetic."""
    value = frechet_between(fid_feature_batches(inception, reference.x, desc=f"inception: real {split}"),
                            fid_feature_batches(inception, synth.x, desc="inception: synthetic"))
    size = reference.x.shape[-1]
    return {"value": value, "weights": os.path.basename(args.inception_weights), "n_real": len(reference),
            "n_synthetic": len(synth), "reference": f"{args.real} {split} split",
            "note": f"pytorch-fid's Inception features of {size}x{size} images resized to 299, against the real "
                    f"{split} split; published values may use another reference split, size or sample count"}


def run(argv=None):
    """Validate every input, then: downstream accuracy, digit-classifier Frechet distance, FID.

    Returns the JSON dict, also written to --out when given.
    """
    args = parse_args(argv)
    names = check_args(args)
    device = pick_device(args.device)
    data_cfg = real_data_config(args)
    test = scoring_split(args, data_cfg)
    if names and test.num_classes < 2:
        raise UserError(f"{args.real} has no class labels, so downstream accuracy is undefined; pass --classifiers none")
    synth, read_as = load_synthetic(args.synthetic, test)
    train, val = split_synthetic(synth, args.n_train, args.n_val, args.seed)
    inception = load_fid_inception(args.inception_weights).to(device) if args.inception_weights else None
    split = args.fid_reference or args.real_split
    reference = load_dataset(args.real, data_cfg, "private", split="train") if inception and split == "train" else test
    if not args.no_fd and not os.path.exists(feature_cache_path(data_cfg)):
        check_writable(os.path.dirname(feature_cache_path(data_cfg)))  # before any training, not after it

    accuracy = classifiers.downstream_accuracy(names, train, val, test, args.epochs, args.batch_size, args.lr,
                                               args.seed, device)
    result = {
        "synthetic_file": portable_path(args.synthetic), "synthetic_input": read_as, "n_synthetic": len(synth),
        "n_train": len(train[0]), "n_val": len(val[0]),
        "real_set": args.real, "real_split": real_split_name(args), "n_real_test": len(test),
        "eval_size": data_cfg.image_size, "channels": int(test.x.shape[1]),
        "accuracy": accuracy,
        "fd_digit_classifier": None if args.no_fd else fd_entry(args, data_cfg, test, synth, device),
        "fid": None if inception is None else fid_entry(args, inception, reference, synth, split),
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
    print(json.dumps(result))  # one line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
