"""The data registry: conversions, the public/private pair check, clear errors for missing sets."""

import os

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from ldm.config import make_config
from ldm.data import REGISTRY, check_pair, load_dataset, load_private, load_tuning_split, split_holdout, to_unit_range
from ldm.errors import UserError


def cfg(**kw):
    return make_config("smoke", kw).data


def test_fake_is_deterministic_labelled_and_in_range():
    a = load_dataset("fake", cfg(), "public")
    b = load_dataset("fake", cfg(), "public")
    p = load_dataset("fake", cfg(), "private")
    assert a.x.dtype == torch.uint8 and a.x.shape == (256, 1, 32, 32)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, p.x)  # the private fake set is a different draw
    counts = torch.bincount(a.y)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    u = to_unit_range(a.x)
    assert u.min() >= -1 and u.max() <= 1


def test_unknown_set_lists_valid_names():
    with pytest.raises(UserError) as e:
        check_pair(cfg(public="nosuch"))
    assert "nosuch" in str(e.value) and all(name in str(e.value) for name in REGISTRY)


def test_pair_with_mismatched_channels_is_refused():
    with pytest.raises(UserError, match="cifar10.*channel"):
        check_pair(cfg(public="cifar10", private="mnist", channels=0))
    with pytest.raises(UserError, match="mnist.*channel"):
        check_pair(cfg(public="mnist", private="cifar10", channels=0))
    check_pair(cfg(public="svhn", private="mnist", channels=0))  # SVHN digits become grayscale


def test_missing_set_offline_is_one_clear_error(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", cfg(public="cifar10", private="cifar10", channels=3, data_root=str(tmp_path)), "public")
    msg = str(e.value)
    assert "cifar10" in msg and str(tmp_path) in msg and "cifar-10-batches-py" in msg and "\n" not in msg


def test_imagenet32_from_user_npz(tmp_path):
    os.makedirs(tmp_path / "imagenet32")
    x = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imagenet32" / "train.npz", x=x, y=np.arange(20) % 7)
    d = load_dataset("imagenet32", cfg(public="imagenet32", private="cifar10", channels=3, data_root=str(tmp_path)), "public")
    assert d.x.shape == (20, 3, 32, 32) and torch.equal(d.x[3], torch.from_numpy(x[3]).permute(2, 0, 1))


def test_svhn_layout_converted_to_grayscale(tmp_path, monkeypatch):
    """SVHN as torchvision gives it ((N, 3, 32, 32), labels) becomes 1-channel luma for the digits experiment."""
    import torchvision.datasets

    class FakeSVHN:
        def __init__(self, root, split, download):
            self.data = np.full((4, 3, 32, 32), [[[10]], [[200]], [[30]]], dtype=np.uint8)
            self.labels = np.arange(4)
    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    d = load_dataset("svhn", cfg(public="svhn", private="mnist", channels=0, data_root=str(tmp_path)), "public")
    assert d.x.shape == (4, 1, 32, 32)
    assert int(d.x[0, 0, 0, 0]) == round(0.299 * 10 + 0.587 * 200 + 0.114 * 30)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "MNIST")), reason="no local MNIST copy")
def test_real_mnist_resized_to_32():
    d = load_dataset("mnist", cfg(private="mnist", data_root=SHARED_DATA), "private", split="test")
    assert d.x.shape == (10000, 1, 32, 32) and d.num_classes == 10
    assert torch.bincount(d.y).tolist()[:3] == [980, 1135, 1032]


def test_the_tuning_holdout_splits_the_training_set_in_two_disjoint_parts():
    config = make_config("smoke", {"tune_holdout": 56})
    whole = load_dataset("fake", config.data, "private")
    kept, held = load_private(config), load_tuning_split("fake", config.data, 56)
    assert (len(kept), len(held)) == (200, 56)
    assert torch.equal(torch.cat([kept.x, held.x]), whole.x) and torch.equal(torch.cat([kept.y, held.y]), whole.y)
    assert torch.equal(load_private(make_config("smoke")).x, whole.x)  # no holdout: the whole training split
    for k in (-1, 256):
        with pytest.raises(UserError, match=f"--tune-holdout {k} must be >= 0 and smaller than") as info:
            split_holdout(whole, k)
        assert "256" not in str(info.value).replace("--tune-holdout 256", "")  # the set's size is never shown
