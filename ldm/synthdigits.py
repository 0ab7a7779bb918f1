"""synthdigits: an offline stand-in for SVHN cropped digits, used as the PUBLIC data set.

The DP experiment pretrains the diffusion model on public data and fine-tunes it with DP-SGD on
MNIST (the private set). SVHN, the usual public set, needs a download; synthdigits is made here,
offline, with Pillow: grayscale crops of printed digits 0-9 in the style of house-number crops.

How an image is made (`make_synthdigits`): the digit, in a font drawn at random from Pillow's
built-in font and every TrueType/OpenType font found on the machine (`font_names`), is drawn white
on black at a random font size and stroke width, with a neighbouring digit to the left and/or
right in the same font, as in a house-number plate. One random affine map (rotation +-15 deg,
shear, horizontal stretch, scale, translation) takes the centred digit to the middle of a
canvas of 2 * size pixels, which cuts the neighbours off at the crop; the mask is blurred with a
random Gaussian and averaged down to `size` (antialiasing). The mask then mixes a background and
a foreground intensity (random, either polarity, at least 70 grey levels apart) under a random
linear illumination gradient, and Gaussian noise is added.

Determinism: the set is a pure function of (n, seed, size, the font list, the Pillow/FreeType
build). All randomness comes from one `numpy.random.default_rng(seed)`, drawn in a fixed order;
the same arguments give bit-identical arrays across processes. The set depends on n as a whole
(the first 100 images of n=1000 are not the images of n=100). Machines with different fonts give
different sets; `font_tag` hashes the font names and the Pillow version into the cache file name
so that `load_synthdigits` never mixes them.

Not covered: this is synthetic public data, outside any privacy guarantee and untouched by it;
it contains no MNIST example.
"""

import functools
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from ldm.checkpoint import atomic_write_bytes
from ldm.errors import UserError

FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "~/Library/Fonts",
    "C:/Windows/Fonts",
)
FONT_SUFFIXES = (".ttf", ".otf")
BUILTIN = "pillow-builtin"
FONT_PX = tuple(range(24, 73, 6))  # font sizes drawn from for size 32; scaled with size
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=None)
def _font(path: str | None, px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """One font object per (file, size); path None is Pillow's built-in font (bitmap without FreeType)."""
    if path is not None:
        return ImageFont.truetype(path, px)
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: scalable Aileron
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _draws_digits(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
    """True if the ten digits render as ten distinct, non-empty glyphs, none the missing-glyph box.

    Weeds out symbol and icon fonts, whose digits would be drawn as something else or as tofu.
    """
    def render(text: str) -> bytes:
        canvas = Image.new("L", (64, 64))
        ImageDraw.Draw(canvas).text((8, 4), text, fill=255, font=font)
        return canvas.tobytes()

    glyphs = [render(str(d)) for d in range(10)]
    missing = render("\U0010fffd")  # a private-use code point: no font draws it as a digit
    return all(any(g) for g in glyphs) and len(set(glyphs)) == 10 and missing not in glyphs


def _font_files() -> list[str]:
    """TrueType/OpenType files under FONT_DIRS, sorted by file name; of two with one name, the first found."""
    found: dict[str, str] = {}
    for folder in FONT_DIRS:
        for dirpath, _, files in sorted(os.walk(os.path.expanduser(folder))):
            for f in sorted(files):
                if f.lower().endswith(FONT_SUFFIXES):
                    found.setdefault(f, os.path.join(dirpath, f))
    return [found[name] for name in sorted(found)]


@functools.lru_cache(maxsize=1)
def _font_table() -> tuple[tuple[str, str | None], ...]:
    """(name, path) of every usable font: the built-in one first (path None), then the files."""
    table = [(BUILTIN, None)]
    for path in _font_files():
        try:
            usable = _draws_digits(_font(path, 32))
        except (OSError, ValueError):  # unreadable, not really a font, or no Unicode map
            usable = False
        if usable:
            table.append((os.path.basename(path), path))
    return tuple(table)


def font_names() -> list[str]:
    """Names of the fonts synthdigits draws from on this machine, in the order indices refer to."""
    return [name for name, _ in _font_table()]


def font_tag() -> str:
    """8 hex digits identifying the font list and Pillow version; part of the cache file name."""
    key = "\n".join(font_names() + [f"pillow={PIL.__version__}"])
    return hashlib.sha256(key.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- rendering


def _draw_params(rng: np.random.Generator, n: int, n_fonts: int) -> dict[str, np.ndarray]:
    """Every random choice of the set, each an array of length n, drawn in a fixed order."""
    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n)

    p = {"label": rng.permutation(np.arange(n) % 10)}
    p["font"] = rng.integers(0, n_fonts, n)
    p["px"] = rng.choice(np.array(FONT_PX), n)
    p["stroke"] = np.where(rng.random(n) < 0.5, 0.0, u(0.0, 0.045))  # fraction of font size
    p["left"] = np.where(rng.random(n) < 0.6, rng.integers(0, 10, n), -1)  # -1: no neighbour
    p["right"] = np.where(rng.random(n) < 0.6, rng.integers(0, 10, n), -1)
    p["gap"] = u(0.08, 0.4)  # neighbour gap, fraction of the digit height
    p["height"] = u(0.62, 0.9)  # digit height, fraction of the crop
    p["stretch"] = np.exp(u(-0.2, 0.2))  # horizontal
    p["angle"] = np.deg2rad(u(-15.0, 15.0))
    p["shear"] = u(-0.25, 0.25)
    p["tx"], p["ty"] = u(-0.07, 0.07), u(-0.05, 0.05)  # fraction of the crop
    p["blur"] = np.where(rng.random(n) < 0.3, 0.0, u(0.0, 1.6))  # std in px of a 64 px canvas (size 32)
    contrast = u(70.0, 230.0)
    p["dark"] = rng.random(n) < 0.5  # dark digit on light ground
    low = rng.uniform(0.0, 1.0, n) * (255.0 - contrast)
    p["bg"] = np.where(p["dark"], low + contrast, low)
    p["fg"] = np.where(p["dark"], low, low + contrast)
    p["grad"] = u(0.0, 30.0)  # illumination ramp: grey levels from centre to edge
    p["grad_dir"] = u(0.0, 2.0 * np.pi)
    p["noise"] = u(0.0, 10.0)  # Gaussian noise std, grey levels
    return p


def _render_mask(p: dict[str, np.ndarray], i: int, size: int) -> np.ndarray:
    """Image i's digit mask: (size, size) uint8, 255 on the strokes, 0 on the ground."""
    _, path = _font_table()[p["font"][i]]
    px = max(8, round(int(p["px"][i]) * size / 32))
    font = _font(path, px)
    scalable = isinstance(font, ImageFont.FreeTypeFont)
    stroke = round(p["stroke"][i] * px) if scalable else 0
    kw = {"stroke_width": stroke} if scalable else {}

    def box(d: int) -> tuple[int, int, int, int]:
        return font.getbbox(str(d), **kw)

    # The centre digit's box centred on a square canvas; the neighbours on the same baseline.
    l, t, r, b = box(p["label"][i])
    h = max(b - t, 1)
    half = int(2.0 * h) + 4
    canvas = Image.new("L", (2 * half, 2 * half))
    draw = ImageDraw.Draw(canvas)
    ox, oy = half - (l + r) / 2, half - (t + b) / 2
    gap = p["gap"][i] * h
    draw.text((ox, oy), str(p["label"][i]), fill=255, font=font, **kw)
    if p["left"][i] >= 0:
        draw.text((ox + l - gap - box(p["left"][i])[2], oy), str(p["left"][i]), fill=255, font=font, **kw)
    if p["right"][i] >= 0:
        draw.text((ox + r + gap - box(p["right"][i])[0], oy), str(p["right"][i]), fill=255, font=font, **kw)

    # Affine map: output pixel q -> canvas point half + s * A^-1 (q - lands), where lands is the
    # crop centre plus the translation, A = rotation @ shear @ stretch acts on the glyph and
    # s = canvas px per output px.
    w = 2 * size
    s = h / (p["height"][i] * w)
    c, sn = np.cos(p["angle"][i]), np.sin(p["angle"][i])
    a = np.array([[c, -sn], [sn, c]]) @ np.array([[1.0, p["shear"][i]], [0.0, 1.0]])
    a = a @ np.diag([p["stretch"][i], 1.0])
    m = s * np.linalg.inv(a)
    lands = np.array([w / 2 + p["tx"][i] * w, w / 2 + p["ty"][i] * w])
    off = half - m @ lands
    data = (m[0, 0], m[0, 1], off[0], m[1, 0], m[1, 1], off[1])
    img = canvas.transform((w, w), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    if p["blur"][i] > 0:
        img = img.filter(ImageFilter.GaussianBlur(float(p["blur"][i]) * size / 32))
    return np.asarray(img.reduce(2))


def _colour(masks: np.ndarray, p: dict[str, np.ndarray], rows: slice, rng: np.random.Generator) -> np.ndarray:
    """Masks (B, S, S) uint8 -> images (B, S, S) uint8: ground/ink mix, illumination ramp, noise."""
    b, size, _ = masks.shape
    alpha = masks.astype(np.float32) / 255.0
    fg, bg = p["fg"][rows, None, None], p["bg"][rows, None, None]
    coord = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ramp = np.cos(p["grad_dir"][rows, None, None]) * coord[None, None, :]
    ramp = ramp + np.sin(p["grad_dir"][rows, None, None]) * coord[None, :, None]
    img = bg + (fg - bg) * alpha + p["grad"][rows, None, None] * ramp
    img = img + p["noise"][rows, None, None] * rng.standard_normal((b, size, size), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_args(n: int, size: int) -> None:
    if n < 1:
        raise UserError(f"synthdigits: n={n} images requested; n must be at least 1")
    if size < 8:
        raise UserError(f"synthdigits: size={size} pixels requested; size must be at least 8")


def _generate(n: int, seed: int, size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    _check_args(n, size)
    rng = np.random.default_rng(seed)
    p = _draw_params(rng, n, len(_font_table()))
    x = np.empty((n, size, size), dtype=np.uint8)  # (N, S, S)
    for i in tqdm(range(n), desc="synthdigits", unit="img", disable=not progress, leave=False):
        x[i] = _render_mask(p, i, size)
    chunk = 4096
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        x[rows] = _colour(x[rows], p, rows, rng)
    return x, p["label"].astype(np.int64)


def make_synthdigits(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Make n synthdigits images; see the module docstring for what is drawn at random.

    Returns x: (n, size, size) uint8 grayscale and y: (n,) int64 labels 0..9, each class n // 10
    or n // 10 + 1 times, in random order. Bit-identical for the same (n, seed, size) on a machine
    with the same fonts and Pillow build (`font_tag`). About 0.7 ms an image on one core.
    """
    return _generate(n, seed, size, progress=False)


# ----------------------------------------------------------------------------- cache


def cache_path(root: str, n: int, seed: int, size: int = 32) -> Path:
    """Where `load_synthdigits` keeps the set: <root>/synthdigits/synthdigits_n.._seed.._s.._f<tag>_v1.npz."""
    name = f"synthdigits_n{n}_seed{seed}_s{size}_f{font_tag()}_v{CACHE_VERSION}.npz"
    return Path(root) / "synthdigits" / name


def _read(path: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is missing, unreadable or of the wrong shape."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = x.shape == (n, size, size) and x.dtype == np.uint8 and y.shape == (n,) and y.dtype == np.int64
    if not ok or y.min() < 0 or y.max() > 9:
        return None
    return x, y


def load_synthdigits(root: str, n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`make_synthdigits(n, seed, size)`, cached in `cache_path(root, n, seed, size)`.

    A missing or corrupt cache file is (re)generated, with a progress bar, and written atomically.
    Raises UserError if the cache folder cannot be created or written.
    """
    _check_args(n, size)
    path = cache_path(root, n, seed, size)
    cached = _read(path, n, size)
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"synthdigits: cannot create cache folder {path.parent} ({e.strerror}); pass a writable root") from e
    x, y = _generate(n, seed, size, progress=True)
    try:
        atomic_write_bytes(str(path), lambda f: np.savez(f, x=x, y=y))
    except OSError as e:
        raise UserError(f"synthdigits: cannot write to cache folder {path.parent} ({e.strerror}); pass a writable root") from e
    return x, y
