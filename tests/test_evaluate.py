"""Evaluation (`evaluate.py` and `metrics/`): the Frechet distance against direct float64 computations, the FID
Inception network's structure and strict loading (and, with pytorch-fid installed, its features against pytorch-fid's),
every form of synthetic input against the canonical one (same tensors, same numbers), the size rule, refusals of
ambiguous or bad input, model selection on synthetic data only, the digit feature network's cache, the command's
one-line output and its paths (never absolute, in results/ too)."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import Inception3, InceptionA, InceptionE

import evaluate
from conftest import ROOT, SHARED_DATA
from ldm import data as ldm_data
from ldm.config import DataConfig
from ldm.data import load_dataset, make_fake
from ldm.errors import UserError
from metrics import classifiers, feature_cnn, synthetic
from metrics.frechet import feature_stats, frechet_distance
from metrics.inception import FIDInceptionA, FIDInceptionE, FIDInceptionV3, fid_input, load_fid_inception

MNIST = os.path.join(SHARED_DATA, "MNIST", "raw", "t10k-images-idx3-ubyte")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per test: faster than two on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_gaussian(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return rng.standard_normal(d) * 2, a @ a.T / d + (0 if rank else 0.05 * np.eye(d))


def reference_fd(mu1, s1, mu2, s2):
    """Direct float64 computation: tr((S1 S2)^1/2) as the sum of square roots of the eigenvalues of S1 S2."""
    ev = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).real.sum())


# ---- Frechet distance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_distance_matches_direct_float64(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        g1, g2 = random_gaussian(rng, d), random_gaussian(rng, d)
        assert frechet_distance(*g1, *g2) == pytest.approx(reference_fd(*g1, *g2), rel=1e-9, abs=1e-9)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.standard_normal(50), rng.standard_normal(50), rng.uniform(0.01, 4, 50), rng.uniform(0, 4, 50)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-12)


def test_frechet_distance_singular_identical_and_symmetric():
    rng = np.random.default_rng(1)
    g1, g2 = random_gaussian(rng, 40, rank=5), random_gaussian(rng, 40, rank=3)  # singular S1 S2
    value = frechet_distance(*g1, *g2)
    assert np.isfinite(value) and value == pytest.approx(reference_fd(*g1, *g2), rel=1e-7)
    assert value == pytest.approx(frechet_distance(*g2, *g1), rel=1e-9)
    assert abs(frechet_distance(*g1, *g1)) < 1e-8 * np.trace(g1[1])
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(g1[0], g1[1], g2[0][:3], g2[1])


def test_frechet_distance_agrees_with_pytorch_fid_formula():
    linalg = pytest.importorskip("scipy.linalg")  # not a project dependency: an independent cross-check only
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((500, 30)), rng.standard_normal((400, 30)) @ rng.standard_normal((30, 30)) * 0.3 + 0.5
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_stats_streamed_match_numpy():
    rng = np.random.default_rng(3)
    f = (1000.0 + rng.standard_normal((1003, 12)) @ rng.standard_normal((12, 12))).astype(np.float32)
    batches = (torch.from_numpy(f[i:i + 97]) for i in range(0, len(f), 97))
    mu, sigma = feature_stats(batches)
    f64 = f.astype(np.float64)
    assert np.allclose(mu, f64.mean(0), rtol=0, atol=1e-10)
    assert np.allclose(sigma, np.cov(f64, rowvar=False), rtol=1e-10, atol=1e-10)


# ---- FID Inception network --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_inception_has_torchvision_names_and_shapes_with_1008_classes(inception):
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    mine = inception.state_dict()
    assert list(mine) == list(ref)  # the layout pytorch-fid loads its weights into, strictly
    assert all(mine[k].shape == ref[k].shape for k in ref)
    assert mine["fc.weight"].shape == (1008, 2048)


def test_fid_blocks_pool_like_tensorflow():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9)
    ours, tv = FIDInceptionA(8, pool_features=4).eval(), InceptionA(8, pool_features=4).eval()
    tv.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert torch.equal(a[:, :224], b[:, :224])  # the convolution branches are torchvision's
    assert torch.allclose(a[:, 224:, 1:-1, 1:-1], b[:, 224:, 1:-1, 1:-1], atol=1e-6)  # interior: same average
    assert not torch.allclose(a[:, 224:, 0], b[:, 224:, 0], atol=1e-4)  # border: padding not counted
    e = FIDInceptionE(8, pool="max").eval()
    with torch.no_grad():
        pool_branch = e(x)[:, -192:]
        expected = e.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
    assert torch.equal(pool_branch, expected)
    assert e.state_dict().keys() == InceptionE(8).state_dict().keys()


def test_inception_strict_load_and_2048_features(inception, tmp_path):
    path = tmp_path / "pt_inception.pth"
    state = inception.state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)  # as old files
    loaded = load_fid_inception(str(path))
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a, b = inception(fid_input(x)), loaded(fid_input(x))
    assert fid_input(x).shape == (2, 3, 299, 299) and a.shape == (2, 2048)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_inception_mismatched_weights_are_clear_errors(inception, tmp_path):
    state = inception.state_dict()
    dropped = dict(state)
    del dropped["Mixed_7c.branch_pool.conv.weight"]
    torch.save(dropped, tmp_path / "dropped.pth")
    with pytest.raises(UserError) as e:
        load_fid_inception(str(tmp_path / "dropped.pth"))
    assert "dropped.pth" in str(e.value) and "missing Mixed_7c.branch_pool.conv.weight" in str(e.value)
    imagenet = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                              "AuxLogits.fc.weight": torch.zeros(1000, 768)})  # like torchvision's weights
    torch.save(imagenet, tmp_path / "tv.pth")
    with pytest.raises(UserError, match=r"unexpected AuxLogits.fc.weight.*fc.weight has shape \(1000, 2048\)"):
        load_fid_inception(str(tmp_path / "tv.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth is not a PyTorch state dict"):
        load_fid_inception(str(tmp_path / "junk.pth"))


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


@pytest.mark.skipif(not os.path.exists(MNIST), reason="real MNIST not available under ../shared/data")
def test_mnist_at_the_eval_size_is_the_original_digits():
    cfg = evaluate.real_data_config(evaluate.parse_args(["--synthetic", "s.npz", "--data-root", SHARED_DATA]))
    test = load_dataset("mnist", cfg, "private", split="test")
    with open(MNIST, "rb") as f:
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


# ---- model selection on synthetic data only -----------------------------------------------------------------

def test_real_test_set_is_used_once_per_classifier_after_training(fake_test, tmp_path, monkeypatch):
    path = write_npz(tmp_path / "s.npz")
    calls, real_accuracy = [], classifiers.accuracy

    def recording_accuracy(model, x, y, **kw):
        is_real = x.shape == fake_test.x.shape and torch.equal(x, fake_test.x)
        calls.append("real_test" if is_real else f"synthetic_{len(x)}")
        return real_accuracy(model, x, y, **kw)

    monkeypatch.setattr(classifiers, "accuracy", recording_accuracy)
    out = evaluate.run(["--synthetic", path, "--real", "fake", "--data-root", str(tmp_path), "--n-val", "100",
                        "--classifiers", "logreg,mlp", "--epochs", "3", "--no-fd"])
    per_classifier = ["synthetic_100"] * 3 + ["real_test"]  # 3 epochs selected on synthetic val, then test once
    assert calls == per_classifier * 2
    for name in ("logreg", "mlp"):
        r = out["accuracy"][name]
        assert r["val_accuracy_synthetic"] == max(r["val_history_synthetic"])
        assert r["epoch"] == 1 + r["val_history_synthetic"].index(r["val_accuracy_synthetic"])


def test_train_and_select_keeps_best_epoch_and_is_deterministic():
    x, y = make_fake(200, 1, 32, seed=9)
    results = []
    for _ in range(2):
        model = classifiers.build_classifier("cnn", 1, 32, 10, seed=3)
        model, sel = classifiers.train_and_select(model, x[:150], y[:150], x[150:], y[150:], 4, 32, 1e-3, seed=3)
        assert classifiers.accuracy(model, x[150:], y[150:]) == sel.val_accuracy  # the kept weights are the best
        results.append((sel, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


# ---- the digit-classifier Frechet distance and FID through the command -----------------------------------

def test_feature_network_is_cached_atomically_and_reused(tmp_path, monkeypatch):
    cfg = DataConfig(public="fake", private="fake", cache_dir=str(tmp_path / "cache"))
    recipe, cpu = classifiers.FeatureRecipe(epochs=1), torch.device("cpu")
    net, info = feature_cnn.feature_network(cfg, cpu, recipe)
    assert info["trained_now"] and os.listdir(tmp_path / "cache" / "eval") == ["feature_cnn_fake_32px_1ch.pt"]
    monkeypatch.setattr(classifiers, "train_feature_cnn", lambda *a: pytest.fail("retrained a cached network"))
    again, info2 = feature_cnn.feature_network(cfg, cpu, recipe)
    assert not info2["trained_now"] and info2["train_accuracy"] == info["train_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    (tmp_path / "cache" / "eval" / "feature_cnn_fake_32px_1ch.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt.*delete it"):
        feature_cnn.feature_network(cfg, cpu, recipe)


class TinyFeatures(nn.Module):
    """Stands in for the Inception network (same input, 8-d features) to test the FID wiring quickly."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 8)

    def forward(self, x):  # (B, 3, 299, 299) -> (B, 8)
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))


def test_command_fd_and_fid_are_zero_for_the_real_set_itself(fake_test, tmp_path, monkeypatch):
    same = write_npz(tmp_path / "same.npz", x=fake_test.x[:, 0].numpy(), y=fake_test.y.numpy())
    other = write_npz(tmp_path / "other.npz", n=256, seed=11)
    (tmp_path / "w.pth").write_bytes(b"")
    torch.manual_seed(0)
    monkeypatch.setattr(evaluate, "load_fid_inception", lambda path: TinyFeatures())
    args = ["--real", "fake", "--data-root", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--n-val", "50",
            "--classifiers", "none", "--inception-weights", str(tmp_path / "w.pth")]
    a = evaluate.run(["--synthetic", same, *args])
    b = evaluate.run(["--synthetic", other, *args])
    assert a["accuracy"] == {} and "NOT FID" in a["fd_digit_classifier"]["note"]
    assert abs(a["fd_digit_classifier"]["value"]) < 1e-9 and abs(a["fid"]["value"]) < 1e-9
    assert b["fd_digit_classifier"]["value"] > 1e-7 and b["fid"]["value"] > 1e-7  # another draw of the fake set
    assert a["fd_digit_classifier"]["feature_cnn"]["trained_now"] and not b["fd_digit_classifier"]["feature_cnn"]["trained_now"]
    assert os.path.exists(tmp_path / "cache" / "eval" / "feature_cnn_fake_32px_1ch.pt")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """A cache folder shared by the command tests below, so that the feature CNN of each size is trained once."""
    return str(tmp_path_factory.mktemp("cache"))


def seeded_tiny_features(path):
    with classifiers.seeded(0):
        return TinyFeatures()


def command_result(synthetic_path, tmp_path, feature_cache, monkeypatch, *extra):
    """evaluate.run on the fake real set at 28x28, with every metric: cnn and logreg, the digit FD, a stand-in FID."""
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setattr(evaluate, "load_fid_inception", seeded_tiny_features)
    return evaluate.run(["--synthetic", synthetic_path, "--real", "fake", "--eval-size", "28", "--data-root",
                         str(tmp_path), "--cache-dir", feature_cache, "--n-val", "100", "--classifiers", "cnn,logreg",
                         "--epochs", "2", "--inception-weights", str(tmp_path / "w.pth"), *extra])


def numbers(result):
    """The metrics of a result, without timings and without the record of how the input was read."""
    accuracy = {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in result["accuracy"].items()}
    fd = {k: v for k, v in result["fd_digit_classifier"].items() if k != "feature_cnn"}
    return accuracy, fd, result["fid"], result["n_synthetic"], result["n_train"], result["eval_size"]


@pytest.fixture(scope="module")
def canonical_numbers(digits, tmp_path_factory, feature_cache):
    tmp = tmp_path_factory.mktemp("canonical")
    with pytest.MonkeyPatch.context() as mp:
        return numbers(command_result(write_npz(tmp / "c.npz", x=digits[0], y=digits[1]), tmp, feature_cache, mp))


@pytest.mark.parametrize("form", [f for f in ALL_FORMS if f != "uint8 (N, H, W)"])
def test_every_form_gives_the_same_numbers_through_the_command(digits, canonical_numbers, tmp_path, feature_cache,
                                                                monkeypatch, form):
    result = command_result(write_form(tmp_path, digits, form), tmp_path, feature_cache, monkeypatch)
    assert numbers(result) == canonical_numbers  # accuracies, Frechet distances and FID, exactly
    assert result["synthetic_input"]["resized"].startswith("32x32 -> 28x28, least-squares inverse")


def test_stdout_is_one_json_line_and_paths_are_never_absolute(fake_test, tmp_path, feature_cache, monkeypatch, capsys):
    path = write_npz(tmp_path / "s.npz")
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setattr(evaluate, "load_fid_inception", seeded_tiny_features)
    argv = ["--synthetic", path, "--real", "fake", "--data-root", str(tmp_path), "--cache-dir", feature_cache,
            "--n-val", "100", "--classifiers", "logreg", "--epochs", "1", "--inception-weights", str(tmp_path / "w.pth"),
            "--out", str(tmp_path / "eval.json")]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("}\n")
    result = json.loads(out)
    assert result == json.load(open(tmp_path / "eval.json"))
    assert (result["synthetic_file"], result["fid"]["weights"]) == ("s.npz", "w.pth")  # outside the repo: names
    assert result["fd_digit_classifier"]["feature_cnn"]["cache"] == "feature_cnn_fake_32px_1ch.pt"
    assert not [s for s in json_strings(result) if ABSOLUTE.search(s)]
    assert evaluate.portable_path(os.path.join(ROOT, "results", "x.npz")) == os.path.join("results", "x.npz")
    assert evaluate.portable_path(os.path.join(ROOT, "results", "synth") + os.sep) == os.path.join("results", "synth")
    assert evaluate.portable_path(str(tmp_path / "synth") + os.sep) == "synth"


def test_fid_reference_chooses_the_real_split(tmp_path, feature_cache, monkeypatch):
    loaded, real_load = [], evaluate.load_dataset
    monkeypatch.setattr(evaluate, "load_dataset", lambda *a, split: loaded.append(split) or real_load(*a, split=split))
    path = write_npz(tmp_path / "s.npz")
    default = command_result(path, tmp_path, feature_cache, monkeypatch, "--classifiers", "none", "--no-fd")
    assert loaded == ["test"] and default["fid"]["reference"] == "fake test split"
    train = command_result(path, tmp_path, feature_cache, monkeypatch, "--classifiers", "none", "--no-fd",
                           "--fid-reference", "train")
    assert loaded == ["test", "test", "train"] and train["fid"]["reference"] == "fake train split"
    assert "against the real train split" in train["fid"]["note"]


ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])|/(work|tmp|root|home|Users|mnt)(/|$)")


def json_strings(obj):
    """Every string (keys and values) in a parsed JSON object."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_strings(v)


def test_committed_results_hold_no_absolute_paths():
    files = sorted(set(glob.glob(os.path.join(ROOT, "results", "*.json"))
                       + glob.glob(os.path.join(ROOT, "results", "**", "*.json"), recursive=True)))
    assert files
    found = [(os.path.relpath(f, ROOT), s) for f in files for s in json_strings(json.load(open(f))) if ABSOLUTE.search(s)]
    assert not found, f"absolute paths in committed results: {found[:5]}"


# ---- against pytorch-fid (a test-only dependency: .venv/bin/pip install pytorch-fid) -------------------------

def randomize_(net, seed):
    """Random weights and BatchNorm statistics of a realistic scale (He-normal convolutions), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net


def test_inception_matches_pytorch_fid_with_the_same_random_weights(monkeypatch):
    pfid = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid not installed (test-only dependency, "
                               "not in requirements.txt: .venv/bin/pip install pytorch-fid)")
    ours = randomize_(FIDInceptionV3(), seed=0).eval()
    state = ours.state_dict()
    # pytorch-fid builds its network and loads the weights file strictly: hand it our state instead of downloading
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: {k: v.clone() for k, v in state.items()})
    theirs = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    seen = []
    theirs.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    g = torch.Generator().manual_seed(1)
    for x in (torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)):
        unit = x.float().div(255.0).expand(-1, 3, -1, -1)  # what pytorch-fid's loader gives: RGB in [0, 1]
        with torch.no_grad():
            a, b = ours(fid_input(x)), theirs(unit)[0].flatten(1)
        assert torch.allclose(seen.pop(), fid_input(x), rtol=0, atol=1e-6)  # the resize to 299 and the scaling
        assert a.shape == b.shape == (len(x), 2048) and a.abs().max() > 1e-2
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())


def test_frechet_distance_agrees_with_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score", reason="pytorch-fid not installed (test-only dependency, "
                                    "not in requirements.txt: .venv/bin/pip install pytorch-fid)")
    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((600, 40)), rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40)) * 0.3 + 0.2
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2),
                                                               rel=1e-8)


@pytest.mark.skipif(not os.path.exists(MNIST), reason="real MNIST not available under ../shared/data")
def test_command_on_mnist_prints_one_json_object(tmp_path):
    cfg = DataConfig(public="mnist", private="mnist", data_root=SHARED_DATA)
    train = load_dataset("mnist", cfg, "private", split="train")
    path = str(tmp_path / "synth.npz")
    np.savez(path, x=train.x[:3000, 0].numpy(), y=train.y[:3000].numpy())  # stand-in "synthetic" set
    out = str(tmp_path / "eval.json")
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--synthetic", path, "--real", "mnist",
           "--data-root", SHARED_DATA, "--n-val", "500", "--classifiers", "logreg,mlp", "--epochs", "3", "--no-fd",
           "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1  # exactly one JSON object, on one line, on stdout; progress went to stderr
    result = json.loads(proc.stdout)
    assert result == json.load(open(out))
    assert result["eval_size"] == 28 and result["synthetic_file"] == "synth.npz"  # MNIST's native size; no path
    assert result["synthetic_input"]["resized"].startswith("32x32 -> 28x28")  # the 32x32 stand-in, resized
    assert {"synthetic_file", "n_synthetic", "n_train", "n_val", "real_set", "n_real_test", "accuracy",
            "fd_digit_classifier", "fid", "seeds", "device", "protocol"} <= set(result)
    assert (result["n_synthetic"], result["n_train"], result["n_val"], result["n_real_test"]) == (3000, 2500, 500, 10000)
    assert result["fid"] is None and result["fd_digit_classifier"] is None
    for name in ("logreg", "mlp"):
        r = result["accuracy"][name]
        assert r["test_accuracy"] > 0.6 and 1 <= r["epoch"] <= 3  # chance is 0.1
