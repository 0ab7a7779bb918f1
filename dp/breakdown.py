"""Where one DP step's time goes, phase by phase, against the non-private step: a profile, not a race.

    python -m dp.breakdown [--preset quick] [--batch 256] [--physical-batch N] [--steps 5] [--warmup 1]
                           [--threads 1] [--json PATH]

Takes the two steps of `python -m dp.bench`, (a) non-private and (b) ours (`dp.step.dp_step`, book-keeping), on
the same UNet, trainable set and random batch, each in its own fresh subprocess (as the bench does: one process's
allocator state changes the other's times). In each: --warmup untimed steps, --steps timed steps without a
profiler (their median is the step time), then --steps steps under `torch.profiler`, which sums, per step, the
time inside each named range (`torch.profiler.record_function`, no-ops when nothing records):

  ours         dp.sample, dp.inputs (each example's draws), bookkeeping.capture (forward with hooks, one
               backward to the selected layers' outputs), bookkeeping.norms KIND (step 3, per kind of layer),
               bookkeeping.factors, bookkeeping.sums KIND (step 5), dp.noise, dp.update (AdamW)
  non-private  nonprivate.inputs, nonprivate.forward, nonprivate.backward (weight gradients included),
               nonprivate.update

KIND (dp/bookkeeping.py `_kind`): 'Linear kept' (per-sample weight gradients built and kept: their arithmetic is
the layer's weight gradient, then a norm pass and a weighted-sum pass), 'Linear ghost' (ghost norm from two Gram
matrices per example; the sum is one matrix product, the layer's weight gradient), or the module type (norm
layers, the class embedding: small per-sample gradients formed directly). 'other' is the step's profiled time
outside every range (accumulating micro-batches, dividing, Python). The profiler records every op, so profiled
steps run somewhat slower than the unprofiled step time printed beside them; compare phases within a column.

The last lines say what the goal of `dp.bench` (ours at least GOAL_VS_NONPRIVATE times the non-private
samples/s) leaves for everything ours does beyond the non-private step: non-private seconds x (1 / goal - 1).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dp.bench import GOAL_VS_NONPRIVATE, build_setup, nonprivate_step, ours_step
from kernels.machine import device_name, environment_line, timing_environment
from ldm.config import PRESETS, make_config

METHODS = {"a": ("non-private", nonprivate_step), "b": ("ours (DP, bk)", ours_step)}
PREFIXES = ("nonprivate.", "dp.", "bookkeeping.")  # the ranges named in dp/bench.py, dp/step.py, dp/bookkeeping.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_seconds(step, n):
    """Wall seconds of each of n calls of step()."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def profiled_phases(step, n):
    """({range name: ms per step}, profiled ms per step) over n steps, each under its own torch.profiler (CPU):
    one profile of many steps holds so many events that the later ones slow down."""
    phases, total = {}, 0.0
    for _ in range(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total += step_seconds(step, 1)[0]
        for e in prof.key_averages():
            if e.key.startswith(PREFIXES):
                phases[e.key] = phases.get(e.key, 0.0) + e.cpu_time_total / 1e3 / n
    return phases, total * 1e3 / n


def measure(args):
    """Method --only in this process: its step time without a profiler and its phases under one, as a dict."""
    name, make = METHODS[args.only]
    s = build_setup(args, torch.device("cpu"))
    step = make(s)
    step_seconds(step, args.warmup)
    plain = statistics.median(step_seconds(step, args.steps)) * 1e3
    phases, profiled = profiled_phases(step, args.steps)
    phases["other"] = profiled - sum(phases.values())
    return {"method": args.only, "name": name, "step_ms": plain, "profiled_step_ms": profiled, "phases": phases}


def run_child(args, method):
    """`--only method` in a fresh interpreter; its dict."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "dp.breakdown", "--only", method, "--preset", args.preset, "--batch",
               str(args.batch), "--physical-batch", str(args.physical_batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--json", path]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
        sys.stderr.write("".join(line for line in done.stderr.splitlines(keepends=True) if not chatter(line)))
        if done.returncode:
            raise RuntimeError(f"dp.breakdown: the subprocess profiling {METHODS[method][0]!r} exited with code "
                               f"{done.returncode} (its error is printed above)")
        with open(path) as f:
            return json.load(f)


def chatter(line):
    """The profiler's own start/stop lines on stderr (and its failed GPU probe on a CPU machine): not shown."""
    return line.startswith("USDT:") or "profiler_st" in line or "gpuGetDeviceCount" in line


def budget_ms(nonprivate_ms):
    """What ours may spend beyond the non-private step and still reach GOAL_VS_NONPRIVATE of its samples/s."""
    return nonprivate_ms * (1 / GOAL_VS_NONPRIVATE - 1)


def report(results):
    """The two phase tables and the overhead against the goal's budget, as lines."""
    lines = []
    for r in results.values():
        lines.append(f"{r['name']:<38} | {'ms/step':>8} | {'share':>6}")
        for phase, ms in sorted(r["phases"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {phase:<36} | {ms:>8.1f} | {100 * ms / r['profiled_step_ms']:>5.1f}%")
        lines.append(f"  {'step, profiled':<36} | {r['profiled_step_ms']:>8.1f} |")
        lines.append(f"  {'step, not profiled (median)':<36} | {r['step_ms']:>8.1f} |")
    a, b = results["a"], results["b"]
    over, budget = b["step_ms"] - a["step_ms"], budget_ms(a["step_ms"])
    lines.append(f"ours - non-private, not profiled: {over:.0f} ms per step (ratio {a['step_ms'] / b['step_ms']:.2f}); "
                 f"the goal (at least {GOAL_VS_NONPRIVATE}x) leaves {budget:.0f} ms")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    parser.add_argument("--batch", type=int, default=256, help="examples per logical step (B)")
    parser.add_argument("--physical-batch", type=int, default=None, help="ours' micro-batch; default: the preset's")
    parser.add_argument("--steps", type=int, default=5, help="steps timed, then steps profiled, per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    parser.add_argument("--only", choices=tuple(METHODS), default=None,
                        help="measure one method in this process (used by the main run for each subprocess)")
    args = parser.parse_args(argv)
    args.dp_blocks, args.dp_lora = None, 0  # build_setup's: the preset's trainable set
    args.physical_batch = args.physical_batch or make_config(args.preset).dp.physical_batch
    for name in ("batch", "physical_batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error(f"--warmup must be >= 0 and --threads >= 1; got {args.warmup} and {args.threads}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        results = measure(args)
    else:
        print(f"dp.breakdown: preset {args.preset}, batch {args.batch}, physical batch {args.physical_batch}, "
              f"{device_name('cpu')}, torch {torch.__version__}")
        print(environment_line())
        results = {m: run_child(args, m) for m in METHODS}
        print("\n".join(report(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if args.only else {"args": dict(vars(args), json=os.path.basename(args.json)),
                                                 "device": device_name("cpu"), "environment": timing_environment(),
                                                 "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
