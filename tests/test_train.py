"""The public stages end to end: losses fall, checkpoints are exact and strict, runs resume, bad input is refused."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from ldm.autoencoder import Autoencoder
from ldm.autoencoder_stage import train_autoencoder
from ldm.build import build_unet
from ldm.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import config_from_dict, make_config
from ldm.data import load_dataset
from ldm.diffusion import Diffusion
from ldm.errors import UserError
from ldm.metrics_log import MetricsLog
from ldm.pretrain_stage import train_pretrain
from ldm.unet import UNet

TINY = ["--preset", "smoke", "--ae-steps", "20", "--pretrain-steps", "20", "--ckpt-every", "10", "--log-every", "5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main([*TINY, "--stage", "all", "--out", out, "--noise-seed", "1"]) == 0
    return out


def test_vae_loss_falls_on_small_set():
    torch.manual_seed(0)
    x = load_dataset("fake", make_config("smoke").data, "public").x[:64].float() / 127.5 - 1
    ae = Autoencoder(1, 8, (1, 2, 2), 1, 3)
    opt = torch.optim.AdamW(ae.parameters(), lr=2e-3)
    losses = []
    for step in range(200):
        loss, rec, _ = ae.loss(x[torch.randint(0, 64, (16,))], "l1", 1e-6, torch.randn(16, 3, 8, 8))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(rec.mean().item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_unet_loss_falls_on_small_set():
    torch.manual_seed(0)
    d = Diffusion()
    z = torch.randn(8, 3, 8, 8)  # eight fixed "latents"
    y = torch.arange(8) % 10
    unet = UNet(3, 16, (1, 2), 1, (1, 2), 2, 16, 10)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    t_eval, n_eval = torch.randint(0, 1000, (64,), generator=g), torch.randn(64, 3, 8, 8, generator=g)

    def eval_loss():
        with torch.no_grad():
            return d.loss_per_example(unet, z.repeat(8, 1, 1, 1), y.repeat(8), t_eval, n_eval).mean().item()
    before = eval_loss()
    for _ in range(150):
        t, n = d.draw(z, g)
        loss = d.loss_per_example(unet, z, y, t, n).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_smoke_run_leaves_checkpoints_grids_and_logs(run_dir):
    cfg = make_config("smoke", {"ae_steps": 20, "pretrain_steps": 20, "ckpt_every": 10, "log_every": 5,
                                "noise_seed": 1})
    for stage, steps in (("autoencoder", 20), ("pretrain", 20)):
        state, stored = load_checkpoint(os.path.join(run_dir, f"{stage}.pt"))
        assert state["stage"] == stage and state["done"] and state["step"] == steps and stored == cfg
    fine, _ = load_checkpoint(os.path.join(run_dir, "finetune.pt"))
    report = json.load(open(os.path.join(run_dir, "privacy_report.json")))
    ledger = [json.loads(line) for line in open(os.path.join(run_dir, "privacy_ledger.jsonl"))]
    assert fine["done"] and fine["step"] == report["steps"] == len(ledger) > 0
    assert 0 < report["epsilon"] <= cfg.dp.epsilon and fine["privacy_report"] == report
    assert config_from_dict(json.load(open(os.path.join(run_dir, "config.json")))) == cfg
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    done = {r["stage"] for r in records if r.get("done")}
    assert done >= {"autoencoder", "pretrain"} and any(r["stage"] == "finetune" for r in records)
    side = cfg.data.image_size + 2  # make_grid pads by 2
    for grid, rows in (("samples.png", 4), ("samples_finetune.png", 4), ("reconstructions.png", 8)):
        img = np.asarray(Image.open(os.path.join(run_dir, grid)))
        assert img.shape[0] == rows * side + 2 and img.std() > 0, grid  # decodes, has the layout, is not blank
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_sample_png_and_npz(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, "pretrain.pt")
    assert sample.main(["--ckpt", ckpt, "--n", "12", "--out", str(tmp_path / "g.png"), "--steps", "5"]) == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert sample.main(["--ckpt", ckpt, "--n", "20", "--out", str(tmp_path / "g.npz"), "--steps", "5"]) == 0
    f = np.load(tmp_path / "g.npz")
    assert f["x"].shape == (20, 32, 32) and f["x"].dtype == np.uint8
    assert np.bincount(f["y"]).tolist() == [2] * 10
    assert sample.main(["--ckpt", ckpt, "--n", "6", "--out", str(tmp_path / "h.npz"), "--steps", "5",
                        "--labels", "3,4"]) == 0
    assert sorted(set(np.load(tmp_path / "h.npz")["y"].tolist())) == [3, 4]


def test_checkpoint_round_trip_is_exact_and_loading_is_strict(run_dir, tmp_path):
    state, cfg = load_checkpoint(os.path.join(run_dir, "pretrain.pt"))
    unet = build_unet(cfg)
    load_state_strict(unet, state["ema"], "UNet", "x")
    path = str(tmp_path / "copy.pt")
    save_checkpoint(path, dict(state, ema=unet.state_dict()))
    again, cfg2 = load_checkpoint(path)
    assert cfg2 == cfg
    assert all(torch.equal(again["ema"][k], state["ema"][k]) for k in state["ema"])
    missing = dict(state["ema"])
    missing.pop(next(iter(missing)))
    with pytest.raises(UserError, match="do not match"):
        load_state_strict(build_unet(cfg), missing, "UNet", path)
    with pytest.raises(UserError, match="do not match"):
        load_state_strict(build_unet(cfg), dict(state["ema"], extra=torch.zeros(1)), "UNet", path)
    other = make_config("smoke", {"unet_heads": 4, "unet_channels": 32})
    with pytest.raises(UserError, match="do not match"):
        load_state_strict(build_unet(other), state["ema"], "UNet", path)


def test_corrupt_checkpoint_is_a_clear_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(os.path.join(run_dir, "pretrain.pt"), "rb").read()[:1000])
    assert sample.main(["--ckpt", str(bad), "--n", "4", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "corrupt" in err[0]
    assert not (tmp_path / "x.png").exists()


def stage_weights(out, stage, key):
    return load_checkpoint(os.path.join(out, f"{stage}.pt"))[0][key]


@pytest.mark.parametrize("stage,key", [("autoencoder", "autoencoder"), ("pretrain", "ema")])
def test_resume_continues_at_the_same_step_with_the_same_rng_stream(run_dir, tmp_path, stage, key):
    cfg = make_config("smoke", {"ae_steps": 20, "pretrain_steps": 20, "ckpt_every": 10, "log_every": 5})
    fn = train_autoencoder if stage == "autoencoder" else train_pretrain
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (straight, resumed):
        os.makedirs(out)
        if stage == "pretrain":  # both start from the same finished autoencoder
            os.link(os.path.join(run_dir, "autoencoder.pt"), os.path.join(out, "autoencoder.pt"))
    fn(cfg, straight, torch.device("cpu"), False, MetricsLog(os.path.join(straight, "m.jsonl")))
    fn(cfg, resumed, torch.device("cpu"), False, MetricsLog(os.path.join(resumed, "m.jsonl")), stop_at=13)
    assert load_checkpoint(os.path.join(resumed, f"{stage}.pt"))[0]["step"] == 10
    fn(cfg, resumed, torch.device("cpu"), True, MetricsLog(os.path.join(resumed, "m.jsonl")))
    a, b = stage_weights(straight, stage, key), stage_weights(resumed, stage, key)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_raising_pretrain_steps_on_resume_trains_on_to_a_fresh_run_of_that_length(run_dir, tmp_path):
    """A finished 10-step pretraining resumed with --pretrain-steps 20 equals a straight 20-step run bit for bit
    (constant learning rate, saved optimiser, EMA and generator); fewer steps than it ran are refused, and the
    autoencoder's step count (and every other field) still may not change."""
    base = {"ae_steps": 20, "ckpt_every": 10, "log_every": 5}
    straight, extended = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (straight, extended):
        os.makedirs(out)
        os.link(os.path.join(run_dir, "autoencoder.pt"), os.path.join(out, "autoencoder.pt"))
    cpu = torch.device("cpu")
    train_pretrain(make_config("smoke", {**base, "pretrain_steps": 20}), straight, cpu, False,
                   MetricsLog(os.path.join(straight, "m.jsonl")))
    train_pretrain(make_config("smoke", {**base, "pretrain_steps": 10}), extended, cpu, False,
                   MetricsLog(os.path.join(extended, "m.jsonl")))
    assert load_checkpoint(os.path.join(extended, "pretrain.pt"))[0]["done"]
    with pytest.raises(UserError, match="--pretrain-steps 5 is below that: allowed is at least 10"):
        train_pretrain(make_config("smoke", {**base, "pretrain_steps": 5}), extended, cpu, True,
                       MetricsLog(os.path.join(extended, "m.jsonl")))
    train_pretrain(make_config("smoke", {**base, "pretrain_steps": 20}), extended, cpu, True,
                   MetricsLog(os.path.join(extended, "m.jsonl")))
    state, stored = load_checkpoint(os.path.join(extended, "pretrain.pt"))
    assert state["done"] and state["step"] == 20 and stored.pretrain.pretrain_steps == 20
    for key in ("unet", "ema"):
        a, b = stage_weights(straight, "pretrain", key), stage_weights(extended, "pretrain", key)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="--ae-steps 20 \\(stored\\) vs 40"):
        train_autoencoder(make_config("smoke", {**base, "ae_steps": 40}), run_dir, cpu, True,
                          MetricsLog(os.path.join(extended, "m.jsonl")))


def run_cli(capsys, *argv):
    code = train.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["--public", "nosuch"], "valid sets: mnist, emnist-letters, svhn"),
    (["--preset", "nosuch"], "valid presets: smoke, quick"),
    (["--preset", "smoke", "--ae-steps", "0"], "--ae-steps must be a positive number"),
    (["--preset", "smoke", "--pretrain-lr", "-1"], "--pretrain-lr must be a positive number"),
    (["--preset", "smoke", "--image-size", "-32"], "--image-size must be a positive number"),
    (["--preset", "smoke", "--public", "cifar10"], "cannot be brought to"),
    (["--preset", "smoke", "--dp-blocks", "up9_9"], "unknown block"),
])
def test_bad_input_gives_one_clear_line(capsys, tmp_path, argv, needle):
    out = str(tmp_path / "never")
    code, err = run_cli(capsys, *argv, "--out", out)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".pt")]


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "--preset", "smoke", "--out", str(blocker / "run"))
    assert code == 2 and len(err) == 1 and "cannot be written" in err[0]


def test_existing_run_needs_resume(run_dir, capsys):
    code, err = run_cli(capsys, *TINY, "--stage", "autoencoder", "--out", run_dir)
    assert code == 2 and "--resume" in err[0]
    code, _ = run_cli(capsys, *TINY, "--stage", "autoencoder", "--out", run_dir, "--resume")
    assert code == 0  # already finished: nothing to do


def test_changed_architecture_on_resume_is_refused(run_dir, capsys):
    code, err = run_cli(capsys, *TINY, "--stage", "pretrain", "--out", run_dir, "--resume", "--unet-heads", "4")
    assert code == 2 and "unet-heads" in err[0]


def test_a_paper_preset_on_a_cpu_prints_one_estimate_and_goes_on(tmp_path, capsys, monkeypatch):
    import ldm.pace
    monkeypatch.setattr(ldm.pace, "PACE_STEPS", 2)
    cfg = make_config("smoke", {"ae_steps": 8, "ckpt_every": 100})
    cfg = dataclasses.replace(cfg, preset="paper-mnist")  # the smoke model, labelled as a GPU preset
    train_autoencoder(cfg, str(tmp_path), torch.device("cpu"), False, MetricsLog(None))
    lines = [line for line in capsys.readouterr().err.splitlines() if "s per step on this CPU" in line]
    assert len(lines) == 1 and "try --preset quick" in lines[0] and "for the remaining 5 steps" in lines[0]
    assert load_checkpoint(str(tmp_path / "autoencoder.pt"))[0]["done"]  # it went on to the end
    quick = dataclasses.replace(cfg, preset="quick")
    os.makedirs(tmp_path / "q")
    train_autoencoder(quick, str(tmp_path / "q"), torch.device("cpu"), False, MetricsLog(None))
    assert "s per step on this CPU" not in capsys.readouterr().err
