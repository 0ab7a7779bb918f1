"""The non-private baseline stage: right gradient, same parameters as the DP stage, and never mistaken for DP."""

import json
import os

import PIL.Image
import pytest
import torch

import sample
import train
from dp.nonprivate import STAGE, train_finetune_nonprivate
from dp.per_sample import per_sample_grads
from dp.randomness import seeded_secret
from dp.select import select_parameters
from dp.step import Mechanism, Task, example_inputs, private_gradient
from ldm.build import build_unet
from ldm.checkpoint import load_checkpoint
from ldm.config import make_config
from ldm.diffusion import Diffusion
from ldm.distributed import Dist
from ldm.metrics_log import MetricsLog
from test_dp import fresh_run  # copies a finished run's public stages into a new folder

BASE = {"ae_steps": 10, "pretrain_steps": 10, "ckpt_every": 4, "log_every": 4}
FLAGS = ["--preset", "smoke", "--ae-steps", "10", "--pretrain-steps", "10", "--ckpt-every", "4", "--log-every", "4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre"))
    for stage in ("autoencoder", "pretrain"):
        assert train.main([*FLAGS, "--stage", stage, "--out", out]) == 0
    return out


def test_gradient_is_the_unclipped_sum_of_per_sample_gradients_over_expected_batch():
    torch.manual_seed(0)
    unet = build_unet(make_config("smoke"))
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = select_parameters(unet, "decoder")
    g = torch.Generator().manual_seed(1)
    task = Task(unet, Diffusion(), params, (torch.randn(7, 3, 8, 8, generator=g), torch.rand(7, 3, 8, 8) * 0.1),
                torch.arange(7), physical_batch=3)
    mech, secret, idx = Mechanism(q=0.5, clip=None, sigma=0.0, divisor=3.5), seeded_secret(0, "test"), torch.arange(7)
    got = private_gradient(task, mech, secret, 2, idx)  # the non-private step: no clipping, no noise
    per = per_sample_grads(unet, task.diffusion, params, *example_inputs(task, secret, 2, idx))
    for (name, _), value in zip(params.items(), got):
        torch.testing.assert_close(value, per[name].sum(0) / 3.5, rtol=1e-4, atol=1e-7)
    empty = private_gradient(task, mech, secret, 2, idx[:0])
    assert all(not v.any() for v in empty) and not mech.private


def test_stage_trains_only_the_dp_parameters_and_is_marked_not_private(pretrained, tmp_path, capsys):
    out = fresh_run(pretrained, tmp_path)
    assert train.main([*FLAGS, "--stage", STAGE, "--out", out, "--dp-blocks", "decoder"]) == 0
    assert STAGE in capsys.readouterr().out
    state = load_checkpoint(os.path.join(out, f"{STAGE}.pt"))[0]
    assert state["stage"] == STAGE and state["differentially_private"] is False and "privacy" not in state
    for name in ("finetune.pt", "privacy_report.json", "privacy_ledger.jsonl"):
        assert not os.path.exists(os.path.join(out, name)), name  # nothing that looks like a DP result
    grid = PIL.Image.open(os.path.join(out, "samples_finetune_nonprivate.png"))
    assert json.loads(grid.text["metadata"])["differentially_private"] is False  # said in the file itself
    pre = load_checkpoint(os.path.join(out, "pretrain.pt"))[0]["ema"]
    selected = set(select_parameters(build_unet(make_config("smoke")), "decoder"))
    changed = {n for n, v in state["unet"].items() if not torch.equal(v, pre[n])}
    assert changed and changed <= selected
    # sampling works and says, on stderr, that the model is not private
    assert sample.main(["--ckpt", os.path.join(out, f"{STAGE}.pt"), "--n", "4", "--steps", "2",
                        "--out", str(tmp_path / "g.png")]) == 0
    assert "NOT differentially private" in capsys.readouterr().err
    # a second run without --resume is refused
    assert train.main([*FLAGS, "--stage", STAGE, "--out", out]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_gives_the_same_model_as_a_straight_run(pretrained, tmp_path):
    cfg = make_config("smoke", {**BASE, "ckpt_every": 2})
    straight, resumed = fresh_run(pretrained, tmp_path, "a"), fresh_run(pretrained, tmp_path, "b")
    run = lambda out, resume, stop_at=None: train_finetune_nonprivate(  # noqa: E731
        cfg, out, torch.device("cpu"), resume, MetricsLog(None), Dist(), stop_at=stop_at)
    run(straight, False)
    assert run(resumed, False, stop_at=3) is None
    assert load_checkpoint(os.path.join(resumed, f"{STAGE}.pt"))[0]["step"] == 2
    run(resumed, True)
    a = load_checkpoint(os.path.join(straight, f"{STAGE}.pt"))[0]
    b = load_checkpoint(os.path.join(resumed, f"{STAGE}.pt"))[0]
    assert a["step"] == b["step"] and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
