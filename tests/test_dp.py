"""Tests that would fail if the privacy claim of the fine-tuning stage were false."""

import json
import os
import shutil
import warnings
from unittest import mock

import pytest
import torch

import dp.finetune
import ldm.autoencoder_stage
import ldm.pretrain_stage
import train
from dp.finetune import train_finetune
from dp.per_sample import per_sample_grads
from dp.poisson import num_steps, sampling_rate
from dp.randomness import poisson_sample, run_secret, seeded_secret
from dp.select import parse_blocks, select_parameters
from dp.step import Mechanism, Task, example_inputs, private_gradient
from ldm.autoencoder_stage import train_autoencoder
from ldm.build import build_unet
from ldm.checkpoint import load_checkpoint
from ldm.config import make_config
from ldm.diffusion import Diffusion
from ldm.errors import UserError
from ldm.metrics_log import MetricsLog
from ldm.pretrain_stage import train_pretrain

BASE = {"ae_steps": 10, "pretrain_steps": 10, "ckpt_every": 4, "log_every": 4}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run folder with finished public stages (tiny smoke model)."""
    out = str(tmp_path_factory.mktemp("pre"))
    cfg = make_config("smoke", BASE)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    train_autoencoder(cfg, out, torch.device("cpu"), False, log)
    train_pretrain(cfg, out, torch.device("cpu"), False, log)
    return out


def fresh_run(pretrained, tmp_path, name="run"):
    out = str(tmp_path / name)
    os.makedirs(out)
    for f in ("autoencoder.pt", "pretrain.pt"):
        shutil.copy(os.path.join(pretrained, f), out)
    return out


def finetune(out, resume=False, stop_at=None, **overrides):
    cfg = make_config("smoke", {**BASE, "noise_seed": 3, **overrides})
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    with warnings.catch_warnings(), mock.patch.object(dp.finetune, "write_samples", lambda *a: "skipped"):
        warnings.simplefilter("ignore")  # the --noise-seed warning, tested on its own
        return cfg, train_finetune(cfg, out, torch.device("cpu"), resume, log, stop_at=stop_at)


def small_unet():
    torch.manual_seed(0)
    unet = build_unet(make_config("smoke"))
    for p in unet.parameters():  # leave zero-initialisation so that every block has a gradient
        torch.nn.init.normal_(p, std=0.1)
    return unet


def one_example_grads(unet, d, params, z0, y, t, noise, i):
    """{name: gradient of example i's loss alone} by plain autograd (batch size 1); zeros for a parameter the
    forward never used (attn2's to_q, to_k and norm2: one context token, ldm/attention.py `Attention.one_key`)."""
    unet.zero_grad(set_to_none=True)
    d.loss_per_example(unet, z0[i:i + 1], y[i:i + 1], t[i:i + 1], noise[i:i + 1]).sum().backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}


def test_per_sample_gradients_equal_batch_size_one_loop():
    unet, d = small_unet(), Diffusion()
    params = select_parameters(unet, "all")
    g = torch.Generator().manual_seed(0)
    z0, y = torch.randn(5, 3, 8, 8, generator=g), torch.tensor([0, 3, 3, 9, 1])
    t, noise = d.draw(z0, g)
    batched = per_sample_grads(unet, d, params, z0, y, t, noise)
    for i in range(5):
        for name, grad in one_example_grads(unet, d, params, z0, y, t, noise, i).items():
            torch.testing.assert_close(batched[name][i], grad, rtol=1e-4, atol=1e-6)


def naive_clipped_sum(unet, d, params, z0, y, t, noise, clip):
    """Sum over examples of min(1, C / ||g_i||) g_i from a batch-size-1 loop."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        grads = one_example_grads(unet, d, params, z0, y, t, noise, i)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for n, g in grads.items():
            total[n] += factor * g
    return total


def make_task(unet, params, mean, std, labels, method="bookkeeping", physical_batch=64):
    return Task(unet, Diffusion(), params, (mean, std), labels, method, physical_batch)


@pytest.mark.parametrize("method", ["bookkeeping", "vmap"])
def test_sigma_zero_update_is_clipped_sum_over_expected_batch_with_micro_batches(method):
    unet, d = small_unet(), Diffusion()
    params = select_parameters(unet, "decoder")
    n = 7
    mean, std = torch.randn(n, 3, 8, 8), torch.rand(n, 3, 8, 8) * 0.1
    task = make_task(unet, params, mean, std, torch.arange(n) % 10, method, physical_batch=3)
    idx, secret = torch.tensor([0, 2, 3, 4, 6]), seeded_secret(5, "test")
    grads = private_gradient(task, Mechanism(q=0.5, clip=1e-3, sigma=0.0, divisor=2.5), secret, 3, idx)
    z0, y, t, e = example_inputs(task, secret, 3, idx)  # every example's own draws at step 3
    expected = naive_clipped_sum(unet, d, params, z0, y, t, e, 1e-3)  # clipping active
    for g, e in zip(grads, expected.values()):
        torch.testing.assert_close(g, e / 2.5, rtol=1e-4, atol=1e-9)
    total_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    assert total_norm <= len(idx) * 1e-3 / 2.5 * (1 + 1e-5)


@pytest.mark.parametrize("method", ["bookkeeping", "vmap"])
def test_each_clipped_contribution_is_at_most_c(method):
    unet = small_unet()
    params = select_parameters(unet, "all")
    task = make_task(unet, params, torch.randn(6, 3, 8, 8) * 10, torch.zeros(6, 3, 8, 8), torch.arange(6), method)
    mech = Mechanism(q=0.5, clip=1e-4, sigma=0.0, divisor=1.0)
    for i in range(6):  # one example at a time: its whole contribution has norm <= C
        grads = private_gradient(task, mech, seeded_secret(i, "test"), 0, torch.tensor([i]))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        assert norm <= 1e-4 * (1 + 1e-5) and norm > 0.5e-4  # clipped, and clipping was active


@pytest.mark.parametrize("method", ["bookkeeping", "vmap"])
def test_an_example_with_a_non_finite_gradient_contributes_exactly_zero(method):
    unet = small_unet()
    params = select_parameters(unet, "all")
    mean, std = torch.randn(6, 3, 8, 8), torch.rand(6, 3, 8, 8) * 0.1
    mean[1, 0, 0, 0], mean[4, 2, 3, 1] = float("inf"), float("nan")  # their losses and gradients are not finite
    task = make_task(unet, params, mean, std, torch.arange(6), method, physical_batch=4)
    mech, secret = Mechanism(q=0.5, clip=1e-2, sigma=0.0, divisor=1.0), seeded_secret(1, "test")
    got = private_gradient(task, mech, secret, 0, torch.arange(6))
    finite = private_gradient(task, mech, secret, 0, torch.tensor([0, 2, 3, 5]))
    assert all(torch.isfinite(g).all() for g in got)
    a, b = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in finite])
    assert b.norm() > 0 and (a - b).norm() <= 1e-5 * b.norm()  # the sum of the finite examples, up to rounding


def test_noise_has_standard_deviation_sigma_c_over_divisor_and_empty_batch_is_noise_only():
    unet = small_unet()
    params = select_parameters(unet, "all")
    task = make_task(unet, params, torch.randn(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), torch.arange(4))
    mech, empty = Mechanism(q=0.5, clip=0.5, sigma=2.0, divisor=4.0), torch.zeros(0, dtype=torch.long)
    grads = private_gradient(task, mech, seeded_secret(1234, "test"), 0, empty)
    flat = torch.cat([g.flatten() for g in grads])
    assert flat.numel() > 50_000
    expected = 2.0 * 0.5 / 4.0
    assert abs(flat.std().item() / expected - 1) < 0.02  # a factor 1.5 (or sqrt 2) error fails
    assert abs(flat.mean().item()) < 5 * expected / flat.numel() ** 0.5
    again = private_gradient(task, mech, seeded_secret(1234, "test"), 0, empty)
    other_step = private_gradient(task, mech, seeded_secret(1234, "test"), 1, empty)
    other_secret = private_gradient(task, mech, seeded_secret(1235, "test"), 0, empty)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    assert not torch.equal(grads[0], other_step[0]) and not torch.equal(grads[0], other_secret[0])


def test_poisson_sampling_rate_independence_and_empty_samples():
    secret = seeded_secret(0, "test")
    sizes = torch.tensor([len(poisson_sample(secret, s, 1000, 0.05)) for s in range(400)]).float()
    assert abs(sizes.mean().item() - 50) < 5 * (1000 * 0.05 * 0.95 / 400) ** 0.5
    assert abs(sizes.var().item() / (1000 * 0.05 * 0.95) - 1) < 0.25  # binomial, not fixed-size
    counts = torch.zeros(1000)
    for s in range(400):
        counts[poisson_sample(secret, s, 1000, 0.05)] += 1
    assert abs(counts.mean().item() - 20) < 0.5  # every example with the same rate
    pairs = torch.stack([torch.isin(torch.tensor([3, 4]), poisson_sample(secret, s, 1000, 0.5)) for s in range(2000)])
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - 0.25) < 0.04  # neighbouring examples are included independently
    empties = sum(len(poisson_sample(secret, s, 10, 0.01)) == 0 for s in range(200))
    assert empties > 150  # empty samples happen and are returned as they are
    assert len(poisson_sample(secret, 0, 50, 1.0)) == 50  # q = 1: everyone, every step
    assert num_steps(2.0, 0.01) == 200 and sampling_rate(16, 256) == 1 / 16


def test_parameter_selection_syntax():
    unet = build_unet(make_config("smoke"))
    assert parse_blocks("all", unet) == list(unet.attn)
    assert parse_blocks("decoder", unet) == [n for n in unet.attn if n.startswith("up")]
    assert parse_blocks("decoder+mid", unet) == [n for n in unet.attn if n.startswith("up") or n == "mid"]
    assert parse_blocks("levels=1", unet) == ["down1_0", "up1_0", "up1_1"]
    assert parse_blocks("up1_0,mid", unet) == ["mid", "up1_0"]
    selected = select_parameters(unet, "levels=2", class_embed=True)
    assert all(n.startswith(("attn.down2_0.", "attn.mid.", "attn.up2_", "class_embed.")) for n in selected)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(selected)
    for bad in ("levels=7", "up9_9", "levels=x"):
        with pytest.raises(UserError):
            parse_blocks(bad, unet)


def test_finetune_changes_only_selected_parameters_and_never_the_autoencoder(pretrained, tmp_path):
    out = fresh_run(pretrained, tmp_path)
    ae_before = open(os.path.join(out, "autoencoder.pt"), "rb").read()
    cfg, report = finetune(out, dp_blocks="decoder")
    assert open(os.path.join(out, "autoencoder.pt"), "rb").read() == ae_before
    pre = load_checkpoint(os.path.join(out, "pretrain.pt"))[0]
    post = load_checkpoint(os.path.join(out, "finetune.pt"))[0]
    selected = set(select_parameters(build_unet(cfg), "decoder"))
    changed = set()
    for key in ("unet", "ema"):
        for name, value in post[key].items():
            if name not in selected:
                assert torch.equal(value, pre["ema"][name]), f"{key}: frozen {name} changed"
            elif not torch.equal(value, pre["ema"][name]):
                changed.add(name)
    assert changed and all(n.startswith(("attn.up", "class_embed")) for n in changed)
    assert all(torch.equal(post["autoencoder"][k], pre["autoencoder"][k]) for k in pre["autoencoder"])
    assert report["steps"] == num_steps(cfg.dp.epochs, cfg.dp.expected_batch / 256)
    assert report["epsilon"] <= cfg.dp.epsilon and report["neighbouring_relation"].startswith("add/remove")
    assert post["differentially_private"] is True and post["privacy_report"]["epsilon"] == report["epsilon"]


def test_private_set_never_reaches_public_stages(tmp_path, monkeypatch):
    roles = []
    real = ldm.autoencoder_stage.load_dataset

    def spy(name, data_cfg, role, split="train"):
        roles.append((name, role))
        return real(name, data_cfg, role, split)
    for stage in (ldm.autoencoder_stage, ldm.pretrain_stage):  # the only readers of data in the public stages
        monkeypatch.setattr(stage, "load_dataset", spy)
    cfg = make_config("smoke", {**BASE, "public": "fake", "private": "mnist", "data_root": str(tmp_path / "none")})
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    train_autoencoder(cfg, str(tmp_path), torch.device("cpu"), False, log)
    train_pretrain(cfg, str(tmp_path), torch.device("cpu"), False, log)
    assert roles and all(r == ("fake", "public") for r in roles)


def test_micro_batch_size_changes_neither_steps_nor_warmup_nor_result(pretrained, tmp_path):
    reports, states = [], []
    for pb in (2, 16):
        out = fresh_run(pretrained, tmp_path, f"pb{pb}")
        _, report = finetune(out, physical_batch=pb, warmup=5, optimizer="sgd", lr=1.0)
        reports.append(report)
        states.append(load_checkpoint(os.path.join(out, "finetune.pt"))[0])
        ledger = [json.loads(line) for line in open(os.path.join(out, "privacy_ledger.jsonl"))]
        assert [e["step"] for e in ledger] == list(range(report["steps"]))
        lrs = [json.loads(line).get("lr") for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [lr for lr in lrs if lr is not None] == [min(1, s / 5) for s in (4, 8, 12, 16)]
    assert reports[0]["epsilon"] == reports[1]["epsilon"]
    pre = load_checkpoint(os.path.join(pretrained, "pretrain.pt"))[0]["ema"]
    for k in states[0]["unet"]:  # same updates up to float summation order (SGD: linear in the gradient)
        d0, d1 = states[0]["unet"][k] - pre[k], states[1]["unet"][k] - pre[k]
        torch.testing.assert_close(d0, d1, rtol=1e-3, atol=1e-4 * float(d0.abs().max()) + 1e-12)


def test_ledger_survives_a_kill_and_resume_counts_every_step(pretrained, tmp_path):
    out = fresh_run(pretrained, tmp_path)
    finetune(out, stop_at=7)  # killed after step 7 was applied; last checkpoint at step 4
    assert len(open(os.path.join(out, "privacy_ledger.jsonl")).readlines()) == 7
    assert load_checkpoint(os.path.join(out, "finetune.pt"))[0]["step"] == 4
    with open(os.path.join(out, "privacy_ledger.jsonl"), "a") as f:
        f.write('{"step": 7, "sig')  # killed while writing the 8th entry: it still counts
    cfg, report = finetune(out, resume=True)
    assert report["steps"] == report["steps_planned"] == 16
    lines = open(os.path.join(out, "privacy_ledger.jsonl")).read().splitlines()
    assert len(lines) == 16 and json.loads(lines[-1])["step"] == 15
    state = load_checkpoint(os.path.join(out, "finetune.pt"))[0]
    assert state["step"] == 16 and [e.get("recovered") for e in state["privacy"]["ledger"]][7] is True
    # AdamW stepped once per logical step: 4 before the checkpoint, then steps 8..15 after the resume
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4 + 8}


def test_finetune_without_resume_refuses_existing_ledger(pretrained, tmp_path):
    out = fresh_run(pretrained, tmp_path)
    finetune(out, stop_at=2)
    with pytest.raises(UserError, match="--resume"):
        finetune(out)


@pytest.mark.parametrize("overrides,needle", [
    ({"delta": 0.01}, "1/N"),
    ({"expected_batch": 300}, "--expected-batch 300"),
    ({"epsilon": 1e-4, "epochs": 50.0}, "sigma above 1000"),
])
def test_bad_privacy_input_stops_before_training(pretrained, tmp_path, overrides, needle, monkeypatch):
    out = fresh_run(pretrained, tmp_path)
    touched = []
    monkeypatch.setattr("dp.finetune.encode_private", lambda *a: touched.append(1))
    with pytest.raises(UserError, match=needle):
        finetune(out, **overrides)
    assert not touched and not os.path.exists(os.path.join(out, "finetune.pt"))
    assert not os.path.exists(os.path.join(out, "privacy_ledger.jsonl"))


@pytest.mark.parametrize("flag,value", [("--epsilon", "0"), ("--delta", "-1"), ("--clip", "0"),
                                        ("--expected-batch", "0")])
def test_bad_privacy_flags_are_refused(capsys, tmp_path, flag, value):
    assert train.main(["--preset", "smoke", flag, value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_empty_private_set_is_refused():
    with pytest.raises(UserError, match="empty"):
        sampling_rate(1, 0)


def test_noise_seed_warns_that_the_run_is_not_for_release():
    with pytest.warns(UserWarning, match="not for release"):
        run_secret(3)
