"""synthdigits and synthsvhn: offline stand-ins for SVHN cropped digits, used as the PUBLIC data set.

The DP experiment pretrains the diffusion model on public data and fine-tunes it with DP-SGD on
MNIST (the private set). SVHN, the usual public set, needs a download; these sets are made here,
offline, with Pillow, in one of two styles:

- `plate` (the set `synthdigits`): grayscale crops of printed digits 0-9 on a clean ground, in
  the style of house-number plates.
- `street` (the set `synthsvhn`): RGB crops made like SVHN's, so that the experiment converts
  them to grey exactly as it converts SVHN (ldm/data.py, ITU-R 601 luma). On top of the plate
  style: ink and ground colours drawn in RGB, so that their grey contrast is whatever the colours
  give (down to MIN_LUMA_CONTRAST, lower than the plate style's 70 grey levels, as in SVHN's
  low-contrast crops); clutter (the edge of the plate against a wall of a third colour, a smooth
  texture on the ground, plate-frame bars above or below the digits); crops captured at a lower
  resolution and scaled up (blurred, as SVHN's small crops are); noise in each channel.
  Chosen to match what SVHN is, never by the private set: no MNIST image was looked at to pick a
  parameter.

How an image is made (`make_synthdigits`): the digit, in a font drawn at random from Pillow's
built-in font and every TrueType/OpenType font found on the machine (`font_names`), is drawn white
on black at a random font size and stroke width, with a neighbouring digit to the left and/or
right in the same font, as in a house-number plate. One random affine map (rotation +-15 deg,
shear, horizontal stretch, scale, translation) takes the centred digit to the middle of a
canvas of 2 * size pixels, which cuts the neighbours off at the crop; the mask is blurred with a
random Gaussian and averaged down to `size` (antialiasing). The mask then mixes a background and
a foreground intensity (random, either polarity, at least 70 grey levels apart) under a random
linear illumination gradient, and Gaussian noise is added. The street style draws its extra
choices after all of these (`_draw_street`), so a plate-style set does not depend on them.

Determinism: the set is a pure function of (n, seed, size, style, the font list, the Pillow/FreeType
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
import torch
import torch.nn.functional as F
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
STYLES = {"plate": "synthdigits", "street": "synthsvhn"}  # style -> the data set's name (and cache file prefix)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as ldm/data.py converts RGB sets to grey
MIN_LUMA_CONTRAST = 25.0  # street style: least grey-level difference between ink and ground


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


def _draw_street(rng: np.random.Generator, p: dict[str, np.ndarray]) -> None:
    """The street style's extra choices, added to p after the plate style's, in a fixed order."""
    n = len(p["label"])

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n)

    # Ink and ground in RGB; of 16 candidate inks, the first far enough from the ground in grey.
    p["bg_rgb"] = rng.uniform(0.0, 255.0, (n, 3))
    inks = rng.uniform(0.0, 255.0, (n, 16, 3))
    contrast = np.abs(inks @ LUMA - (p["bg_rgb"] @ LUMA)[:, None])  # (n, 16)
    far = contrast >= MIN_LUMA_CONTRAST
    pick = np.where(far.any(1), far.argmax(1), contrast.argmax(1))
    p["fg_rgb"] = inks[np.arange(n), pick]
    p["wall"] = rng.random(n) < 0.5  # the plate's edge crosses the crop; beyond it, a wall
    p["wall_rgb"] = rng.uniform(0.0, 255.0, (n, 3))
    p["wall_angle"] = u(0.0, 2.0 * np.pi)
    p["wall_dist"] = u(0.6, 1.1)  # the edge's distance from the centre, in half-crops
    p["texture"] = u(0.0, 24.0)  # grey levels of a smooth random texture on the ground
    p["texture_grid"] = rng.standard_normal((n, 6, 6)).astype(np.float32)
    p["frame"] = rng.choice(4, n, p=[0.65, 0.1, 0.1, 0.15])  # bars: none, above, below, both
    p["frame_gap"] = u(0.1, 0.35)  # fraction of the digit height
    p["frame_width"] = u(0.04, 0.12)
    p["lowres"] = np.where(rng.random(n) < 0.35, rng.integers(10, 25, n), 0)  # px at size 32; 0: sharp


def _draw_frame(draw: ImageDraw.ImageDraw, p: dict[str, np.ndarray], i: int, top: float, bottom: float,
                h: float, width: int) -> None:
    """Street style: plate-frame bars across the canvas above (frame 1, 3) and/or below (2, 3) the digits."""
    gap, bar = p["frame_gap"][i] * h, max(1.0, p["frame_width"][i] * h)
    if p["frame"][i] in (1, 3):
        draw.rectangle((0, top - gap - bar, width, top - gap), fill=255)
    if p["frame"][i] in (2, 3):
        draw.rectangle((0, bottom + gap, width, bottom + gap + bar), fill=255)


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
    if "frame" in p:
        _draw_frame(draw, p, i, oy + t, oy + b, h, 2 * half)

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
    img = img.reduce(2)
    if "lowres" in p and p["lowres"][i] > 0:  # captured small, scaled up
        low = max(4, round(int(p["lowres"][i]) * size / 32))
        img = img.resize((low, low), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _ramp(p: dict[str, np.ndarray], rows: slice, size: int) -> np.ndarray:
    """(B, S, S) illumination ramp in grey levels: linear in the direction grad_dir, grad at the edge."""
    coord = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ramp = np.cos(p["grad_dir"][rows, None, None]) * coord[None, None, :]
    ramp = ramp + np.sin(p["grad_dir"][rows, None, None]) * coord[None, :, None]
    return p["grad"][rows, None, None] * ramp


def _colour(masks: np.ndarray, p: dict[str, np.ndarray], rows: slice, rng: np.random.Generator) -> np.ndarray:
    """Plate style. Masks (B, S, S) uint8 -> images (B, S, S) uint8: ground/ink mix, illumination ramp, noise."""
    b, size, _ = masks.shape
    alpha = masks.astype(np.float32) / 255.0
    fg, bg = p["fg"][rows, None, None], p["bg"][rows, None, None]
    img = bg + (fg - bg) * alpha + _ramp(p, rows, size)
    img = img + p["noise"][rows, None, None] * rng.standard_normal((b, size, size), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _street_ground(p: dict[str, np.ndarray], rows: slice, size: int) -> np.ndarray:
    """(B, 3, S, S) float ground of the street style: plate colour, the wall beyond the plate's edge, texture."""
    coord = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    along = np.cos(p["wall_angle"][rows, None, None]) * coord[None, None, :]
    along = along + np.sin(p["wall_angle"][rows, None, None]) * coord[None, :, None]  # (B, S, S), in half-crops
    soft = 2.0 / size  # the edge is about one pixel wide
    wall = np.clip((along - p["wall_dist"][rows, None, None]) / soft + 0.5, 0.0, 1.0) * p["wall"][rows, None, None]
    bg, wall_rgb = p["bg_rgb"][rows, :, None, None], p["wall_rgb"][rows, :, None, None]
    ground = bg + (wall_rgb - bg) * wall[:, None]
    grid = torch.from_numpy(p["texture_grid"][rows])[:, None]  # (B, 1, 6, 6)
    texture = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True).numpy()
    return ground + p["texture"][rows, None, None, None] * texture


def _colour_street(masks: np.ndarray, p: dict[str, np.ndarray], rows: slice, rng: np.random.Generator) -> np.ndarray:
    """Street style. Masks (B, S, S) uint8 -> RGB images (B, 3, S, S) uint8: ink over a cluttered ground,
    illumination ramp, noise drawn for each channel."""
    b, size, _ = masks.shape
    alpha = (masks.astype(np.float32) / 255.0)[:, None]  # (B, 1, S, S)
    ground = _street_ground(p, rows, size)
    img = ground + (p["fg_rgb"][rows, :, None, None] - ground) * alpha + _ramp(p, rows, size)[:, None]
    img = img + p["noise"][rows, None, None, None] * rng.standard_normal((b, 3, size, size), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _check_args(n: int, size: int, style: str) -> None:
    if n < 1:
        raise UserError(f"synthdigits: n={n} images requested; n must be at least 1")
    if size < 8:
        raise UserError(f"synthdigits: size={size} pixels requested; size must be at least 8")
    if style not in STYLES:
        raise UserError(f"synthdigits: style={style!r}; allowed: {', '.join(STYLES)}")


def _generate(n: int, seed: int, size: int, style: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    _check_args(n, size, style)
    rng = np.random.default_rng(seed)
    p = _draw_params(rng, n, len(_font_table()))
    if style == "street":
        _draw_street(rng, p)
    masks = np.empty((n, size, size), dtype=np.uint8)  # (N, S, S)
    for i in tqdm(range(n), desc=STYLES[style], unit="img", disable=not progress, leave=False):
        masks[i] = _render_mask(p, i, size)
    colour = _colour_street if style == "street" else _colour
    x = np.empty((n, 3, size, size) if style == "street" else (n, size, size), dtype=np.uint8)
    chunk = 4096
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        x[rows] = colour(masks[rows], p, rows, rng)
    return x, p["label"].astype(np.int64)


def make_synthdigits(n: int, seed: int, size: int = 32, style: str = "plate") -> tuple[np.ndarray, np.ndarray]:
    """Make n images in `style` (plate or street); see the module docstring for what is drawn at random.

    Returns x: (n, size, size) uint8 grayscale (plate) or (n, 3, size, size) uint8 RGB (street), and
    y: (n,) int64 labels 0..9, each class n // 10 or n // 10 + 1 times, in random order. Bit-identical
    for the same (n, seed, size, style) on a machine with the same fonts and Pillow build (`font_tag`).
    About 0.7 ms an image on one core.
    """
    return _generate(n, seed, size, style, progress=False)


# ----------------------------------------------------------------------------- cache


def cache_path(root: str, n: int, seed: int, size: int = 32, style: str = "plate") -> Path:
    """Where `load_synthdigits` keeps the set: <root>/synthdigits/<name>_n.._seed.._s.._f<tag>_v1.npz, where
    <name> is synthdigits (plate style) or synthsvhn (street style)."""
    name = f"{STYLES[style]}_n{n}_seed{seed}_s{size}_f{font_tag()}_v{CACHE_VERSION}.npz"
    return Path(root) / "synthdigits" / name


def _read(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is missing, unreadable or of the wrong shape."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = x.shape == shape and x.dtype == np.uint8 and y.shape == shape[:1] and y.dtype == np.int64
    if not ok or y.min() < 0 or y.max() > 9:
        return None
    return x, y


def load_synthdigits(root: str, n: int, seed: int, size: int = 32,
                     style: str = "plate") -> tuple[np.ndarray, np.ndarray]:
    """`make_synthdigits(n, seed, size, style)`, cached in `cache_path(root, n, seed, size, style)`.

    A missing or corrupt cache file is (re)generated, with a progress bar, and written atomically.
    Raises UserError if the cache folder cannot be created or written.
    """
    _check_args(n, size, style)
    path = cache_path(root, n, seed, size, style)
    cached = _read(path, (n, 3, size, size) if style == "street" else (n, size, size))
    if cached is not None:
        return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"synthdigits: cannot create cache folder {path.parent} ({e.strerror}); pass a writable root") from e
    x, y = _generate(n, seed, size, style, progress=True)
    try:
        atomic_write_bytes(str(path), lambda f: np.savez(f, x=x, y=y))
    except OSError as e:
        raise UserError(f"synthdigits: cannot write to cache folder {path.parent} ({e.strerror}); pass a writable root") from e
    return x, y
