"""The synthetic labelled data set under evaluation: read from what other tools write, brought to one form, split.

`load_synthetic` accepts
- a `.npz` with images `x` and integer labels `y` or `labels` (both only if equal; nothing else is read);
- a folder of PNGs in torchvision's ImageFolder layout, labels from the class folders (`metrics/image_folder.py`;
  sample.py's `--out DIR/` writes one, with a `card.json` at the top that is not a class and is ignored).

and brings the images to the real set's form, uint8 (N, C, S, S) at the evaluation size S, by these rules:

Layout. `x` is (N, H, W) (one channel), or 4-D with a channel axis of size 1 or 3: read as channels first
(N, C, H, W) when only axis 1 has size 1 or 3, as channels last (N, H, W, C) when only axis 3 has. When both
axes have (e.g. (N, 3, 3, 3)) or neither has (e.g. (N, 4, 32, 32)), the array is refused. Images must be square.

Values, by dtype, then by min/max:
- uint8: 0..255;
- float: [0, 1] when min >= 0 and max <= 1; otherwise [-1, 1] when min >= -1 and max <= 1; any other range, or a
  NaN or infinity, is refused naming min and max. So a float set without a negative value is read as [0, 1] (a
  set made in [-1, 1] has negative pixels: its black background is -1);
- any other dtype is refused.
Floats are quantized to 8 bits, round(255 x) or round(127.5 (x + 1)), as writing them to PNG would: every form of
the same uint8 images then gives the same evaluation, bit for bit (tested).

Channels. Brought to the real set's count: 3 -> 1 by ITU-R 601 luma (how ldm/data.py turns RGB digits gray);
1 -> 3 is refused.

Size (the one rule, applied to the synthetic images only; the real set is loaded at S by ldm/data.py, whose resize
R_a->b is antialiased bilinear, align_corners=False): synthetic images of side H != S are brought to S by the map
under which real images come back unchanged:
- H > S: the least-squares inverse of R_S->H (its Moore-Penrose pseudo-inverse, per axis): the S x S image whose
  resize to H is nearest. It is exact (up to rounding) for images made from S x S images by R_S->H: this project's
  32x32 MNIST samples imitate real digits resized 28 -> 32 by R, and 20k real training digits taken 28 -> 32 -> 28
  this way are within 3 levels of the originals and have their digit-classifier FD to the test split (1.065 vs
  1.064), where an antialiased bilinear 32 -> 28 gives 39.8 (plain bilinear 31.2, bicubic 11.5, 2-pixel crop 15.8).
  It sharpens (weights down to -0.57 for 32 -> 28; condition number 2.15), so high-frequency noise is amplified
  by at most that factor per axis;
- H < S: R_H->S itself, as ldm/data.py brings a real set of native side H to S.
Then rounded to uint8. No padding or cropping (images made by padding 28 -> 32 are not undone).

Every way the input can be wrong is one UserError that names the shapes, dtype or range it saw.
`split_synthetic` draws the synthetic training and validation splits of the downstream protocol
(`metrics/classifiers.py`) from a seeded public generator; the split depends on the images' order, so a folder
(read class by class) matches an `.npz` whose images are in that order.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data import ImageSet, _resize, _to_channels
from ldm.errors import UserError
from metrics.image_folder import read_image_folder

# The evaluation size of each real set: its native side. The sets not listed have none (celeba is cropped and
# resized; synthdigits and fake are made at any size) and are evaluated at OTHER_SIZE, this project's image size.
NATIVE_SIZE = {"mnist": 28, "emnist-letters": 28, "svhn": 32, "cifar10": 32, "imagenet32": 32}
OTHER_SIZE = 32
RESIZE = "ldm/data.py's antialiased bilinear resize"
CHUNK = 4096  # images converted at a time, so that a float64 set is never copied whole


def native_size(name):
    """The side at which real set `name` is evaluated by default (NATIVE_SIZE, else OTHER_SIZE)."""
    return NATIVE_SIZE.get(name, OTHER_SIZE)


def read_npz(path):
    """(x as stored, labels as stored, name of the labels entry) from the .npz at `path`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            found = list(f.files)
            arrays = {k: f[k] for k in ("x", "y", "labels") if k in found}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear message
        raise UserError(f"--synthetic {path} is not a readable .npz file ({type(e).__name__})") from None
    names = [k for k in ("y", "labels") if k in arrays]
    if "x" not in arrays or not names:
        missing = " and ".join(k for k, ok in (("x", "x" in arrays), ("y (or labels)", bool(names))) if not ok)
        raise UserError(f"--synthetic {path} has no {missing} (found {', '.join(found) or 'nothing'}); it needs "
                        f"images x and integer labels y, as sample.py writes them")
    if len(names) == 2:
        y, labels = arrays["y"], arrays["labels"]
        if y.shape != labels.shape or not np.array_equal(y, labels):
            raise UserError(f"--synthetic {path} has both y {y.shape} and labels {labels.shape} and they differ; "
                            f"keep only the right one")
    return arrays["x"], arrays[names[0]], names[0]


def channels_first(x, path):
    """x (N, H, W), (N, C, H, W) or (N, H, W, C) -> ((N, C, H, W) view, the layout read), by the module's rule."""
    shape = tuple(x.shape)
    if x.ndim == 3:
        return x[:, None], "(N, H, W)"
    if x.ndim == 4:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if first != last:
            return (x, "(N, C, H, W)") if first else (x.transpose(0, 3, 1, 2), "(N, H, W, C)")
        why = "both axis 1 and axis 3 have" if first else "neither axis 1 nor axis 3 has"
        raise UserError(f"--synthetic {path}: x has shape {shape} and {why} size 1 or 3, so its channel axis cannot be "
                        f"decided between (N, C, H, W) and (N, H, W, C); write (N, H, W) for grayscale or a 4-D array "
                        f"whose channel axis alone has size 1 or 3")
    raise UserError(f"--synthetic {path}: x has shape {shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) "
                    f"with C = 1 or 3")


def value_range(x, path):
    """How the values of `x` are read: 'uint8 0..255', 'float [0, 1]' or 'float [-1, 1]', by the module's rule."""
    if x.dtype == np.uint8:
        return "uint8 0..255"
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (cast it to uint8 if its values are 0..255)" if np.issubdtype(x.dtype, np.integer) else ""
        raise UserError(f"--synthetic {path}: x is {x.dtype}; expected uint8 0..255 or float in [0, 1] or [-1, 1]{hint}")
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UserError(f"--synthetic {path}: float x holds NaN or infinite values (min {lo}, max {hi})")
    if lo >= 0 and hi <= 1:
        return "float [0, 1]"
    if lo >= -1 and hi <= 1:
        return "float [-1, 1]"
    raise UserError(f"--synthetic {path}: float x has min {lo:.6g} and max {hi:.6g}, outside [-1, 1]; expected float "
                    f"in [0, 1] or [-1, 1], or uint8 0..255: rescale it")


def to_uint8(x, values):
    """A block (n, C, H, W) read as `values` (see `value_range`) -> torch uint8, floats rounded to 8 bits."""
    if values == "uint8 0..255":
        return torch.from_numpy(np.ascontiguousarray(x))
    x = x.astype(np.float64)
    scaled = 255.0 * x if values == "float [0, 1]" else 127.5 * (x + 1.0)
    return torch.from_numpy(np.rint(scaled).clip(0, 255).astype(np.uint8))


def to_real_form(x, values, real, path):
    """x (N, C, H, W) as stored -> torch uint8 (N, C', S, S): the real set's channels C' and side S (module rules)."""
    n, c, h, w = x.shape
    _, channels, size, _ = real.x.shape
    if h != w:
        raise UserError(f"--synthetic {path}: images are {h}x{w} (x read as (N, C, H, W) {tuple(x.shape)}); "
                        f"only square images are evaluated")
    if c != channels and not (c == 3 and channels == 1):
        raise UserError(f"--synthetic {path}: images have {c} channel(s), the real set {real.name!r} has {channels}; "
                        f"give {channels}-channel images")
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    for i in range(0, n, CHUNK):
        out[i:i + CHUNK] = to_size(_to_channels(to_uint8(x[i:i + CHUNK], values), channels), size)
    how = {"channels": f"{c} -> 1 (ITU-R 601 luma)" if c != channels else c, "resized": None}
    if h > size:
        how["resized"] = f"{h}x{w} -> {size}x{size}, least-squares inverse of {RESIZE} {size} -> {h}"
    elif h < size:
        how["resized"] = f"{h}x{w} -> {size}x{size}, {RESIZE}"
    return out, how


def resize_matrix(n, m):
    """(m, n) float64: ldm/data.py's resize of one axis from n to m pixels, as a matrix (it is linear and separable)."""
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, 1, n)  # n one-pixel-high images of width n
    return F.interpolate(eye, size=(1, m), mode="bilinear", antialias=True, align_corners=False).view(n, m).T


def to_size(x, size):
    """uint8 (B, C, H, H) -> uint8 (B, C, size, size) by the module's size rule."""
    h = x.shape[-1]
    if h <= size:
        return _resize(x, size)  # unchanged when h == size
    inverse = torch.linalg.pinv(resize_matrix(size, h))  # (size, h): argmin_z |R z - x|^2 per axis
    z = inverse @ x.double() @ inverse.T  # (B, C, size, size)
    return z.round().clamp(0, 255).to(torch.uint8)


def check_labels(y, x_shape, real, path, source):
    """`y` as int64 (N,), refused unless N = x_shape[0] integer labels in 0..K-1 covering every class of `real`."""
    n = x_shape[0]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"--synthetic {path}: labels {source} are {y.dtype} of shape {y.shape}, but x {tuple(x_shape)} "
                        f"holds {n} images: expected {n} integer labels, shape ({n},)")
    k = real.num_classes
    if y.min() < 0 or y.max() >= k:
        raise UserError(f"--synthetic {path}: labels must lie in 0..{k - 1} for {real.name}, "
                        f"found {int(y.min())}..{int(y.max())}")
    absent = sorted(set(real.y.unique().tolist()) - set(np.unique(y).tolist()))
    if absent:
        raise UserError(f"--synthetic {path}: class(es) {', '.join(map(str, absent))} of {real.name} have no "
                        f"synthetic images; sample every class (sample.py does by default)")
    return torch.from_numpy(y.astype(np.int64))


def npz_images(path):
    """(x as (N, C, H, W), labels as stored, info) from the .npz at `path`, its layout and value range decided."""
    x, y, name = read_npz(path)
    if x.ndim and len(x) == 0:
        raise UserError(f"--synthetic {path}: x has shape {x.shape}, no images")
    stored = list(x.shape)
    x, layout = channels_first(x, path)
    info = {"format": "npz", "shape": stored, "dtype": str(x.dtype), "layout": layout, "values": value_range(x, path),
            "labels": name}
    return x, y, info


def folder_images(path, real):
    """(x uint8 (N, C, H, W), labels, info) from the ImageFolder at `path`, with one class folder per real class."""
    x, y, info = read_image_folder(path)
    if len(info["classes"]) != real.num_classes:
        raise UserError(f"--synthetic {path} has {len(info['classes'])} class folders "
                        f"({', '.join(info['classes'][:12])}), {real.name} has {real.num_classes} classes")
    return x, y, {**info, "shape": list(x.shape), "dtype": "uint8", "layout": "(N, C, H, W) from PNG",
                  "values": "uint8 0..255"}


def load_synthetic(path, real):
    """The .npz or ImageFolder at `path` as an ImageSet x: (N, C, S, S) uint8 in the form of the real set `real`.

    Returns (ImageSet, info): info records how the input was read (format, shape, dtype, layout, values, labels,
    channels, resize). Refused with a UserError: see the module docstring.
    """
    if os.path.isdir(path):
        x, y, info = folder_images(path, real)
    elif os.path.isfile(path):
        x, y, info = npz_images(path)
    else:
        raise UserError(f"--synthetic {path} does not exist")
    labels = check_labels(y, info["shape"], real, path, info["labels"])
    images, how = to_real_form(x, info["values"], real, path)
    return ImageSet("synthetic", images, labels, real.num_classes), {**info, **how}


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
