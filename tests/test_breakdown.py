"""`python -m dp.breakdown` on the smoke preset: every phase of both steps is named, the named ranges account for
the profiled step, and the printed budget follows the formula the module states. No speed is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dp.bench import GOAL_VS_NONPRIVATE
from dp.breakdown import budget_ms, chatter, parse_args, report
from kernels.machine import environment_line

REPO = Path(__file__).resolve().parents[1]
OURS = {"bookkeeping.capture", "bookkeeping.factors", "dp.noise", "dp.update", "dp.sample", "dp.inputs"}
NONPRIVATE = {"nonprivate.forward", "nonprivate.backward", "nonprivate.update", "nonprivate.inputs"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("breakdown") / "out.json"
    cmd = [sys.executable, "-m", "dp.breakdown", "--preset", "smoke", "--batch", "16", "--steps", "2", "--threads",
           "1", "--json", str(path)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, json.loads(path.read_text())


def test_every_phase_of_both_steps_is_named_and_they_account_for_the_step(smoke_run):
    stdout, out = smoke_run
    a, b = out["results"]["a"], out["results"]["b"]
    assert NONPRIVATE <= set(a["phases"]) and OURS <= set(b["phases"])
    kinds = {k for k in b["phases"] if k.startswith(("bookkeeping.norms ", "bookkeeping.sums "))}
    for kind in ("Linear kept", "Linear ghost", "LayerNorm", "GroupNorm", "Embedding"):  # smoke has all five
        assert {f"bookkeeping.norms {kind}", f"bookkeeping.sums {kind}"} <= kinds
    assert not set(b["phases"]) & NONPRIVATE and not set(a["phases"]) & OURS
    fixed = OURS | NONPRIVATE | {"other"} | {f"bookkeeping.{step} {kind}" for step in ("norms", "sums") for kind in
                                             ("Linear kept", "Linear ghost", "Linear", "LayerNorm", "GroupNorm",
                                              "Embedding")}
    assert set(a["phases"]) | set(b["phases"]) <= fixed  # fixed names only: no data value reaches a range's name
    for r in (a, b):
        named = sum(ms for k, ms in r["phases"].items() if k != "other")
        assert all(ms >= 0 for k, ms in r["phases"].items() if k != "other")
        assert 0.8 * r["profiled_step_ms"] <= named <= 1.05 * r["profiled_step_ms"]  # the ranges cover the step
        assert r["step_ms"] > 0
    assert "bookkeeping.capture" in stdout and "nonprivate.backward" in stdout
    assert out["environment"]["OMP_NUM_THREADS"] == "1" and out["device"].startswith("CPU (")
    assert stdout.splitlines()[1] == environment_line({**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_budget_line_is_the_goal_applied_to_the_nonprivate_step(smoke_run):
    stdout, out = smoke_run
    a, b = out["results"]["a"], out["results"]["b"]
    budget = a["step_ms"] * (1 / GOAL_VS_NONPRIVATE - 1)
    assert budget_ms(a["step_ms"]) == pytest.approx(budget)
    last = report(out["results"])[-1]
    assert last == stdout.strip().splitlines()[-1]
    assert f"leaves {budget:.0f} ms" in last and f"ratio {a['step_ms'] / b['step_ms']:.2f}" in last
    assert f"{b['step_ms'] - a['step_ms']:.0f} ms per step" in last


def test_profiler_chatter_is_dropped_and_errors_are_not():
    assert chatter("USDT:2026-12-05 12:09:25 4201:4201 SyncActivityProfilerHandler.cpp:39] profiler_start")
    assert chatter("ERROR:2026-12-05 12:09:09 4174:4174 DeviceProperties.cpp:56] gpuGetDeviceCount failed")
    assert not chatter("Traceback (most recent call last):")


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be >= 1, got 0"),
                                          (["--warmup", "-1"], "--warmup must be >= 0"),
                                          (["--preset", "nope"], "invalid choice: 'nope'")])
def test_bad_arguments_are_refused_with_the_value(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_physical_batch_defaults_to_the_presets():
    assert parse_args(["--preset", "quick"]).physical_batch == 128
    assert parse_args(["--preset", "smoke", "--physical-batch", "3"]).physical_batch == 3


def test_a_phase_is_a_profile_range_only_while_a_profiler_records():
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dp.phases import phase
    assert isinstance(phase("idle"), contextlib.nullcontext)  # costs nothing outside a profile
    with phase("idle"):
        torch.ones(3).sum()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with phase("dp.test-range"):
            torch.ones(3).sum()
    assert "dp.test-range" in {e.key for e in prof.key_averages()}
    assert isinstance(phase("idle"), contextlib.nullcontext)
