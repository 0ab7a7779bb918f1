"""Tests for ldm/synthdigits.py: determinism, balance, the cache file, and that labels match the drawn digits."""

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
from ldm.errors import UserError
from ldm.synthdigits import cache_path, load_synthdigits, make_synthdigits

REPO = Path(__file__).resolve().parents[1]


def digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def test_same_seed_is_bit_identical_and_seeds_differ():
    x1, y1 = make_synthdigits(64, seed=3)
    x2, y2 = make_synthdigits(64, seed=3)
    x3, y3 = make_synthdigits(64, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(y1, y3)


def test_same_seed_is_bit_identical_across_processes():
    code = (
        "import hashlib; from ldm.synthdigits import make_synthdigits; "
        "x, y = make_synthdigits(40, seed=11, size=24); "
        "print(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(*make_synthdigits(40, seed=11, size=24))


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


@pytest.mark.parametrize("n, size", [(0, 32), (-5, 32), (10, 7)])
def test_bad_arguments_raise_user_error_naming_the_value(n, size, tmp_path):
    value = f"n={n}" if n < 1 else f"size={size}"
    with pytest.raises(UserError, match=re.escape(value)):
        make_synthdigits(n, seed=0, size=size)
    with pytest.raises(UserError, match=re.escape(value)):
        load_synthdigits(str(tmp_path), n, seed=0, size=size)


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


@pytest.mark.parametrize("content", ["garbage", "wrong_shape"])
def test_corrupt_cache_file_is_regenerated(tmp_path, content):
    path = cache_path(str(tmp_path), 20, seed=2)
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"not an npz file")
    else:
        np.savez(path, x=np.zeros((19, 32, 32), np.uint8), y=np.zeros(19, np.int64))
    x, y = load_synthdigits(str(tmp_path), 20, seed=2)
    assert digest(x, y) == digest(*make_synthdigits(20, seed=2))
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


def test_labels_match_the_drawn_digits(one_torch_thread):
    """A linear classifier trained on 2,000 images must read fresh ones, and plain digits, correctly.

    Fresh images (another seed) test that the label and the image agree; plain digits drawn by
    this test test that label k is the digit k and not a consistent relabelling.
    """
    torch.manual_seed(0)
    xa, ya = make_synthdigits(2000, seed=100)
    xb, yb = make_synthdigits(500, seed=200)
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
    assert fresh_acc > 0.7, f"accuracy on fresh synthdigits {fresh_acc:.2f}, chance is 0.10"
    assert clean_acc > 0.6, f"accuracy on plain digits {clean_acc:.2f}, chance is 0.10"
