"""The synthetic set in every form other tools write (metrics/synthetic.py, metrics/image_folder.py): each loads
as the canonical digits, the one size rule, what was read is recorded, and ambiguous or bad input is refused
with one clear line. The same forms through the whole command: tests/test_evaluate.py."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import MNIST_TEST_IMAGES, SHARED_DATA
from ldm import data as ldm_data
from ldm import evaluate
from ldm.config import DataConfig
from ldm.data import load_dataset, make_fake
from ldm.errors import UserError
from metrics import synthetic


pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the synthetic set: the forms other tools write ---------------------------------------------------------

@pytest.fixture(scope="module")
def fake_test():
    return load_dataset("fake", DataConfig(public="fake", private="fake"), "private", "test")


def write_npz(path, n=300, seed=5, **override):
    x, y = make_fake(n, 1, 32, seed)
    arrays = dict(x=x[:, 0].numpy(), y=y.numpy())
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def write_image_folder(root, x, y):
    """x: (N, H, W) uint8 -> root/<label>/<index>.png plus root/card.json, the layout sample.py writes."""
    os.makedirs(root)
    for i, (image, label) in enumerate(zip(x, y)):
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, str(label), f"{i:03d}.png"))
    with open(os.path.join(root, "card.json"), "w") as f:
        f.write("{}")
    return str(root)


@pytest.fixture(scope="module")
def digits():
    """The canonical form, (N, H, W) uint8 32x32 with int64 labels, in class order (the order a folder is read in)."""
    x, y = make_fake(300, 1, 32, seed=5)
    order = np.argsort(y.numpy(), kind="stable")
    return x[:, 0].numpy()[order], y.numpy()[order]


FORMS = {  # name -> (N, H, W) uint8 -> the same digits as another tool might store them
    "uint8 (N, H, W)": lambda u: u,
    "uint8 (N, 1, H, W)": lambda u: u[:, None],
    "uint8 (N, H, W, 1)": lambda u: u[..., None],
    "uint8 gray (N, H, W, 3)": lambda u: np.repeat(u[..., None], 3, axis=-1),
    "float32 [0, 1] (N, H, W)": lambda u: (u / 255.0).astype(np.float32),
    "float32 [0, 1] (N, H, W, 1)": lambda u: (u[..., None] / 255.0).astype(np.float32),
    "float64 [-1, 1] (N, 1, H, W)": lambda u: u[:, None] / 127.5 - 1.0,
    "float32 [-1, 1] (N, H, W)": lambda u: (u / 127.5 - 1.0).astype(np.float32),
}


def write_form(tmp_path, digits, form):
    x, y = digits
    if form == "ImageFolder":
        return write_image_folder(tmp_path / "synth", x, y)
    if form == "labels, not y":
        return write_npz(tmp_path / "s.npz", x=x, y=None, labels=y)
    if form == "y and labels, equal":
        return write_npz(tmp_path / "s.npz", x=x, y=y, labels=y.copy())
    return write_npz(tmp_path / "s.npz", x=FORMS[form](x), y=y)


ALL_FORMS = [*FORMS, "labels, not y", "y and labels, equal", "ImageFolder"]


@pytest.mark.parametrize("form", ALL_FORMS)
@pytest.mark.parametrize("size", [32, 28])
def test_every_form_loads_as_the_canonical_digits(digits, fake_test, tmp_path, form, size):
    real = fake_test if size == 32 else load_dataset("fake", DataConfig(public="fake", private="fake", image_size=28),
                                                     "private", "test")
    canonical, _ = synthetic.load_synthetic(write_npz(tmp_path / "c.npz", x=digits[0], y=digits[1]), real)
    s, info = synthetic.load_synthetic(write_form(tmp_path, digits, form), real)
    assert s.x.shape == (300, 1, size, size) and s.x.dtype == torch.uint8 and s.y.dtype == torch.int64
    assert torch.equal(s.x, canonical.x) and torch.equal(s.y, canonical.y)
    assert torch.equal(canonical.y, torch.from_numpy(digits[1]))
    assert (info["resized"] is None) == (size == 32)


def test_larger_images_come_back_by_the_inverse_of_the_real_sets_resize(tmp_path):
    """32 -> 28: the least-squares inverse of ldm/data.py's 28 -> 32 resize, which undoes it up to rounding."""
    real = load_dataset("fake", DataConfig(public="fake", private="fake", image_size=28), "private", "test")
    up = ldm_data._resize(real.x, 32)  # (256, 1, 32, 32): real images as this project trains on them
    s, info = synthetic.load_synthetic(write_npz(tmp_path / "s.npz", x=up[:, 0].numpy(), y=real.y.numpy()), real)
    error = (s.x.int() - real.x.int()).abs()
    assert error.max() <= 3 and error.float().mean() < 0.5  # only the rounding of the 32x32 images, amplified
    plain = F.interpolate(up.float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    assert (plain.round() - real.x.float()).abs().mean() > 10 * error.float().mean()  # a plain resize does not undo it
    assert info["resized"] == "32x32 -> 28x28, least-squares inverse of ldm/data.py's antialiased bilinear resize 28 -> 32"
    r = synthetic.resize_matrix(28, 32)  # (32, 28), the resize of one axis
    x = torch.rand(28, 28, dtype=torch.float64)
    assert torch.allclose(r @ x @ r.T, F.interpolate(x[None, None], size=(32, 32), mode="bilinear", antialias=True,
                                                      align_corners=False)[0, 0], atol=1e-12)
    assert torch.allclose(torch.linalg.pinv(r) @ r, torch.eye(28, dtype=torch.float64), atol=1e-10)


def test_smaller_images_are_resized_as_the_real_sets_are(fake_test, tmp_path):
    """28 -> 32: ldm/data.py's resize itself, as it brings a real set of native side 28 to 32."""
    x, y = make_fake(300, 1, 28, seed=5)
    s, info = synthetic.load_synthetic(write_npz(tmp_path / "s.npz", x=x[:, 0].numpy(), y=y.numpy()), fake_test)
    assert torch.equal(s.x, ldm_data._resize(x, 32))
    assert info["resized"] == "28x28 -> 32x32, ldm/data.py's antialiased bilinear resize"


def test_read_as_is_recorded(digits, fake_test, tmp_path):
    _, info = synthetic.load_synthetic(write_form(tmp_path, digits, "float64 [-1, 1] (N, 1, H, W)"), fake_test)
    assert info == {"format": "npz", "shape": [300, 1, 32, 32], "dtype": "float64", "layout": "(N, C, H, W)",
                    "values": "float [-1, 1]", "labels": "y", "channels": 1, "resized": None}
    _, info = synthetic.load_synthetic(write_form(tmp_path, digits, "ImageFolder"), fake_test)
    assert info["format"] == "ImageFolder" and info["classes"] == [str(k) for k in range(10)]


@pytest.mark.parametrize("override, message", [
    (dict(y=None), r"has no y \(or labels\) .*needs images x and integer labels y"),
    (dict(x=np.zeros((300, 3, 3, 3), np.uint8)), r"shape \(300, 3, 3, 3\) and both axis 1 and axis 3 have size 1 or 3"),
    (dict(x=np.zeros((300, 1, 32, 1), np.uint8)), r"shape \(300, 1, 32, 1\) and both axis 1 and axis 3"),
    (dict(x=np.zeros((300, 4, 32, 32), np.uint8)), r"shape \(300, 4, 32, 32\) and neither axis 1 nor axis 3 .*cannot be decided"),
    (dict(x=np.zeros((300, 32, 32, 32), np.float32)), r"shape \(300, 32, 32, 32\) and neither"),
    (dict(x=np.zeros((300, 1, 1, 32, 32), np.uint8)), r"shape \(300, 1, 1, 32, 32\); expected \(N, H, W\)"),
    (dict(x=np.zeros((300, 1024), np.uint8)), r"shape \(300, 1024\); expected"),
    (dict(x=np.zeros((0, 32, 32), np.uint8), y=np.zeros(0, np.int64)), r"shape \(0, 32, 32\), no images"),
    (dict(x=np.full((300, 32, 32), 2.5, np.float32)), r"min 2.5 and max 2.5, outside \[-1, 1\]"),
    (dict(x=np.linspace(-255, 255, 300 * 32 * 32).reshape(300, 32, 32)), r"min -255 and max 255, outside \[-1, 1\]"),
    (dict(x=np.full((300, 32, 32), np.nan, np.float32)), "NaN or infinite"),
    (dict(x=np.zeros((300, 32, 32), np.int16)), r"x is int16; .*cast it to uint8"),
    (dict(x=np.zeros((300, 32, 28), np.uint8)), r"images are 32x28 .*only square"),
    (dict(labels=np.arange(300)[::-1] % 10), r"both y \(300,\) and labels \(300,\) and they differ"),
    (dict(labels=np.arange(299) % 10), r"both y \(300,\) and labels \(299,\) and they differ"),
    (dict(y=np.arange(300) % 7), "class\\(es\\) 7, 8, 9 of fake have no synthetic images"),
    (dict(y=np.arange(300) % 11), "labels must lie in 0..9"),
    (dict(y=np.zeros(299, np.int64)), r"labels y are int64 of shape \(299,\), but x \(300, 32, 32\) holds 300 images"),
    (dict(y=np.zeros((300, 1), np.int64)), r"shape \(300, 1\), but x \(300, 32, 32\) holds 300 images: expected 300 integer labels"),
    (dict(y=np.zeros(300, np.float32)), r"are float32 of shape \(300,\)"),
])
def test_bad_npz_is_a_clear_error(fake_test, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        synthetic.load_synthetic(write_npz(tmp_path / "s.npz", **override), fake_test)


def test_gray_images_for_a_colour_set_are_refused(tmp_path):
    rgb = load_dataset("fake", DataConfig(public="fake", private="fake", channels=3), "private", "test")
    with pytest.raises(UserError, match="images have 1 channel\\(s\\), the real set 'fake' has 3"):
        synthetic.load_synthetic(write_npz(tmp_path / "s.npz"), rgb)


def test_bad_image_folders_are_clear_errors(digits, fake_test, tmp_path):
    x, y = digits
    def refused(root, message):
        with pytest.raises(UserError, match=message):
            synthetic.load_synthetic(str(root), fake_test)

    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "card.json").write_text("{}")
    refused(tmp_path / "empty", "a folder without class sub-folders")
    one_based = write_image_folder(tmp_path / "one_based", x, y + 1)  # folders 1..10: sorted 1, 10, 2, ...
    refused(one_based, r"folder '1' would get class index 0; number them 0..9 and zero-pad")
    nine = write_image_folder(tmp_path / "nine", x[y < 9], y[y < 9])
    refused(nine, r"has 9 class folders \(0, 1, 2, 3, 4, 5, 6, 7, 8\), fake has 10 classes")
    jpeg = write_image_folder(tmp_path / "jpeg", x, y)
    Image.fromarray(x[0]).save(os.path.join(jpeg, "3", "extra.jpg"))
    refused(jpeg, r"extra.jpg is not a PNG; only lossless 8-bit PNG")
    mixed = write_image_folder(tmp_path / "mixed", x, y)
    Image.fromarray(x[0][:28, :28]).save(os.path.join(mixed, "5", "zzz.png"))
    refused(mixed, r"zzz.png has \(C, H, W\) \(1, 28, 28\) but .*000.png has \(1, 32, 32\)")
    deep = write_image_folder(tmp_path / "deep", x, y)
    Image.fromarray(x[0].astype(np.uint16) * 257).save(os.path.join(deep, "0", "zzz.png"))  # 16-bit PNG
    refused(deep, r"zzz.png has PNG mode 'I;16' .*write 8-bit")


def test_default_eval_size_is_the_real_sets_native_side():
    size = lambda real: evaluate.parse_args(["--synthetic", "s.npz", "--real", real]).eval_size
    assert (size("mnist"), size("emnist-letters"), size("cifar10"), size("svhn"), size("fake")) == (28, 28, 32, 32, 32)
    assert set(synthetic.NATIVE_SIZE) <= set(ldm_data.REGISTRY)
    assert evaluate.parse_args(["--synthetic", "s.npz", "--eval-size", "32"]).eval_size == 32


@pytest.mark.skipif(not os.path.exists(MNIST_TEST_IMAGES), reason="real MNIST not available under ../shared/data")
def test_mnist_at_the_eval_size_is_the_original_digits():
    cfg = evaluate.real_data_config(evaluate.parse_args(["--synthetic", "s.npz", "--data-root", SHARED_DATA]))
    test = load_dataset("mnist", cfg, "private", split="test")
    with open(MNIST_TEST_IMAGES, "rb") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 1, 28, 28)  # IDX: 16-byte header
    assert cfg.image_size == 28 and torch.equal(test.x, torch.from_numpy(raw.copy()))  # no padding, no resize


def test_bad_input_from_the_command_is_one_line_exit_2(tmp_path, capsys):
    def command(path, *extra):
        return ["--synthetic", path, "--real", "fake", "--data-root", str(tmp_path), "--no-fd", *extra]

    assert evaluate.main(command(write_npz(tmp_path / "s.npz", y=np.arange(300) % 9), "--n-val", "100")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "class(es) 9" in err and err.count("\n") == 1
    ok = write_npz(tmp_path / "ok.npz")
    assert evaluate.main(command(ok, "--n-val", "200")) == 2
    assert "needs at least 400" in capsys.readouterr().err
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
    assert evaluate.main(command(ok, "--n-val", "100", "--inception-weights", str(tmp_path / "w.pth"))) == 2
    err = capsys.readouterr().err
    assert "w.pth does not match the FID Inception network" in err and err.count("\n") == 1
    assert evaluate.main(command(ok, "--fid-reference", "train")) == 2
    assert "--fid-reference train needs --inception-weights" in capsys.readouterr().err


def test_real_data_config_is_built_from_the_flags_not_a_training_preset(tmp_path, capsys):
    def config(*extra):
        return evaluate.real_data_config(evaluate.parse_args(["--synthetic", "s.npz", "--data-root", str(tmp_path),
                                                              *extra]))

    assert config("--real", "fake", "--eval-size", "28", "--channels", "3") == DataConfig(
        public="fake", private="fake", data_root=str(tmp_path), image_size=28, channels=3)  # 28: no model factor
    assert config("--cache-dir", str(tmp_path / "c")).cache_dir == str(tmp_path / "c")
    assert config().cache_dir == DataConfig().cache_dir and config().private == "mnist"
    assert config().image_size == 28
    with pytest.raises(UserError, match="unknown --real data set 'digits'"):
        config("--real", "digits")
    assert evaluate.main(["--synthetic", "s.npz", "--real", "fake", "--channels", "2"]) == 2
    assert "--channels must be 0 (automatic), 1 or 3, got 2" in capsys.readouterr().err
    assert evaluate.main(["--synthetic", "s.npz", "--real", "fake", "--eval-size", "3"]) == 2
    assert "--eval-size must be at least 4" in capsys.readouterr().err
