"""sample.py's provenance: every .npz and PNG says which checkpoint, stage and (epsilon, delta) it came from."""

import json
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from ldm.build import build_diffusion, latent_shape
from ldm.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from ldm.sampling import generate

FLAGS = ["--preset", "smoke", "--ae-steps", "10", "--pretrain-steps", "10", "--ckpt-every", "10", "--log-every", "5",
         "--noise-seed", "1"]
QUICK = ["--n", "6", "--steps", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny smoke run with all four stages (about 30 s on 2 cores), shared by every test here."""
    out = str(tmp_path_factory.mktemp("run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the --noise-seed warning
        assert train.main([*FLAGS, "--stage", "all", "--out", out]) == 0
        assert train.main([*FLAGS, "--stage", "finetune-nonprivate", "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def dp_ckpt(run_dir, tmp_path_factory):
    """A DP fine-tuning checkpoint that carries differentially_private and privacy_report.

    dp/finetune.py is gaining those two keys; until it writes them, the real finetune.pt of the run is loaded,
    given the run's own privacy_report.json, and saved with save_checkpoint. Once the keys exist the real
    checkpoint is used as it is.
    """
    path = os.path.join(run_dir, "finetune.pt")
    state, _ = load_checkpoint(path)
    if "privacy_report" in state:
        return path
    with open(os.path.join(run_dir, "privacy_report.json")) as f:
        report = json.load(f)
    labelled = os.path.join(str(tmp_path_factory.mktemp("labelled")), "finetune.pt")
    save_checkpoint(labelled, dict(state, differentially_private=True, privacy_report=report))
    return labelled


def npz_metadata(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["metadata"][()]))


def png_metadata(path):
    with Image.open(path) as im:
        return json.loads(im.text["metadata"])


def card(path):
    with open(os.path.splitext(path)[0] + ".card.json") as f:
        return json.load(f)


def test_dp_checkpoint_npz_and_card_carry_its_privacy_report(dp_ckpt, run_dir, tmp_path):
    out = str(tmp_path / "synth.npz")
    assert sample.main(["--ckpt", dp_ckpt, *QUICK, "--eta", "0.5", "--out", out]) == 0
    report = load_checkpoint(dp_ckpt)[0]["privacy_report"]
    with open(os.path.join(run_dir, "privacy_report.json")) as f:
        assert json.load(f)["epsilon"] == report["epsilon"]  # the checkpoint's report is the run's report
    meta = npz_metadata(out)
    assert meta == card(out) and os.path.exists(tmp_path / "synth.card.json")
    assert meta["differentially_private"] is True and meta["stage"] == "finetune"
    assert meta["epsilon"] == report["epsilon"] and 0 < meta["epsilon"] <= 10.0
    assert meta["delta"] == report["delta"] == 1e-5
    assert meta["neighbouring_relation"] == report["neighbouring_relation"] == "add/remove one example"
    assert meta["accountant"] == report["accountant"] and meta["privacy_report"] == report
    assert (meta["private_set"], meta["public_set"], meta["preset"]) == ("fake", "fake", "smoke")
    assert meta["checkpoint"] == "finetune.pt" and meta["checkpoint_step"] == report["steps"]
    assert meta["checkpoint_finished"] is True
    assert meta["sampling"] == dict(sampler="ddim", steps=2, eta=0.5, seed=0, n=6, labels=list(range(10)),
                                    batch_size=256, device="cpu")
    assert meta["created_by"] == "dp-ldm sample.py" and "post-processing" in meta["post_processing"]
    assert meta["warning"] is None


def test_an_unfinished_checkpoint_is_sampled_with_a_warning_and_labelled_unfinished(dp_ckpt, tmp_path, capsys):
    state, _ = load_checkpoint(dp_ckpt)
    cut = str(tmp_path / "finetune.pt")
    save_checkpoint(cut, dict(state, done=False))  # as a run killed after its last periodic checkpoint leaves it
    out = str(tmp_path / "cut.npz")
    assert sample.main(["--ckpt", cut, *QUICK, "--out", out]) == 0
    assert "is not finished (step" in capsys.readouterr().err
    assert npz_metadata(out)["checkpoint_finished"] is False and card(out)["checkpoint_finished"] is False


def test_npz_loads_without_pickle_and_x_y_are_the_samples(run_dir, tmp_path):
    ckpt, out = os.path.join(run_dir, "pretrain.pt"), str(tmp_path / "s.npz")
    assert sample.main(["--ckpt", ckpt, "--n", "5", "--steps", "2", "--seed", "4", "--labels", "3,7",
                        "--out", out]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert sorted(f.files) == ["metadata", "x", "y"]
        x, y, meta = f["x"], f["y"], f["metadata"]
    assert meta.shape == () and meta.dtype.kind == "U"
    cfg, _, ae, unet = sample.load_model(ckpt, torch.device("cpu"))
    labels = torch.tensor([3, 7, 3, 7, 3])
    want = generate(ae, unet, build_diffusion(cfg), labels, latent_shape(cfg), 2, cfg.diffusion.eta,
                    torch.Generator().manual_seed(4), progress=False)
    assert x.dtype == np.uint8 and x.shape == (5, 32, 32) and np.array_equal(x, want[:, 0].numpy())
    assert y.dtype == np.int64 and y.tolist() == labels.tolist()


def test_nonprivate_baseline_is_labelled_not_private_in_npz_png_and_cards(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, "finetune-nonprivate.pt")
    warning = load_checkpoint(ckpt)[0]["warning"]
    assert "NOT differentially private" in warning
    for name, read in (("synth.npz", npz_metadata), ("grid.png", png_metadata)):
        out = str(tmp_path / name)
        assert sample.main(["--ckpt", ckpt, *QUICK, "--out", out]) == 0
        meta = read(out)  # in the data file itself, not only in the card
        assert meta == card(out)
        assert meta["differentially_private"] is False and meta["warning"] == warning
        assert meta["stage"] == "finetune-nonprivate" and meta["checkpoint"] == "finetune-nonprivate.pt"
        assert meta["epsilon"] is None and meta["delta"] is None and meta["accountant"] is None
        assert meta["private_set"] == "fake" and "no privacy guarantee" in meta["privacy"]
    assert os.path.exists(tmp_path / "grid.card.json") and os.path.exists(tmp_path / "synth.card.json")


def test_pretrain_samples_are_labelled_public_data_only(run_dir, tmp_path):
    out = str(tmp_path / "grid.png")
    assert sample.main(["--ckpt", os.path.join(run_dir, "pretrain.pt"), *QUICK, "--out", out]) == 0
    meta = png_metadata(out)
    assert meta == card(out)
    assert meta["differentially_private"] is None and meta["privacy"] == "public data only: no private data was used"
    assert meta["stage"] == "pretrain" and meta["private_set"] is None and meta["public_set"] == "fake"
    assert meta["epsilon"] is None and meta["delta"] is None and meta["accountant"] is None
    assert meta["neighbouring_relation"] is None and meta["warning"] is None


def strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_card_names_files_never_absolute_paths(dp_ckpt, tmp_path):
    out = os.path.abspath(str(tmp_path / "synth.npz"))
    assert os.path.isabs(dp_ckpt)
    assert sample.main(["--ckpt", dp_ckpt, *QUICK, "--out", out]) == 0
    text = open(os.path.splitext(out)[0] + ".card.json").read()
    machine = (os.path.dirname(dp_ckpt), str(tmp_path), tempfile.gettempdir(), os.path.expanduser("~"), os.getcwd())
    assert not [folder for folder in machine if folder in text]
    assert not [s for s in strings(json.loads(text)) if os.path.isabs(s) or s.startswith("~")]
    assert json.loads(text)["checkpoint"] == "finetune.pt"
    assert json.loads(text)["file"] == "synth.npz"


def test_finetune_checkpoint_without_provenance_is_refused(run_dir, tmp_path, capsys):
    state, _ = load_checkpoint(os.path.join(run_dir, "finetune.pt"))
    state.pop("differentially_private", None)
    state.pop("privacy_report", None)  # as dp/finetune.py wrote it before provenance records
    old = str(tmp_path / "finetune.pt")
    save_checkpoint(old, state)
    out = str(tmp_path / "synth.npz")
    assert sample.main(["--ckpt", old, *QUICK, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "predates provenance" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["finetune.pt"]  # no data file, no card


class Interrupted(BaseException):
    """A kill in the middle of writing (like Ctrl-C: not an Exception, so nothing swallows it)."""


def write_half_then_die(f, *args, **kwargs):
    f.write(b"PK\x03\x04 half of a file")
    raise Interrupted


@pytest.mark.parametrize("name", ["synth.npz", "grid.png"])
def test_interrupted_write_leaves_the_old_file_and_no_partial_one(run_dir, tmp_path, monkeypatch, name):
    ckpt, out = os.path.join(run_dir, "pretrain.pt"), str(tmp_path / name)
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", out]) == 0
    old = open(out, "rb").read()
    if name.endswith(".npz"):
        monkeypatch.setattr(np, "savez", lambda f, **arrays: write_half_then_die(f))
    else:
        monkeypatch.setattr(Image.Image, "save", lambda self, f, **kw: write_half_then_die(f))
    with pytest.raises(Interrupted):
        sample.main(["--ckpt", ckpt, *QUICK, "--seed", "1", "--out", out])
    assert os.listdir(tmp_path) == [name]  # no temp file, and the old card went with the replacement
    assert open(out, "rb").read() == old
    assert (npz_metadata if name.endswith(".npz") else png_metadata)(out)["sampling"]["seed"] == 0


def test_interrupted_card_write_leaves_no_stale_or_partial_card(run_dir, tmp_path, monkeypatch):
    ckpt, out = os.path.join(run_dir, "pretrain.pt"), str(tmp_path / "synth.npz")
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", out]) == 0
    monkeypatch.setattr(sample, "atomic_write_json", lambda path, obj: atomic_write_bytes(path, write_half_then_die))
    with pytest.raises(Interrupted):
        sample.main(["--ckpt", ckpt, *QUICK, "--seed", "1", "--out", out])
    assert os.listdir(tmp_path) == ["synth.npz"]  # the old card described the old samples; no temp file
    assert npz_metadata(out)["sampling"]["seed"] == 1  # the new file is whole and still says where it came from


# ---- folder output: DIR/<class>/<index>.png (ImageFolder layout) and DIR/card.json --------------------------------


def folder_card(folder):
    with open(os.path.join(folder, "card.json")) as f:
        return json.load(f)


def test_folder_output_is_an_image_folder_with_the_npz_pixels_labels_and_card(dp_ckpt, tmp_path):
    from torchvision.datasets import ImageFolder

    folder, npz = str(tmp_path / "synth"), str(tmp_path / "synth.npz")
    same = ["--ckpt", dp_ckpt, "--n", "12", "--steps", "2", "--seed", "3"]
    assert sample.main([*same, "--out", folder + "/"]) == 0
    assert sample.main([*same, "--out", npz]) == 0
    assert sorted(os.listdir(tmp_path)) == ["synth", "synth.card.json", "synth.npz"]  # no temporary folder left
    with np.load(npz, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    data = ImageFolder(folder)  # torchvision's own loader: RGB, classes from the folder names
    assert data.classes == [str(c) for c in range(10)] and len(data) == 12
    assert all(data.class_to_idx[str(c)] == c for c in range(10))  # the ImageFolder index is the label
    assert sorted(os.listdir(folder)) == [*data.classes, "card.json"]
    assert np.bincount(data.targets, minlength=10).tolist() == np.bincount(y, minlength=10).tolist() == [2, 2] + [1] * 8
    for path, target in data.samples:
        i = int(os.path.splitext(os.path.basename(path))[0])
        assert os.path.basename(path) == f"{i:02d}.png" and target == y[i]  # index = position, zero-padded
        image, label = data[data.samples.index((path, target))]
        assert label == y[i] and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.repeat(x[i][..., None], 3, axis=2))
        with Image.open(path) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), x[i])  # the stored PNG: the npz's pixels
            assert json.loads(im.text["metadata"]) == folder_card(folder)  # each image carries the provenance
    meta = folder_card(folder)
    assert meta == dict(npz_metadata(npz), file="synth")  # the same provenance object; `file` names the folder
    assert meta["differentially_private"] is True and meta["stage"] == "finetune"
    assert meta["epsilon"] == load_checkpoint(dp_ckpt)[0]["privacy_report"]["epsilon"] and meta["delta"] == 1e-5
    assert meta["checkpoint"] == "finetune.pt" and meta["sampling"]["seed"] == 3 and meta["sampling"]["n"] == 12


def test_folder_output_refuses_a_non_empty_folder_unless_overwrite(run_dir, tmp_path, capsys):
    ckpt, folder = os.path.join(run_dir, "pretrain.pt"), str(tmp_path / "synth")
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", folder + "/"]) == 0
    before = {f: open(os.path.join(folder, f), "rb").read() for f in ("card.json", os.path.join("0", "0.png"))}
    capsys.readouterr()
    assert sample.main(["--ckpt", ckpt, *QUICK, "--seed", "1", "--out", folder]) == 2  # an existing folder: no '/'
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not empty" in err[0] and "--overwrite" in err[0], err
    assert {f: open(os.path.join(folder, f), "rb").read() for f in before} == before
    assert sample.main(["--ckpt", ckpt, *QUICK, "--seed", "1", "--out", folder, "--overwrite"]) == 0
    assert folder_card(folder)["sampling"]["seed"] == 1
    assert open(os.path.join(folder, "0", "0.png"), "rb").read() != before[os.path.join("0", "0.png")]
    assert os.listdir(tmp_path) == ["synth"]  # the old folder and the temporary one are gone


def test_overwrite_never_replaces_a_folder_that_sample_py_did_not_write(run_dir, tmp_path, capsys):
    ckpt, folder = os.path.join(run_dir, "pretrain.pt"), tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not samples")
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", str(folder), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a sample folder" in err[0], err
    assert os.listdir(folder) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", str(tmp_path / "file") + "/"]) == 2
    assert "is a file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sample.main(["--ckpt", ckpt, *QUICK, "--out", str(empty)]) == 0  # an existing empty folder is used
    assert sorted(os.listdir(empty))[0] == "0" and folder_card(str(empty))["file"] == "empty"


@pytest.mark.parametrize("old_folder", [False, True])
def test_folder_output_stopped_midway_leaves_no_half_folder_and_no_temporary_one(run_dir, tmp_path, monkeypatch,
                                                                                 old_folder):
    ckpt, folder = os.path.join(run_dir, "pretrain.pt"), str(tmp_path / "synth")
    if old_folder:
        assert sample.main(["--ckpt", ckpt, *QUICK, "--out", folder + "/"]) == 0
    written = []

    def write_three_then_die(path, picture, info):
        if len(written) == 3:
            raise Interrupted
        write_png(path, picture, info)
        written.append(path)

    write_png = sample.write_png
    monkeypatch.setattr(sample, "write_png", write_three_then_die)
    with pytest.raises(Interrupted):
        sample.main(["--ckpt", ckpt, *QUICK, "--seed", "1", "--out", folder + "/", "--overwrite"])
    assert len(written) == 3 and not any(os.path.exists(p) for p in written)
    assert os.listdir(tmp_path) == (["synth"] if old_folder else [])  # no temporary or moved-aside folder
    if old_folder:
        assert folder_card(folder)["sampling"]["seed"] == 0 and len(os.listdir(folder)) == 7  # 6 classes + card


def test_folder_layout_for_colour_images_and_more_than_ten_classes(tmp_path):
    from torchvision.datasets import ImageFolder

    images = torch.randint(0, 256, (30, 3, 8, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 26  # K = 26: class folders 00..25 sort as numbers
    folder = str(tmp_path / "rgb")
    sample.write_folder(folder, images, labels, {"created_by": sample.CREATED_BY}, 26, overwrite=False)
    data = ImageFolder(folder)
    assert data.classes == [f"{c:02d}" for c in range(26)] and len(data) == 30
    for index, (path, target) in enumerate(data.samples):
        i = int(os.path.splitext(os.path.basename(path))[0])
        image, label = data[index]
        assert label == target == labels[i] and image.size == (6, 8)  # PIL size: (W, H)
        assert np.array_equal(np.asarray(image), images[i].permute(1, 2, 0).numpy())
    assert sorted(os.listdir(tmp_path)) == ["rgb"]
