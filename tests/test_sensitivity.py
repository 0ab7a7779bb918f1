"""Sensitivity C: with the secret fixed, adding one example changes the clipped sum by at most C(1 + 1e-5),
wherever it stands in the batch, for both gradient methods, physical batches 1, 7 and 64, and 2 processes."""

import contextlib
import io
import json

import pytest
import torch

import dp.step
from dp import audit
from dp.randomness import seeded_secret
from dp.sensitivity import TOLERANCE, random_task, sensitivity_ratios
from ldm.config import make_config


def block_draws(secret, step, idx, shape, timesteps):
    """The bug this check exists for: every example's draws come from one block sized by the realised batch, so
    that one more example shifts the draws of all the others."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(len(idx), *shape, generator=g), torch.randint(0, timesteps, (len(idx),), generator=g), \
        torch.randn(len(idx), *shape, generator=g)


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return random_task(make_config("smoke", {"seed": 3}), 40, torch.device("cpu"))


def test_one_example_changes_the_clipped_sum_by_at_most_c(task):
    ratios = sensitivity_ratios(task, 1e-3, seeded_secret(1, "test"), 5, torch.arange(32), 36)
    assert len(ratios) == 2 * 3 * 2 * 3  # methods x physical batches x processes x positions
    assert max(ratios.values()) <= 1 + TOLERANCE
    assert min(ratios.values()) > 0.99  # x's gradient is clipped (norm > C): the bound is reached, not avoided


def test_the_check_catches_draws_that_depend_on_the_batch(task, monkeypatch):
    monkeypatch.setattr(dp.step, "example_draws", block_draws)
    ratios = sensitivity_ratios(task, 1e-3, seeded_secret(1, "test"), 5, torch.arange(32), 36,
                                methods=("bookkeeping",), physical_batches=(7,), worlds=(1,))
    assert min(ratios.values()) > 2  # 32 other examples get other draws: many C


def check_command(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = audit.main(argv)
    return status, stdout.getvalue().strip().splitlines()


def test_auditor_command_passes_on_the_real_step_and_fails_on_the_bug(tmp_path, monkeypatch):
    argv = ["--check-sensitivity", "--preset", "smoke", "--out", str(tmp_path / "none")]
    status, lines = check_command(argv)
    report = json.loads(lines[-1])
    assert status == 0 and len(lines) == 1 and report["verdict"] == "consistent"
    assert report["max_change_over_clip"] <= report["limit"] == 1 + TOLERANCE and report["cases"] == 36
    assert "random weights" in report["model"]
    monkeypatch.setattr(dp.step, "example_draws", block_draws)
    status, lines = check_command(argv)
    assert status == 1 and json.loads(lines[-1])["max_change_over_clip"] > 1.5
