"""Tests for ldm/synthdigits.py: determinism, balance, the cache file, that labels match the drawn digits, and the
street style (synthsvhn): RGB made grey as SVHN is, its contrast floor and its clutter."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import ldm.synthdigits as sd
from ldm.config import DataConfig
from ldm.data import _to_channels, check_pair, load_dataset
from ldm.errors import UserError
from ldm.synthdigits import cache_path, load_synthdigits, make_synthdigits

REPO = Path(__file__).resolve().parents[1]


def digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


@pytest.mark.parametrize("style", ["plate", "street"])
def test_same_seed_is_bit_identical_and_seeds_differ(style):
    x1, y1 = make_synthdigits(64, seed=3, style=style)
    x2, y2 = make_synthdigits(64, seed=3, style=style)
    x3, y3 = make_synthdigits(64, seed=4, style=style)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(y1, y3)


def test_same_seed_is_bit_identical_across_processes():
    code = (
        "import hashlib; from ldm.synthdigits import make_synthdigits; "
        "print(*(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest() "
        "for x, y in (make_synthdigits(40, seed=11, size=24, style=s) for s in ('plate', 'street'))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [digest(*make_synthdigits(40, seed=11, size=24, style=s)) for s in ("plate", "street")]


@pytest.mark.parametrize("n", [1, 9, 10, 23, 105])
def test_labels_are_balanced(n):
    _, y = make_synthdigits(n, seed=0, size=8)
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == n and len(counts) == 10
    assert set(counts.tolist()) <= {n // 10, n // 10 + 1}


@pytest.mark.parametrize("size", [8, 20, 32])
def test_shapes_dtypes_and_value_range(size):
    x, y = make_synthdigits(200, seed=1, size=size)
    assert x.shape == (200, size, size) and x.dtype == np.uint8
    assert y.shape == (200,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() <= 9
    assert x.min() < 30 and x.max() > 225  # the set spans the grey range
    contrast = x.reshape(200, -1).max(1).astype(int) - x.reshape(200, -1).min(1)
    assert np.median(contrast) > 100  # each image has a visible digit, not a flat patch
    light_ink = (x.reshape(200, -1).mean(1) > np.median(x.reshape(200, -1), axis=1)).mean()
    assert 0.2 < light_ink < 0.8  # both polarities occur


@pytest.mark.parametrize("n, size, style", [(0, 32, "plate"), (-5, 32, "plate"), (10, 7, "plate"), (10, 32, "svhn")])
def test_bad_arguments_raise_user_error_naming_the_value(n, size, style, tmp_path):
    value = f"n={n}" if n < 1 else f"size={size}" if size < 8 else f"style={style!r}; allowed: plate, street"
    with pytest.raises(UserError, match=re.escape(value)):
        make_synthdigits(n, seed=0, size=size, style=style)
    with pytest.raises(UserError, match=re.escape(value)):
        load_synthdigits(str(tmp_path), n, seed=0, size=size, style=style)


def test_cache_round_trip_reads_the_file_and_leaves_no_temp_files(tmp_path, monkeypatch):
    x, y = load_synthdigits(str(tmp_path), 30, seed=5, size=16)
    path = cache_path(str(tmp_path), 30, seed=5, size=16)
    assert path.name == f"synthdigits_n30_seed5_s16_f{sd.font_tag()}_v1.npz"
    assert os.listdir(tmp_path / "synthdigits") == [path.name]
    assert digest(x, y) == digest(*make_synthdigits(30, seed=5, size=16))

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached file should have been read")

    monkeypatch.setattr(sd, "_generate", no_generation)
    x2, y2 = load_synthdigits(str(tmp_path), 30, seed=5, size=16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_street_style_has_its_own_cache_file_of_rgb_images(tmp_path):
    x, y = load_synthdigits(str(tmp_path), 30, seed=5, size=16, style="street")
    path = cache_path(str(tmp_path), 30, seed=5, size=16, style="street")
    assert path.name == f"synthsvhn_n30_seed5_s16_f{sd.font_tag()}_v1.npz" and path.exists()
    assert x.shape == (30, 3, 16, 16) and digest(x, y) == digest(*make_synthdigits(30, seed=5, size=16, style="street"))
    assert not cache_path(str(tmp_path), 30, seed=5, size=16).exists()  # the plate style's file is another


@pytest.mark.parametrize("content, style", [("garbage", "plate"), ("wrong_shape", "plate"),
                                            ("wrong_shape", "street")])
def test_corrupt_cache_file_is_regenerated(tmp_path, content, style):
    path = cache_path(str(tmp_path), 20, seed=2, style=style)
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"not an npz file")
    else:  # one image short (plate), or grey images where RGB ones belong (street)
        np.savez(path, x=np.zeros((19 if style == "plate" else 20, 32, 32), np.uint8), y=np.zeros(19, np.int64))
    x, y = load_synthdigits(str(tmp_path), 20, seed=2, style=style)
    assert digest(x, y) == digest(*make_synthdigits(20, seed=2, style=style))
    with np.load(path) as f:
        assert digest(f["x"], f["y"]) == digest(x, y)


def test_unwritable_root_raises_user_error_naming_the_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=re.escape(str(blocker / "synthdigits"))):
        load_synthdigits(str(blocker), 10, seed=0)


def test_failed_write_leaves_no_partial_or_temp_file(tmp_path, monkeypatch):
    def failing_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(UserError, match="No space left"):
        load_synthdigits(str(tmp_path), 10, seed=0)
    assert os.listdir(tmp_path / "synthdigits") == []


def test_cache_name_depends_on_the_font_list(tmp_path, monkeypatch):
    before = cache_path(str(tmp_path), 10, seed=0)
    monkeypatch.setattr(sd, "_font_table", lambda: ((sd.BUILTIN, None),))
    assert re.fullmatch(r"[0-9a-f]{8}", sd.font_tag())
    assert cache_path(str(tmp_path), 10, seed=0) != before


def test_fonts_include_pillows_builtin_first():
    names = sd.font_names()
    assert names[0] == sd.BUILTIN
    assert len(names) == len(set(names))


def test_renders_with_only_the_bitmap_font(monkeypatch):
    """The fallback for a Pillow without FreeType: its fixed bitmap font, no stroke width."""
    monkeypatch.setattr(sd, "_font_table", lambda: ((sd.BUILTIN, None),))
    monkeypatch.setattr(sd, "_font", lambda path, px: ImageFont.load_default_imagefont())
    x, y = make_synthdigits(20, seed=0)
    assert x.shape == (20, 32, 32) and np.median(np.ptp(x.reshape(20, -1), axis=1)) > 100


def ink(x: np.ndarray) -> torch.Tensor:
    """(N, S, S) uint8 -> (N, S*S) polarity-free ink map: distance from the median (ground) level, unit norm."""
    x = torch.from_numpy(x).float().flatten(1)
    d = (x - x.median(dim=1, keepdim=True).values).abs()
    return d / (d.norm(dim=1, keepdim=True) + 1e-6)


def clean_digits() -> tuple[np.ndarray, np.ndarray]:
    """Plain centred digits drawn here, independently of synthdigits: (60, 32, 32) uint8 and labels."""
    images, labels = [], []
    for px in (30, 34, 38):
        for ground, fill in ((230, 25), (25, 230)):
            for d in range(10):
                im = Image.new("L", (32, 32), ground)
                font = ImageFont.load_default(size=px)
                ImageDraw.Draw(im).text((16, 16), str(d), fill=fill, font=font, anchor="mm")
                images.append(np.asarray(im))
                labels.append(d)
    return np.stack(images), np.array(labels)


@pytest.fixture
def one_torch_thread():
    """A 2 MB problem: more threads only contend with other processes on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grey(x: np.ndarray) -> np.ndarray:
    """Street-style (N, 3, S, S) -> (N, S, S), by the experiment's own RGB-to-grey conversion (as for SVHN)."""
    return _to_channels(torch.from_numpy(x), 1)[:, 0].numpy() if x.ndim == 4 else x


@pytest.mark.parametrize("style, fresh_floor, clean_floor", [("plate", 0.7, 0.6), ("street", 0.5, 0.5)])
def test_labels_match_the_drawn_digits(one_torch_thread, style, fresh_floor, clean_floor):
    """A linear classifier trained on 2,000 images must read fresh ones, and plain digits, correctly.

    Fresh images (another seed) test that the label and the image agree; plain digits drawn by
    this test test that label k is the digit k and not a consistent relabelling. The street style
    is harder (low contrast, clutter, like SVHN against plain plates), so its floors are lower; chance is 0.1.
    """
    torch.manual_seed(0)
    xa, ya = make_synthdigits(2000, seed=100, style=style)
    xb, yb = make_synthdigits(500, seed=200, style=style)
    xa, xb = grey(xa), grey(xb)
    xc, yc = clean_digits()
    fa = ink(xa)
    mu, sigma = fa.mean(0), fa.std(0) + 1e-3
    fa, fb, fc = (fa - mu) / sigma, (ink(xb) - mu) / sigma, (ink(xc) - mu) / sigma
    clf = torch.nn.Linear(fa.shape[1], 10)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-3)
    target = torch.from_numpy(ya)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(fa), target).backward()
        opt.step()
    with torch.no_grad():
        fresh_acc = (clf(fb).argmax(1).numpy() == yb).mean()
        clean_acc = (clf(fc).argmax(1).numpy() == yc).mean()
    assert fresh_acc > fresh_floor, f"accuracy on fresh {style} images {fresh_acc:.2f}, chance is 0.10"
    assert clean_acc > clean_floor, f"accuracy on plain digits {clean_acc:.2f}, chance is 0.10"


# ----------------------------------------------------------------------------- the street style (synthsvhn)


def test_street_images_are_colour_and_their_grey_spans_the_range():
    x, y = make_synthdigits(200, seed=1, style="street")
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.abs(x[:, 0].astype(int) - x[:, 1]).mean() > 20  # colour, not three copies of one grey
    g = grey(x).reshape(200, -1)
    assert g.min() < 30 and g.max() > 225
    assert np.median(g.max(1).astype(int) - g.min(1)) > 60  # a visible digit, at lower contrast than the plates


def test_street_ink_and_ground_are_at_least_min_contrast_apart_in_grey():
    """The grey contrast comes from the RGB colours (so low-contrast crops occur, as in SVHN), with a floor."""
    rng = np.random.default_rng(0)
    p = sd._draw_params(rng, 5000, len(sd._font_table()))
    sd._draw_street(rng, p)
    contrast = np.abs(p["fg_rgb"] @ sd.LUMA - p["bg_rgb"] @ sd.LUMA)
    assert contrast.min() >= sd.MIN_LUMA_CONTRAST
    assert (contrast < 70).mean() > 0.1  # below the plate style's floor: what the colours add
    assert 0.4 < p["wall"].mean() < 0.6  # half the crops show the plate's edge
    assert 0.25 < (p["frame"] > 0).mean() < 0.45 and 0.25 < (p["lowres"] > 0).mean() < 0.45


def test_street_ground_has_the_wall_beyond_the_plate_edge_and_texture():
    rows, size = slice(0, 2), 16
    p = {"wall_angle": np.zeros(2), "wall_dist": np.full(2, 0.5), "wall": np.array([True, False]),
         "bg_rgb": np.array([[10.0, 20.0, 30.0]] * 2), "wall_rgb": np.array([[200.0, 100.0, 50.0]] * 2),
         "texture": np.array([0.0, 10.0]),
         "texture_grid": np.random.default_rng(0).standard_normal((2, 6, 6)).astype(np.float32)}
    g = sd._street_ground(p, rows, size)  # (2, 3, S, S); the edge is vertical, at x = 0.5 half-crops right of centre
    assert np.allclose(g[0, :, :, :10], np.array([10.0, 20.0, 30.0])[:, None, None])  # the plate
    assert np.allclose(g[0, :, :, -3:], np.array([200.0, 100.0, 50.0])[:, None, None])  # the wall
    assert np.allclose(g[1].mean((1, 2)), [10.0, 20.0, 30.0], atol=8) and g[1].std((1, 2)).min() > 2  # texture


def test_street_frame_bars_cross_the_whole_crop():
    rng = np.random.default_rng(3)
    p = sd._draw_params(rng, 20, len(sd._font_table()))
    sd._draw_street(rng, p)
    p.update(angle=np.zeros(20), shear=np.zeros(20), blur=np.zeros(20), lowres=np.zeros(20, int), ty=np.zeros(20),
             height=np.full(20, 0.62), frame_gap=np.full(20, 0.2), frame_width=np.full(20, 0.1))  # bars inside the crop
    for frame, bars in ((0, 0), (3, 2)):
        p["frame"] = np.full(20, frame)
        full_rows = [(sd._render_mask(p, i, 32) > 128).all(1).sum() > 0 for i in range(20)]
        assert np.mean(full_rows) == (1.0 if bars else 0.0)


def test_synthsvhn_is_made_grey_like_svhn_for_the_mnist_experiment(tmp_path):
    cfg = DataConfig(public="synthsvhn", private="mnist", cache_dir=str(tmp_path), synth_n=30)
    check_pair(cfg)  # a colour digit set may stand in for SVHN beside grey MNIST
    data = load_dataset("synthsvhn", cfg, "public")
    x, y = make_synthdigits(30, seed=cfg.synth_seed, style="street")
    assert data.x.shape == (30, 1, 32, 32)
    assert torch.equal(data.x, _to_channels(torch.from_numpy(x), 1)) and torch.equal(data.y, torch.from_numpy(y))
    colour = load_dataset("synthsvhn", DataConfig(public="synthsvhn", private="cifar10", cache_dir=str(tmp_path),
                                                  synth_n=30), "public")
    assert torch.equal(colour.x, torch.from_numpy(x))  # kept RGB beside a colour private set
