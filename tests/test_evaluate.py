"""Evaluation (`ldm/evaluate.py`, run as `evaluate.py` or `python -m ldm.evaluate`, and `metrics/`): the Frechet
distance against direct float64 computations, the FID Inception network's structure and strict loading (and, with
pytorch-fid installed, its features against pytorch-fid's), every form of synthetic input through the command (same
numbers; the forms themselves: tests/test_synthetic_input.py), model selection on synthetic data only, the digit
feature network's cache, the command's one-line output and its paths (never absolute, in results/ too)."""

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
from torchvision.models.inception import Inception3, InceptionA, InceptionE

from conftest import MNIST_TEST_IMAGES, ROOT, SHARED_DATA
from ldm import evaluate
from ldm.config import DataConfig
from ldm.data import load_dataset, make_fake
from ldm.errors import UserError
from metrics import classifiers, feature_cnn
from metrics.frechet import feature_stats, frechet_distance
from metrics.inception import FIDInceptionA, FIDInceptionE, FIDInceptionV3, fid_input, load_fid_inception
from test_synthetic_input import ALL_FORMS, digits, fake_test, write_form, write_npz  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_the_tune_split_scores_instead_of_the_test_set(tmp_path, monkeypatch):
    path, scored, real_accuracy = write_npz(tmp_path / "s.npz"), [], classifiers.accuracy
    monkeypatch.setattr(classifiers, "accuracy", lambda model, x, y, **kw: scored.append(x) or real_accuracy(
        model, x, y, **kw))
    out = evaluate.run(["--synthetic", path, "--real", "fake", "--data-root", str(tmp_path), "--n-val", "100",
                        "--classifiers", "logreg", "--epochs", "1", "--no-fd", "--real-split", "tune",
                        "--tune-holdout", "40"])
    train = load_dataset("fake", DataConfig(public="fake", private="fake"), "private", "train")
    assert torch.equal(scored[-1], train.x[-40:]) and out["n_real_test"] == 40
    assert out["real_split"].startswith("tune: the last 40 images of the training split")


@pytest.mark.parametrize("flags, needle", [(["--real-split", "tune"], "--real-split tune needs --tune-holdout K >= 1"),
                                           (["--tune-holdout", "5"], "--tune-holdout 5 is read only with --real-split"),
                                           (["--real-split", "tune", "--tune-holdout", "256"], "--tune-holdout 256 must")])
def test_bad_tuning_flags_are_refused(tmp_path, flags, needle):
    path = write_npz(tmp_path / "s.npz")
    with pytest.raises(UserError, match=needle):
        evaluate.run(["--synthetic", path, "--real", "fake", "--data-root", str(tmp_path), "--n-val", "100",
                      "--classifiers", "logreg", "--no-fd", *flags])


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


@pytest.mark.skipif(not os.path.exists(MNIST_TEST_IMAGES), reason="real MNIST not available under ../shared/data")
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


def test_module_name_runs_the_same_command(tmp_path):
    """`python -m ldm.evaluate` (the name the README's protocol uses) is the command evaluate.py runs: the same
    usage (also started outside the repository, with ROOT on PYTHONPATH), and a bad input gets one `error:` line
    naming it and exit status 2."""
    missing = str(tmp_path / "missing.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def run(cmd, cwd):
        p = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
        return p.returncode, p.stdout, p.stderr

    script_help = run([os.path.join(ROOT, "evaluate.py"), "--help"], ROOT)
    assert script_help[0] == 0 and script_help[1].startswith("usage: python evaluate.py")
    assert run(["-m", "ldm.evaluate", "--help"], str(tmp_path)) == script_help
    rc, out, err = run(["-m", "ldm.evaluate", "--synthetic", missing, "--real", "fake", "--data-root", str(tmp_path)],
                       ROOT)
    assert (rc, out) == (2, "") and err.startswith("error: ") and err.count("\n") == 1 and "missing.npz" in err
