"""The fine-tuning stage against the threat model: resume never under-counts, nothing private leaves the run
outside the mechanism, and a release run stores no secret."""

import json
import os
import re
import shutil
import warnings

import PIL.Image
import pytest
import torch

import train
from dp.nonprivate import STAGE as NONPRIVATE
from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.data import load_dataset
from ldm.errors import UserError
from test_dp import BASE, finetune, fresh_run, pretrained  # noqa: F401 - the shared module fixture

FLAGS = ["--preset", "smoke", "--ae-steps", "10", "--pretrain-steps", "10", "--ckpt-every", "4", "--log-every", "4"]


def ledger_path(out):
    return os.path.join(out, "privacy_ledger.jsonl")


def stopped_run(pretrained, tmp_path, **overrides):  # noqa: F811
    """A run killed after 8 steps; its last checkpoint (and ledger copy) is at step 8."""
    out = fresh_run(pretrained, tmp_path)
    finetune(out, stop_at=8, **overrides)
    assert load_checkpoint(os.path.join(out, "finetune.pt"))[0]["step"] == 8
    return out


# ---- Resume never under-counts ---------------------------------------------------------------


def test_resume_without_the_ledger_is_refused(pretrained, tmp_path):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    os.remove(ledger_path(out))
    with pytest.raises(UserError, match="missing.*under-count"):
        finetune(out, resume=True)


def test_resume_with_a_shorter_or_edited_ledger_is_refused(pretrained, tmp_path):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    lines = open(ledger_path(out)).readlines()
    with open(ledger_path(out), "w") as f:
        f.writelines(lines[:5])  # fewer steps than the checkpoint records
    with pytest.raises(UserError, match="disagrees"):
        finetune(out, resume=True)
    edited = [json.loads(line) for line in lines]
    edited[2]["time"] += 1.0  # same length, other content: not the ledger this checkpoint was written with
    with open(ledger_path(out), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in edited)
    with pytest.raises(UserError, match="disagrees"):
        finetune(out, resume=True)


def test_resume_from_a_checkpoint_of_another_stage_is_refused(pretrained, tmp_path):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    state, _ = load_checkpoint(os.path.join(out, "finetune.pt"))
    save_checkpoint(os.path.join(out, "finetune.pt"), dict(state, stage=NONPRIVATE))
    with pytest.raises(UserError, match="not a DP fine-tuning checkpoint"):
        finetune(out, resume=True)


@pytest.mark.parametrize("overrides,needle", [
    ({"private_size": 300}, "private-size"),  # changes q and T
    ({"clip": 0.5}, "clip"),
    ({"epsilon": 5.0}, "epsilon"),
])
def test_resume_with_another_mechanism_is_refused(pretrained, tmp_path, overrides, needle):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    with pytest.raises(UserError, match=f"{needle}|ledger .* has steps with sigma"):  # checkpoint or ledger refuses
        finetune(out, resume=True, **overrides)
    assert len(open(ledger_path(out)).readlines()) == 8  # and no step was spent


def test_resume_with_another_private_set_is_refused(pretrained, tmp_path):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    state, _ = load_checkpoint(os.path.join(out, "finetune.pt"))
    state["privacy"]["private_set"] = "mnist"  # as if the run had been made on another private set
    save_checkpoint(os.path.join(out, "finetune.pt"), state)
    with pytest.raises(UserError, match="private_set 'mnist'"):
        finetune(out, resume=True)


def test_a_consistent_resume_counts_every_step(pretrained, tmp_path):  # noqa: F811
    out = stopped_run(pretrained, tmp_path)
    _, report = finetune(out, resume=True)
    assert report["steps"] == 16 == len(open(ledger_path(out)).readlines())


# ---- Nothing private leaves the run outside the mechanism ------------------------------------

FINETUNE_LOG_KEYS = {"time", "stage", "event", "step", "epsilon", "accountant", "lr", "n_public", "n_source", "q",
                     "steps", "sigma", "clip", "text", "report"}


def test_output_and_logs_hold_no_batch_size_loss_or_private_size(pretrained, tmp_path, capfd):  # noqa: F811
    out = fresh_run(pretrained, tmp_path)
    shutil.copy(os.path.join(pretrained, "metrics.jsonl"), out)
    assert train.main([*FLAGS, "--stage", "finetune", "--out", out, "--private-size", "1000",
                       "--expected-batch", "64"]) == 0
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "finetune (DP)" in printed.err and "batch=" not in text and "loss" not in text.lower()
    real_size = re.compile(r"(?<![\w.-])256(?![\w.-])")  # the real size, not "256-bit"
    assert "N=1000" in text and not real_size.search(text)  # never shown with --private-size
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    finetune_records = [r for r in records if r["stage"] == "finetune"]
    assert finetune_records and all(set(r) <= FINETUNE_LOG_KEYS for r in finetune_records)
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["n_private"] == 1000 and "public bound" in report["n_source"]
    assert report["q"] == 64 / 1000 and not real_size.search(json.dumps(report))


def test_bad_labels_are_refused_without_showing_a_label(pretrained, tmp_path, monkeypatch):  # noqa: F811
    import ldm.data
    real = ldm.data.load_dataset

    def with_bad_label(*args, **kwargs):
        data = real(*args, **kwargs)
        data.y[7] = 4321
        return data
    monkeypatch.setattr(ldm.data, "load_dataset", with_bad_label)
    with pytest.raises(UserError, match="labels outside 0..9") as info:
        finetune(fresh_run(pretrained, tmp_path))
    assert "4321" not in str(info.value)


def test_the_tuning_holdout_never_reaches_the_private_stage(pretrained, tmp_path, monkeypatch):  # noqa: F811
    import dp.finetune
    seen, real_task = [], dp.finetune.private_task
    monkeypatch.setattr(dp.finetune, "private_task", lambda cfg, ae, unet, data, device:
                        seen.append(data) or real_task(cfg, ae, unet, data, device))
    cfg, report = finetune(fresh_run(pretrained, tmp_path), tune_holdout=56)
    whole = load_dataset(cfg.data.private, cfg.data, "private")
    held = {bytes(x.numpy()) for x in whole.x[-56:]}
    (private,) = seen  # the only private set the stage encodes and trains on
    assert len(private) == 200 and torch.equal(private.x, whole.x[:200]) and torch.equal(private.y, whole.y[:200])
    assert not held & {bytes(x.numpy()) for x in private.x}
    assert report["n_private"] == 200 and report["q"] == 16 / 200 and report["tune_holdout"] == 56
    assert any("held out for tuning" in line for line in report["not_covered"])


@pytest.mark.parametrize("k", [-1, 256, 1000])
def test_a_tuning_holdout_that_leaves_no_private_set_is_refused(pretrained, tmp_path, k):  # noqa: F811
    with pytest.raises(UserError, match="--tune-holdout") as info:
        finetune(fresh_run(pretrained, tmp_path), tune_holdout=k)
    assert str(k) in str(info.value)


# ---- Release mode ----------------------------------------------------------------------------


def all_values(obj):
    """Every leaf of a nested checkpoint (dicts, lists), with its key path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            for path, leaf in all_values(v):
                yield (str(k), *path), leaf
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_values(v)
    else:
        yield (), obj


def release_run(pretrained, tmp_path, name):  # noqa: F811
    out = fresh_run(pretrained, tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a release run warns about nothing (no --noise-seed)
        assert train.main([*FLAGS, "--stage", "finetune", "--out", out]) == 0
    return out


def test_release_runs_store_no_secret_differ_and_name_the_os(pretrained, tmp_path):  # noqa: F811
    outs = [release_run(pretrained, tmp_path, f"r{i}") for i in range(2)]
    states = [load_checkpoint(os.path.join(out, "finetune.pt"))[0] for out in outs]
    for state in states:
        paths = {path for path, _ in all_values(state)}
        words = {w.lower() for path in paths for w in path}
        assert not any(("generator" in w) or ("secret" in w) or ("key" in w) or ("rng" in w) for w in words)
        assert not any(isinstance(leaf, (bytes, bytearray)) for _, leaf in all_values(state))
        assert state["config"]["dp"]["noise_seed"] is None and state["differentially_private"] is True
        assert "operating system" in state["privacy_report"]["noise_source"]
    # two runs from the same pretrained model with the same configuration: different secrets, different models
    diff = [k for k in states[0]["unet"] if not torch.equal(states[0]["unet"][k], states[1]["unet"][k])]
    assert diff and all(k.startswith(("attn.", "class_embed.")) for k in diff)
    grid = json.loads(PIL.Image.open(os.path.join(outs[0], "samples_finetune.png")).text["metadata"])
    assert grid["differentially_private"] is True and grid["epsilon"] == states[0]["privacy_report"]["epsilon"]
    report = json.load(open(os.path.join(outs[0], "privacy_report.json")))
    assert "operating system" in report["noise_source"] and "add/remove" in report["neighbouring_relation"]
    assert "only secret" in report["threat_model"] and report["epsilon_add"] is not None
    assert report["epsilon"] == max(report["epsilon_add"], report["epsilon_remove"])


def test_a_paper_preset_on_a_cpu_prints_no_timing_of_the_private_stage(pretrained, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    """Step times depend on the Poisson-sampled batch sizes: the pace line of ldm/pace.py is for public stages only."""
    import dataclasses

    import dp.finetune
    import ldm.pace
    from ldm.config import make_config
    from ldm.metrics_log import MetricsLog
    monkeypatch.setattr(ldm.pace, "PACE_STEPS", 1)
    monkeypatch.setattr(dp.finetune, "write_samples", lambda *a: "skipped")
    cfg = dataclasses.replace(make_config("smoke", {**BASE, "noise_seed": 3}), preset="paper-mnist")
    out = fresh_run(pretrained, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp.finetune.train_finetune(cfg, out, torch.device("cpu"), False, MetricsLog(None))
    captured = capsys.readouterr()
    shown = captured.err + captured.out
    assert "s per step" not in shown  # no pace line
    bars = [seg for seg in re.split(r"[\r\n]", shown) if seg.startswith("finetune (DP)")]
    assert bars and not [b for b in bars if re.search(r"it/s|s/it|\d+:\d+", b)], bars  # no rate, no elapsed time
