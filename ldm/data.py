"""Data sets by name, all brought to the experiment's image size and channel count.

Every set is returned as an `ImageSet`: uint8 images `x: (N, C, H, W)` and int64 labels `y: (N,)`.
`to_unit_range` maps a batch to [-1, 1] floats. The registry below is the one place that knows where
each set comes from; `check_pair` refuses a public/private pair that cannot share one model, using
metadata only, so that no private example is read before the private stage.
"""

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldm.checkpoint import atomic_write_bytes
from ldm.errors import UserError


@dataclass(frozen=True)
class ImageSet:
    name: str
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64
    num_classes: int

    def __len__(self):
        return self.x.shape[0]


@dataclass(frozen=True)
class SetInfo:
    channels: int  # native channel count
    kind: str  # "digits" or "natural": an RGB digits set may become grayscale, a natural one may not
    num_classes: int
    files: str  # what must be under the data root when the set cannot be downloaded
    how: str  # how a user gets it


REGISTRY = {
    "mnist": SetInfo(1, "digits", 10, "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
                     "torchvision downloads it with internet access; or copy the four IDX files there"),
    "emnist-letters": SetInfo(1, "digits", 26, "EMNIST/raw/emnist-letters-*-ubyte",
                              "torchvision downloads it (EMNIST, split 'letters') with internet access"),
    "svhn": SetInfo(3, "digits", 10, "train_32x32.mat and test_32x32.mat",
                    "torchvision downloads it (SVHN) with internet access"),
    "cifar10": SetInfo(3, "natural", 10, "cifar-10-batches-py/",
                       "torchvision downloads it (CIFAR10) with internet access"),
    "celeba": SetInfo(3, "natural", 1, "celeba/img_align_celeba/ and celeba/list_eval_partition.txt",
                      "torchvision downloads it (CelebA) from Google Drive, or place the official files there"),
    "imagenet32": SetInfo(3, "natural", 1000, "imagenet32/train.npz (x, y) or imagenet32/train_data_batch_*.npz",
                          "download 'Imagenet32_train_npz' from image-net.org (downsampled ImageNet) and unpack it"),
    "synthdigits": SetInfo(1, "digits", 10, "nothing (made by this project, offline, cached in --cache-dir)",
                           "made automatically"),
    "synthsvhn": SetInfo(3, "digits", 10, "nothing (made by this project, offline, cached in --cache-dir)",
                         "made automatically"),
    "fake": SetInfo(0, "any", 10, "nothing (random data for tests)", "made automatically"),
}


def check_name(name, role):
    if name not in REGISTRY:
        raise UserError(f"unknown {role} data set {name!r}; valid sets: {', '.join(REGISTRY)}")


def experiment_channels(data_cfg):
    """The channel count every set is brought to: --channels, or the private set's native count."""
    if data_cfg.channels:
        return data_cfg.channels
    native = REGISTRY[data_cfg.private].channels
    return native if native else 1


def _conversion_error(name, role, channels):
    info = REGISTRY[name]
    if info.channels in (0, channels):
        return None
    if info.channels == 3 and channels == 1 and info.kind == "digits":
        return None  # e.g. SVHN digits to grayscale for the MNIST experiment
    return (f"{role} set {name!r} has {info.channels} channel(s) ({info.kind} images) and cannot be brought to "
            f"the experiment's {channels} channel(s); choose a {'grayscale' if channels == 1 else 'colour'} {role} set "
            f"or set --channels")


def check_pair(data_cfg):
    """Refuse a public/private pair that cannot share one autoencoder and UNet (metadata only)."""
    check_name(data_cfg.public, "public")
    check_name(data_cfg.private, "private")
    channels = experiment_channels(data_cfg)
    for name, role in ((data_cfg.public, "public"), (data_cfg.private, "private")):
        err = _conversion_error(name, role, channels)
        if err:
            raise UserError(err)


def num_classes(data_cfg):
    """Rows of the class embedding table: enough for both sets' labels."""
    return max(REGISTRY[data_cfg.public].num_classes, REGISTRY[data_cfg.private].num_classes)


def to_unit_range(x):
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def load_dataset(name, data_cfg, role, split="train"):
    """The named set as an `ImageSet` at the experiment's size and channels. `role`: public or private."""
    check_name(name, role)
    channels = experiment_channels(data_cfg)
    err = _conversion_error(name, role, channels)
    if err:
        raise UserError(err)
    if split not in ("train", "test"):
        raise UserError(f"split must be train or test, got {split!r}")
    if name == "fake":
        x, y = make_fake(data_cfg.fake_n, channels, data_cfg.image_size, seed=1 if role == "private" else 0)
    else:
        x, y = _LOADERS[name](data_cfg, split)
    x = _resize(_to_channels(torch.as_tensor(x), channels), data_cfg.image_size)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if len(x) == 0:
        raise UserError(f"{role} data set {name!r} is empty")
    return ImageSet(name, x.contiguous(), y, REGISTRY[name].num_classes)


def load_private(cfg):
    """The private set: the private data set's training split less its last `cfg.dp.tune_holdout` images."""
    return split_holdout(load_dataset(cfg.data.private, cfg.data, "private"), cfg.dp.tune_holdout)[0]


def load_tuning_split(name, data_cfg, k):
    """The last `k` images of `name`'s training split: tuning data, never in a private set run with
    --tune-holdout k, and outside every guarantee."""
    if k < 1:
        raise UserError(f"the tuning split needs --tune-holdout K >= 1 (the K the private stage held out), got {k}")
    return split_holdout(load_dataset(name, data_cfg, "private"), k)[1]


def split_holdout(data, k):
    """(data less its last k images, those last k images). A fixed, public rule: no example is read to choose."""
    if not 0 <= k < len(data):
        # never the set's size: N is shown nowhere unless public (--private-size)
        raise UserError(f"--tune-holdout {k} must be >= 0 and smaller than the training split of {data.name!r}, "
                        f"so that the private set keeps at least one image")
    cut = len(data) - k
    return (ImageSet(data.name, data.x[:cut], data.y[:cut], data.num_classes),
            ImageSet(data.name, data.x[cut:], data.y[cut:], data.num_classes))


def make_fake(n, channels, size, seed):
    """Tiny random labelled images for tests: a bright square whose position encodes the label, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    x = torch.rand(n, channels, size, size, generator=g) * 0.2
    cell = size // 4
    for i in range(n):
        r, c = divmod(int(y[i]) % 10, 4)
        x[i, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] += 0.8
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _to_channels(x, channels):
    """(N, C, H, W) uint8 -> `channels` channels; RGB to grayscale by ITU-R 601 luma."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise UserError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def _resize(x, size, chunk=4096):
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8, antialiased bilinear, in chunks to bound memory."""
    if x.shape[-2:] == (size, size):
        return x
    out = []
    for i in range(0, len(x), chunk):
        xf = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(xf.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _missing(name, data_cfg, reason):
    info = REGISTRY[name]
    root = os.path.abspath(data_cfg.data_root)
    return UserError(f"data set {name!r} not found under {root} (expected {info.files}) and it could not be "
                     f"downloaded ({reason}); {info.how}, then pass --data-root")


def _torchvision(name, data_cfg, make):
    """Load with torchvision, first from disk, then downloading if allowed; a clear error otherwise."""
    try:
        return make(False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        os.makedirs(data_cfg.data_root, exist_ok=True)
        return make(True)
    except Exception as e:  # noqa: BLE001 - any download failure becomes one clear message
        raise _missing(name, data_cfg, f"{first}; download failed: {type(e).__name__}") from None


def _mnist(data_cfg, split):
    from torchvision.datasets import MNIST
    ds = _torchvision("mnist", data_cfg, lambda dl: MNIST(data_cfg.data_root, train=split == "train", download=dl))
    return ds.data.unsqueeze(1), ds.targets


def _emnist_letters(data_cfg, split):
    from torchvision.datasets import EMNIST
    ds = _torchvision("emnist-letters", data_cfg,
                      lambda dl: EMNIST(data_cfg.data_root, split="letters", train=split == "train", download=dl))
    return ds.data.transpose(1, 2).unsqueeze(1), ds.targets - 1  # stored transposed; labels 1..26


def _svhn(data_cfg, split):
    from torchvision.datasets import SVHN
    ds = _torchvision("svhn", data_cfg, lambda dl: SVHN(data_cfg.data_root, split=split, download=dl))
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))


def _cifar10(data_cfg, split):
    from torchvision.datasets import CIFAR10
    ds = _torchvision("cifar10", data_cfg, lambda dl: CIFAR10(data_cfg.data_root, train=split == "train", download=dl))
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)


def _celeba(data_cfg, split):
    """CelebA, centre-cropped to 140x140 and resized; cached as an npz under --cache-dir (decoding is slow)."""
    size = data_cfg.image_size
    cache = os.path.join(data_cfg.cache_dir, "celeba", f"celeba_{split}_{size}.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            return torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    from torchvision.datasets import CelebA
    from tqdm import tqdm
    ds = _torchvision("celeba", data_cfg,
                      lambda dl: CelebA(data_cfg.data_root, split="valid" if split == "test" else "train",
                                        target_type=[], download=dl))
    x = np.empty((len(ds), 3, size, size), np.uint8)
    for i in tqdm(range(len(ds)), desc="celeba: crop and resize", unit="img"):
        img = ds[i][0]
        w, h = img.size
        img = img.crop(((w - 140) // 2, (h - 140) // 2, (w + 140) // 2, (h + 140) // 2)).resize((size, size))
        x[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    y = np.zeros(len(x), np.int64)  # unconditional: one class
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write_bytes(cache, lambda f: np.savez(f, x=x, y=y))
    return torch.from_numpy(x), torch.from_numpy(y)


def _imagenet32(data_cfg, split):
    """Downsampled ImageNet 32x32 provided by the user: imagenet32/{split}.npz with x, y, or the official batches."""
    folder = os.path.join(data_cfg.data_root, "imagenet32")
    single = os.path.join(folder, f"{'train' if split == 'train' else 'val'}.npz")
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
    paths = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(folder, pattern)))
    if not paths:
        raise _missing("imagenet32", data_cfg, "it is not downloadable automatically")
    xs, ys = [], []
    for p in paths:
        with np.load(p) as f:
            if "x" in f:
                x, y = f["x"], f["y"]
            else:  # official format: (N, 3072) channel-major rows, labels 1..1000
                x, y = f["data"].reshape(-1, 3, 32, 32), np.asarray(f["labels"]) - 1
        if x.ndim != 4:
            raise UserError(f"{p}: expected images of shape (N, 32, 32, 3) or (N, 3, 32, 32), got {x.shape}")
        xs.append(x if x.shape[1] == 3 else x.transpose(0, 3, 1, 2))
        ys.append(np.asarray(y, np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _synthdigits(data_cfg, split, style="plate"):
    """synthdigits (plate style, grey) or synthsvhn (street style, RGB, made grey by `_to_channels` like SVHN)."""
    from ldm.synthdigits import load_synthdigits
    seed = data_cfg.synth_seed if split == "train" else data_cfg.synth_seed + 1_000_003
    n = data_cfg.synth_n if split == "train" else max(1, data_cfg.synth_n // 6)
    x, y = load_synthdigits(data_cfg.cache_dir, n, seed, size=data_cfg.image_size, style=style)
    x = torch.from_numpy(x)
    return (x if x.ndim == 4 else x.unsqueeze(1)), torch.from_numpy(y)


def _synthsvhn(data_cfg, split):
    return _synthdigits(data_cfg, split, style="street")


_LOADERS = {"mnist": _mnist, "emnist-letters": _emnist_letters, "svhn": _svhn, "cifar10": _cifar10,
            "celeba": _celeba, "imagenet32": _imagenet32, "synthdigits": _synthdigits,
            "synthsvhn": _synthsvhn}
