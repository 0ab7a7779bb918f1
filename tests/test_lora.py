"""LoRA adapters (dp/lora.py, --dp-lora): right per-sample gradients by either clipping path, an adapted model that
starts as the pretrained one and merges back to it, and a private stage that trains only the adapters."""

import dataclasses
import json
import os

import pytest
import torch

import dp.audit
import sample
import train
from dp.finetune import check_frozen, resolve_grad_method
from dp.lora import LoRALinear, factor_projections, lora_modules, merge_lora, merged_copy, merged_state
from dp.nonprivate import STAGE as NONPRIVATE, train_finetune_nonprivate
from dp.per_sample import per_sample_grads
from dp.randomness import seeded_secret
from dp.select import parse_blocks, select_trainable, selection_size
from dp.sensitivity import TOLERANCE, random_task, sensitivity_ratios
from dp.step import Mechanism, Task, dp_step, example_inputs, make_optimizer, private_gradient
from ldm.build import build_unet, latent_shape
from ldm.checkpoint import load_checkpoint
from ldm.config import config_from_dict, config_to_dict, make_config
from ldm.diffusion import Diffusion
from ldm.distributed import Dist
from ldm.errors import UserError
from ldm.metrics_log import MetricsLog
from ldm.run_folder import trained_unet
from test_bookkeeping import assert_same_sum, batch
from test_dp import (BASE, finetune, fresh_run, naive_clipped_sum, one_example_grads,  # noqa: F401 - the fixture
                     pretrained)

FLAGS = ["--preset", "smoke", "--ae-steps", "10", "--pretrain-steps", "10", "--ckpt-every", "4", "--log-every", "4"]
RANK = 4


def lora_unet(spec="all", embed=True):
    """The smoke UNet with random weights, adapted with random (non-zero) factors; returns (unet, trainable)."""
    cfg = make_config("smoke", {"dp_blocks": spec, "dp_class_embed": embed, "dp_lora": RANK})
    torch.manual_seed(0)
    unet = build_unet(cfg)
    for p in unet.parameters():  # no zero-initialised block: every selected tensor gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    params = select_trainable(unet, cfg)
    with torch.no_grad():
        for name in factor_projections(unet):
            params[name].normal_(0.0, 0.1)  # up starts at 0, and then down has no gradient
    return unet, params


def test_selection_is_exactly_the_chosen_blocks_factors_and_the_class_embedding():
    unet, params = lora_unet("decoder")
    blocks = parse_blocks("decoder", unet)
    factors = set(factor_projections(unet))
    assert set(params) == factors | {"class_embed.weight"}
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(params)
    assert len(lora_modules(unet)) == 8 * len(blocks) and all(n.startswith("attn.up") for n in factors)
    count = sum(p.numel() for p in params.values())
    plain = sum(p.numel() for p in build_unet(make_config("smoke")).parameters())
    assert selection_size(unet, params) == (count, count / plain)  # share of the plain architecture


def test_per_sample_gradients_of_the_factors_equal_a_batch_size_one_loop():
    unet, params = lora_unet("levels=1")
    d = Diffusion()
    z0, y, t, noise = batch("smoke", 4)
    batched = per_sample_grads(unet, d, params, z0, y, t, noise)
    for i in range(4):
        for name, grad in one_example_grads(unet, d, params, z0, y, t, noise, i).items():
            torch.testing.assert_close(batched[name][i], grad, rtol=1e-4, atol=1e-6)
            assert "attn1." not in name or grad.any(), name  # (attn2's to_q, to_k: one token, no gradient)


@pytest.mark.parametrize("spec,embed", [("all", True), ("decoder", False)])
def test_bookkeeping_clipped_sum_equals_the_vmap_path_and_a_loop(spec, embed):
    unet, params = lora_unet(spec, embed)
    assert resolve_grad_method("auto", unet, params) == "bookkeeping"
    n = 6
    latents = (torch.randn(n, *latent_shape(make_config("smoke"))), torch.full((n, 3, 8, 8), 0.1))
    idx, labels = torch.tensor([0, 1, 2, 4, 5]), torch.arange(n)
    out, mech, secret = {}, Mechanism(q=0.5, clip=1e-3, sigma=0.0, divisor=2.5), seeded_secret(2, "test")
    for method in ("bookkeeping", "vmap"):
        task = Task(unet, Diffusion(), params, latents, labels, method, physical_batch=3)
        out[method] = private_gradient(task, mech, secret, 4, idx)
    assert_same_sum(out["bookkeeping"], out["vmap"])
    loop = naive_clipped_sum(unet, Diffusion(), params, *example_inputs(task, secret, 4, idx), 1e-3)
    assert_same_sum(out["bookkeeping"], [v / 2.5 for v in loop.values()])


def test_adapted_model_starts_equal_and_merges_to_the_same_function_after_training():
    cfg = make_config("smoke", {"dp_lora": RANK})
    torch.manual_seed(0)
    unet = build_unet(cfg)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = build_unet(cfg)
    plain.load_state_dict(pretrained)
    z0, y, t, noise = batch("smoke", 5)
    params = select_trainable(unet, cfg)
    assert torch.equal(unet(z0, t, y), plain(z0, t, y))  # exactly: every up factor starts at zero
    again = build_unet(cfg)
    again.load_state_dict(pretrained)
    select_trainable(again, cfg)  # the same --seed draws the same down factors
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))
    task = Task(unet, Diffusion(), params, (torch.randn(8, 3, 8, 8), torch.full((8, 3, 8, 8), 0.1)),
                torch.arange(8), physical_batch=4)
    opt = make_optimizer(cfg.dp, params)
    for step in range(3):
        dp_step(task, Mechanism(q=0.5, clip=1e-2, sigma=1.0, divisor=4.0), seeded_secret(0, "test"), step, opt, 1e-2)
    assert all(params[n].any() for n in set(factor_projections(unet)))  # every factor moved (the noise reaches even those without gradient)
    check_frozen(unet, merged_copy(plain), pretrained, params)  # base weights bit-identical after training
    merged = merged_copy(unet)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(pretrained)  # the plain architecture
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in merged_state(unet).items())
    with torch.no_grad():
        adapted, folded = unet(z0, t, y), merged(z0, t, y)
    assert not torch.allclose(adapted, plain(z0, t, y))
    torch.testing.assert_close(folded, adapted, rtol=1e-5, atol=1e-6)
    merge_lora(unet)  # in place
    assert not lora_modules(unet)


def test_the_frozen_check_keeps_its_force_with_lora():
    unet, params = lora_unet("mid")
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}
    ema = merged_copy(unet)
    base = unet.attn.mid.attn1.to_q.weight
    with torch.no_grad():
        ema.attn.mid.attn1.to_q.weight.add_(1.0)  # the EMA's merged projection weight may move
        ema.class_embed.weight.add_(1.0)
    check_frozen(unet, ema, pretrained, params)
    with torch.no_grad():
        base.add_(1e-3)  # the adapted projection's own weight may not
    with pytest.raises(RuntimeError, match="frozen parameter attn.mid.attn1.to_q.weight changed"):
        check_frozen(unet, ema, pretrained, params)
    with torch.no_grad():
        base.copy_(pretrained["attn.mid.attn1.to_q.weight"])
        ema.attn.mid.ff.out.weight.add_(1.0)  # nor anything outside the adapted projections
    with pytest.raises(RuntimeError, match="attn.mid.ff.out.weight"):
        check_frozen(unet, ema, pretrained, params)


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):  # noqa: F811
    """A finished DP run with --dp-lora through the command line (seeded noise, to compare with a resume)."""
    out = fresh_run(pretrained, tmp_path_factory.mktemp("lora"))
    with pytest.warns(UserWarning, match="not for release"):
        assert train.main([*FLAGS, "--stage", "finetune", "--out", out, "--dp-lora", str(RANK),
                           "--noise-seed", "3"]) == 0
    return out


def test_a_lora_run_trains_only_the_adapters_and_releases_a_plain_unet(pretrained, lora_run, tmp_path,  # noqa: F811
                                                                       capsys):
    pre = load_checkpoint(os.path.join(pretrained, "pretrain.pt"))[0]["ema"]
    state, cfg = load_checkpoint(os.path.join(lora_run, "finetune.pt"))
    assert cfg.dp.dp_lora == RANK and state["done"]
    adapted = build_unet(cfg)
    params = select_trainable(adapted, cfg)
    assert set(state["unet"]) == set(adapted.state_dict())
    assert set(params) - set(pre) == set(factor_projections(adapted))
    for name, value in state["unet"].items():  # the training model: only factors and class embedding moved
        if name in params:
            assert name not in pre or not torch.equal(value, pre[name]), name
        else:
            assert torch.equal(value, pre[name]), f"frozen {name} changed"
    assert set(state["ema"]) == set(pre)  # the released EMA: the plain architecture, adapters merged
    projections = {f"{n}.weight" for n, _ in lora_modules(adapted)}
    changed = {n for n, v in state["ema"].items() if not torch.equal(v, pre[n])}
    assert changed and changed <= projections | {"class_embed.weight"}
    report = json.load(open(os.path.join(lora_run, "privacy_report.json")))
    assert report["trainable_parameters"] == sum(p.numel() for p in params.values()) and report["dp_lora"] == RANK
    without = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, dp_lora=0))
    whole_blocks = select_trainable(build_unet(without), without)
    assert report["trainable_parameters"] < 0.5 * sum(p.numel() for p in whole_blocks.values())
    texts = [json.loads(line).get("text", "") for line in open(os.path.join(lora_run, "metrics.jsonl"))]
    assert any(f"{report['trainable_parameters']:,} parameters" in t and f"LoRA factors of rank {RANK}" in t
               for t in texts)
    trained_unet(state, cfg, "finetune.pt", torch.device("cpu"))  # every reader of the EMA loads it unchanged
    assert sample.main(["--ckpt", os.path.join(lora_run, "finetune.pt"), "--n", "4", "--steps", "2",
                        "--out", str(tmp_path / "g.png")]) == 0
    assert "differentially private: True" in capsys.readouterr().out


def test_a_stopped_lora_run_resumes_to_the_uninterrupted_result(pretrained, lora_run, tmp_path):  # noqa: F811
    out = fresh_run(pretrained, tmp_path)
    finetune(out, stop_at=8, dp_lora=RANK)  # checkpoint at step 8
    _, report = finetune(out, resume=True, dp_lora=RANK)
    assert report["steps"] == 16 == len(open(os.path.join(out, "privacy_ledger.jsonl")).readlines())
    a = load_checkpoint(os.path.join(lora_run, "finetune.pt"))[0]
    b = load_checkpoint(os.path.join(out, "finetune.pt"))[0]
    for key in ("unet", "ema"):
        assert set(a[key]) == set(b[key]) and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["privacy_report"]["epsilon"] == b["privacy_report"]["epsilon"]


def test_the_nonprivate_baseline_trains_the_same_adapters(pretrained, tmp_path):  # noqa: F811
    out = fresh_run(pretrained, tmp_path)
    cfg = make_config("smoke", {**BASE, "dp_lora": 2, "dp_blocks": "mid", "epochs": 0.25})
    train_finetune_nonprivate(cfg, out, torch.device("cpu"), False, MetricsLog(None), Dist())
    state = load_checkpoint(os.path.join(out, f"{NONPRIVATE}.pt"))[0]
    pre = load_checkpoint(os.path.join(pretrained, "pretrain.pt"))[0]["ema"]
    assert set(state["ema"]) == set(pre) and set(state["unet"]) - set(pre)
    changed = {n for n, v in state["ema"].items() if not torch.equal(v, pre[n])}
    assert changed and all(n.startswith(("attn.mid.attn", "class_embed.")) and n.endswith("weight") for n in changed)


@pytest.mark.parametrize("value", ["-1", "999"])
def test_a_bad_rank_is_one_clear_error_naming_it(tmp_path, capsys, value):
    assert train.main([*FLAGS, "--dp-lora", value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dp-lora" in err[0] and value in err[0]
    assert not os.path.exists(tmp_path / "x")  # refused before any work


@pytest.mark.parametrize("value", [1.5, True, "2"])
def test_a_non_integer_rank_is_refused(value):
    with pytest.raises(UserError, match=f"--dp-lora .*{value!r}"):
        make_config("smoke", {"dp_lora": value})


def test_a_non_integer_rank_on_the_command_line_names_it(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--dp-lora", "1.5"])
    assert stop.value.code == 2 and "--dp-lora" in capsys.readouterr().err


def test_older_configurations_load_as_without_lora():
    stored = config_to_dict(make_config("smoke"))
    del stored["dp"]["dp_lora"]
    assert config_from_dict(stored).dp.dp_lora == 0


def test_the_audit_refuses_white_box_canaries(tmp_path, capsys):
    out = str(tmp_path / "a")
    assert dp.audit.main(["--preset", "smoke", "--out", out, "--canary", "white", "--dp-lora", "2"]) == 2
    assert "--dp-lora 2" in capsys.readouterr().err and not os.path.exists(out)  # before the public stages


def test_the_sensitivity_check_runs_on_the_adapted_model():
    cfg = make_config("smoke", {"dp_lora": 2, "dp_blocks": "decoder"})
    task = random_task(cfg, 9, torch.device("cpu"))
    assert set(task.params) == set(factor_projections(task.unet)) | {"class_embed.weight"}
    ratios = sensitivity_ratios(task, 1e-3, seeded_secret(0, "test"), 0, torch.arange(8), 8,
                                physical_batches=(3,), worlds=(1, 2))
    assert max(ratios.values()) <= 1 + TOLERANCE and min(ratios.values()) > 0.5  # clipping active, bound kept
