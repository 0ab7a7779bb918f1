"""The digit feature network of `fd_digit_classifier`: a small CNN trained on the real training set, cached.

Its penultimate-layer features stand in for Inception's in a Frechet distance (`metrics/frechet.py`) that works
offline. The network is trained by a fixed, seeded `FeatureRecipe` (`metrics/classifiers.py`) and cached as
`<cache-dir>/eval/feature_cnn_<set>_<size>px_<channels>ch.pt` (never under the data root, which may be read-only),
so that distances from repeated evaluations are comparable with each other. They are NOT FID: never compare
them with published FIDs.

Privacy: training reads the real (private) training set; like evaluation in the literature this is outside the
DP guarantee, and the cached network is derived from private data: do not release it.
"""

import os
import sys
from dataclasses import asdict

import torch
from tqdm import tqdm

from ldm.checkpoint import atomic_write_bytes
from ldm.data import REGISTRY, experiment_channels, load_dataset, to_unit_range
from ldm.errors import UserError
from metrics import classifiers

FEATURE_FORMAT = "dp-ldm-feature-cnn-v1"
FD_NOTE = ("Frechet distance on penultimate-layer features of a small CNN trained on the real training set: "
           "NOT FID, not comparable with published FID values")


def feature_cache_path(data_cfg):
    """Where the feature network for the real set `data_cfg.private` at the evaluation size and channels is cached."""
    c = experiment_channels(data_cfg)
    return os.path.join(data_cfg.cache_dir, "eval", f"feature_cnn_{data_cfg.private}_{data_cfg.image_size}px_{c}ch.pt")


def check_writable(folder):
    """Create `folder` if needed; a UserError naming --cache-dir and --no-fd if it cannot be written."""
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
    are comparable; the cache records the recipe and is retrained when it differs. The cache is written
    atomically and loaded strictly. Returns (model, info).
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
    check_writable(os.path.dirname(path))
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
