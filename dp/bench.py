"""Benchmark one DP fine-tuning step against a non-private step and Opacus, on the same UNet and trainable set.

    python -m dp.bench [--preset quick] [--batch 256] [--physical-batch N] [--repeats R] [--warmup W]
                       [--threads T] [--device cpu|cuda] [--dp-blocks SPEC] [--dp-lora RANK] [--sequential]
                       [--json PATH]

Five ways to take one optimiser step on the parameters `select_trainable(unet, cfg)` (dp/select.py) of the
preset's UNet, for one batch of B random latents, labels, timesteps and noise draws:
  (a) non-private: forward and backward of the mean diffusion loss, one optimiser step;
  (b) ours, the default: training's own `dp.step.dp_step` with q = 1 and --grad-method bookkeeping (per physical
      micro-batch, one forward and backward, per-sample norms layer by layer with no (b, P) per-sample gradient,
      the clipped sum as one matrix product or weighted sum per layer; dp/bookkeeping.py), add N(0, (sigma C)^2),
      divide by B, update;
  (v) ours with --grad-method vmap: torch.func per-sample gradients materialised per micro-batch, clipped to C
      jointly and summed by kernels/clip_noise.py, then the same noise, divisor and update;
  (c) opacus: the same UNet in `opacus.GradSampleModule` (hooks materialise per-sample gradients) and
      `opacus.optimizers.DPOptimizer` with the same C, sigma and expected batch size B (flat clipping: a norm per
      tensor, stack, norm of norms, clamped factor, an einsum per tensor), when opacus is importable;
  (g) opacus ghost: Opacus's fast gradient clipping, the same idea as book-keeping (Li et al. 2022, Bu et al.
      2023): `GradSampleModuleFastGradientClipping` (ghost norms for Linear layers, per-sample norms for the rest)
      and `DPOptimizerFastGradientClipping`, driven by `DPTensorFastGradientClipping.backward`, which takes two
      backward passes (norms, then the loss reweighted by the clip factors), with the same C, sigma and B.
Opacus is given the selected parameters that a backward reaches (`opacus_params`): it raises for one that
none does, and attn2.to_q, to_k and norm2 are never called (ldm/attention.py `Attention.one_key`). Everything
that calls Opacus is in dp/bench_opacus.py.
The same optimiser (the preset's, AdamW for quick) follows each. samples/s = B / median seconds per step, after
warm-up steps. Each method runs in a fresh subprocess of this script (`--only a|b|v|c|g`), so its peak memory is
its own: on CPU the peak resident set of that process (ru_maxrss: torch, the model and the step; "+step" is the
growth during the steps), on CUDA torch.cuda.max_memory_allocated over the steps.

The methods are timed in turn (`run_interleaved`): all subprocesses start, warm up, and then each round takes one
timed step of every method, the first one rotating. On a machine whose speed drifts over the minutes of a run
(a shared host: on the development machine the same step varied by 10-20% between runs) every method then sees
the same drift, so the ratios of one run are fair. Their memory adds up while they live together;
`--sequential` times one method after another instead, as earlier versions did.

The first lines name the machine and the environment variables set that change timings (kernels/machine.py);
the JSON keeps both.

Sanity check (main process, one batch): our clipped sum and Opacus's (sigma 0, C = the median per-sample norm,
so half the examples are clipped) must agree; it also checks our per-sample gradients against an independent
implementation. Our unclipped per-sample sum is compared with autograd's batch gradient as well.

The weights are random (a benchmark needs no trained model); zero-initialised weights (proj_out, conv2, conv_out)
are redrawn from N(0, 0.02^2) so that every selected tensor gets a non-zero gradient. Noise here comes from a fixed
seed: a benchmark, not a training run. Numbers depend on the machine and its load; run it more than once.
Where the time of (a) and (b) goes, phase by phase: `python -m dp.breakdown` (dp/breakdown.py).
"""

import argparse
import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from dp.bench_opacus import opacus_clipped_sum, opacus_coverage, opacus_step, zero_if_none
from dp.per_sample import per_sample_grads
from dp.phases import phase
from dp.randomness import seeded_secret
from dp.select import selection_size
from dp.sensitivity import random_task
from dp.step import Mechanism, Task, dp_step, example_inputs, make_optimizer, private_gradient
from kernels.clip_noise import clip_and_noise_reference
from kernels.machine import device_name, environment_line, timing_environment
from ldm.config import PRESETS, make_config
from ldm.errors import UserError

METHODS = {"a": "non-private", "b": "ours (DP, bk)", "v": "ours (DP, vmap)", "c": "opacus (DP)",
           "g": "opacus ghost (DP)"}
OPACUS_METHODS = ("c", "g")
SIGMA = 1.0  # noise multiplier for the timed steps (the time does not depend on its value)
SEED = 0
GOAL_VS_OPACUS = 1.5  # ours must reach at least 1.5x Opacus's (hook mode) samples/s
GOAL_VS_GHOST = 1.6  # ... 1.6x Opacus's ghost clipping
GOAL_VS_NONPRIVATE = 0.95  # ... and 0.95x the non-private step's samples/s
CROSS_ATTENTION_QK = {"norm2.weight", "norm2.bias", "attn2.to_q.weight", "attn2.to_k.weight"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Setup:
    """Everything a step needs: the preset's config and a Task (dp/step.py) whose "private set" is one batch."""
    cfg: object
    task: Task  # random weights (zero-initialised ones redrawn) and B random latents: dp/sensitivity.random_task
    secret: object  # seeded: a benchmark, not a training run
    idx: torch.Tensor  # (B,) the sampled examples: all of them, every step (q = 1)
    step: int = 0  # advances after every timed step, so each step has fresh per-example draws and noise


def build_setup(args, device):
    """The preset's UNet with random weights, its selected parameters and B random latents."""
    cfg = make_config(args.preset, {"physical_batch": args.physical_batch, "seed": SEED, "dp_blocks": args.dp_blocks,
                                    "dp_lora": args.dp_lora})
    task = random_task(cfg, args.batch, device)
    task.unet.train()
    return Setup(cfg, task, seeded_secret(SEED + 2, "benchmark seed"), torch.arange(args.batch, device=device))


def draw_inputs(s):
    """(z0, y, t, noise) for the examples s.idx at step s.step, exactly as `dp.step` draws them."""
    return example_inputs(s.task, s.secret, s.step, s.idx)


def nonprivate_step(s):
    """(a) One batch, one backward of the mean loss, one optimiser step."""
    opt = make_optimizer(s.cfg.dp, s.task.params)

    def step():  # each stretch named for `python -m dp.breakdown` (a no-op unless a profiler records)
        with phase("nonprivate.inputs"):
            inputs = draw_inputs(s)
        with phase("nonprivate.forward"):
            loss = s.task.diffusion.loss_per_example(s.task.unet, *inputs).mean()
        with phase("nonprivate.backward"):
            loss.backward()
        with phase("nonprivate.update"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        s.step += 1
    return step


def ours_step(s, method="bookkeeping"):
    """(b, v) The DP step of training, `dp.step.dp_step`, with q = 1 (every example sampled), divisor B."""
    opt = make_optimizer(s.cfg.dp, s.task.params)
    task = dataclasses.replace(s.task, method=method)
    mech = Mechanism(q=1.0, clip=s.cfg.dp.clip, sigma=SIGMA, divisor=float(len(s.idx)))

    def step():
        dp_step(task, mech, s.secret, s.step, opt, s.cfg.dp.lr)
        s.step += 1
    return step


def cpu_seconds():
    """User + system CPU time of this process so far, all threads (robust to other processes on the machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib():
    """Peak resident set of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, sync):
    """(wall seconds, CPU seconds) of one step."""
    sync()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    step()
    sync()
    return time.perf_counter() - start, cpu_seconds() - cpu_start


def timed_steps(args, requests, ready=lambda: None, report=lambda wall, cpu: None):
    """Set up method --only in this process, take args.warmup untimed steps, call `ready`, then one timed step per
    item of `requests` (each reported to `report`). Returns the method's median seconds per step (wall clock and
    CPU) and peak memory, as a dict."""
    device = torch.device(args.device)
    s = build_setup(args, device)
    step = {"a": nonprivate_step, "b": ours_step, "v": lambda s: ours_step(s, "vmap"),
            "c": lambda s: opacus_step(s, "c", SIGMA), "g": lambda s: opacus_step(s, "g", SIGMA)}[args.only](s)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_rss_mib()
    for _ in range(args.warmup):
        timed(step, sync)
    ready()
    times, cpu_times = [], []
    for _ in requests:
        wall, cpu = timed(step, sync)
        times.append(wall)
        cpu_times.append(cpu)
        report(wall, cpu)
    seconds = statistics.median(times)
    result = {"method": args.only, "name": METHODS[args.only], "seconds": seconds, "times": times,
              "cpu_seconds": statistics.median(cpu_times), "cpu_times": cpu_times,
              "samples_per_s": args.batch / seconds, "peak_rss_mib": peak_rss_mib(),
              "step_rss_mib": peak_rss_mib() - before, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def measure(args):
    """Time one method (--only) in this process, args.repeats steps one after another: the dict of `timed_steps`."""
    return timed_steps(args, tqdm(range(args.repeats), desc=METHODS[args.only], leave=False))


def serve(args, commands, replies):
    """Time one method (--only) on request: after set-up and warm-up write "ready"; then, for each line read from
    `commands` until "done", take one step and write its times as JSON; then write the `timed_steps` dict."""
    def say(text):
        print(text, file=replies, flush=True)
    requests = itertools.takewhile(lambda line: line.strip() != "done", commands)
    result = timed_steps(args, requests, ready=lambda: say("ready"),
                         report=lambda wall, cpu: say(json.dumps({"seconds": wall, "cpu_seconds": cpu})))
    say(json.dumps(result))


def child_command(args, method, *extra):
    """The command line of the subprocess that times `method` with this run's settings."""
    cmd = [sys.executable, "-m", "dp.bench", "--only", method, "--preset", args.preset, "--batch", str(args.batch),
           "--physical-batch", str(args.physical_batch), "--repeats", str(args.repeats), "--warmup",
           str(args.warmup), "--device", args.device, "--dp-lora", str(args.dp_lora), *extra]
    if args.dp_blocks:
        cmd += ["--dp-blocks", args.dp_blocks]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def run_child(args, method):
    """Run `--only method` in a fresh interpreter (its own peak memory), all its steps at once; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        subprocess.run(child_command(args, method, "--json", path), cwd=REPO, check=True)
        with open(path) as f:
            return json.load(f)


def reply(child, method):
    """The next line a serving subprocess writes; a clear error if it died instead."""
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"dp.bench: the subprocess timing {METHODS[method]!r} exited with code {child.wait()} "
                           f"(its error is printed above)")
    return line


def round_order(methods, r):
    """The methods in the order round r steps them: the list rotated by r, so each leads one round in len(methods)."""
    k = r % len(methods)
    return methods[k:] + methods[:k]


def run_interleaved(args, methods):
    """Every method in its own fresh interpreter (its own peak memory), all started together and stepped in turn:
    round r takes one timed step of each method, the first method rotating from round to round. A machine whose
    speed drifts during the run (other load, clock changes) then slows every method alike, so the ratios of one
    run compare like with like. The subprocesses live at the same time: their memory adds up (--sequential
    times them one after another instead)."""
    children = {m: subprocess.Popen(child_command(args, m, "--serve"), cwd=REPO, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for m in methods}
    try:
        for m, child in children.items():  # set-up and warm-up, untimed (they may overlap)
            if reply(child, m).strip() != "ready":
                raise RuntimeError(f"dp.bench: the subprocess timing {METHODS[m]!r} did not start")
        for r in tqdm(range(args.repeats), desc="rounds (one step of each method)"):
            for m in round_order(methods, r):
                children[m].stdin.write("step\n")
                children[m].stdin.flush()
                reply(children[m], m)
        results = {}
        for m, child in children.items():
            child.stdin.write("done\n")
            child.stdin.flush()
            results[m] = json.loads(reply(child, m))
            child.wait()
        return results
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


def rel_diff(a, b):
    """||a - b|| / ||b|| over all tensors jointly. (Per tensor, the ratio is rounding noise over rounding noise
    for the tensors whose gradient is zero but for rounding, e.g. biases feeding a GroupNorm.)"""
    diff = sum((x.double() - y.double()).pow(2).sum() for x, y in zip(a, b))
    return (diff.sqrt() / sum(y.double().pow(2).sum() for y in b).sqrt().clamp_min(1e-300)).item()


def zero_gradient_line(names, grads):
    """Which selected tensors got an all-zero batch gradient, and why when it is the known structural case."""
    zero = [n for n, g in zip(names, grads) if not g.any()]
    kinds = sorted({n.split(".", 2)[-1] for n in zero})
    line = f"selected tensors with an all-zero gradient: {len(zero)}/{len(names)}"
    if zero and set(kinds) <= CROSS_ATTENTION_QK:
        line += (f" ({', '.join(kinds)} of the transformer blocks: cross-attention to the single class-context "
                 f"token has softmax weight 1 whatever q and k, so the forward skips its query/key path)")
    elif zero:
        line += f" ({', '.join(zero[:6])}{', ...' if len(zero) > 6 else ''})"
    return line


def per_sample_norms(s, names, z0, y, t, noise):
    """(b,) L2 norm of each example's gradient over all selected tensors jointly (private data: diagnostics only)."""
    grads = per_sample_grads(s.task.unet, s.task.diffusion, s.task.params, z0, y, t, noise)
    return clip_and_noise_reference([grads[n] for n in names], 1.0, 0.0, 1.0, 0, return_norms=True)[1]


def sanity_check(args, with_opacus):
    """On one batch: ours (sigma 0) vs Opacus's clipped gradient, and our unclipped per-sample sum vs autograd."""
    device = torch.device(args.device)
    s = build_setup(args, device)
    task, names = s.task, list(s.task.params)
    z0, y, t, noise = draw_inputs(s)
    norms = torch.cat([per_sample_norms(s, names, z0[c], y[c], t[c], noise[c])
                       for c in torch.arange(len(z0), device=z0.device).split(args.physical_batch)])
    clip = norms.median().item()  # half the examples clipped, half not: both branches of the factor are used
    task.unet.zero_grad(set_to_none=True)
    task.diffusion.loss_per_example(task.unet, z0, y, t, noise).sum().backward()
    autograd = [zero_if_none(task.params[n]) for n in names]
    task.unet.zero_grad(set_to_none=True)
    lines, out = [], {"clip": clip, "median_norm": clip, "max_norm": norms.max().item()}

    def ours(method, clip, divisor=1.0):  # the clipped sum of `dp.step.private_gradient`, sigma 0
        mech = Mechanism(q=1.0, clip=clip, sigma=0.0, divisor=divisor)
        return private_gradient(dataclasses.replace(task, method=method), mech, s.secret, s.step, s.idx)
    out["vs_autograd"] = rel_diff(ours("bookkeeping", None), autograd)
    out["bk_vs_vmap"] = rel_diff(ours("bookkeeping", clip), ours("vmap", clip))
    lines.append(f"sanity: ours book-keeping vs ours vmap clipped sum (C = median norm): relative difference "
                 f"{out['bk_vs_vmap']:.2e}")
    lines.append(f"sanity: ours unclipped (sum of per-sample gradients) vs autograd batch gradient: relative "
                 f"difference {out['vs_autograd']:.2e}")
    lines.append(zero_gradient_line(names, autograd))
    if with_opacus:
        mine = ours("bookkeeping", clip, float(args.batch))
        lines.append(opacus_coverage(task.unet))
        for method, key in (("c", "vs_opacus"), ("g", "vs_opacus_ghost")):
            out[key] = rel_diff(mine, opacus_clipped_sum(s, method, clip, names))
            lines.append(f"sanity: ours vs {METHODS[method].replace(' (DP)', '')} clipped gradient sum (sigma 0, "
                         f"C = median per-sample norm {clip:.3g}, max norm {out['max_norm']:.3g}): relative "
                         f"difference {out[key]:.2e}")
    return lines, out


def print_report(results, device):
    """The table, the ratios measured in this run (wall clock and CPU time) and whether the goals are met."""
    on_cuda = device == "cuda"
    mem = "peak CUDA MiB" if on_cuda else "peak RSS MiB"
    print(f"{'method':<17} | {'s/step':>7} | {'samples/s':>9} | {'CPU s/step':>10} | {mem:>13} | {'+step MiB':>9}")
    for r in results.values():
        peak = r["peak_cuda_mib"] if on_cuda else r["peak_rss_mib"]
        print(f"{r['name']:<17} | {r['seconds']:>7.3f} | {r['samples_per_s']:>9.1f} | {r['cpu_seconds']:>10.3f} | "
              f"{peak:>13.0f} | {r['step_rss_mib']:>9.0f}")
    a, b, v, c = (results.get(k) for k in "abvc")
    ratios = {"dp_over_nonprivate": a["seconds"] / b["seconds"],
              "dp_over_nonprivate_cpu": a["cpu_seconds"] / b["cpu_seconds"]}
    print(f"ours / non-private samples/s: {ratios['dp_over_nonprivate']:.2f} (CPU time: "
          f"{ratios['dp_over_nonprivate_cpu']:.2f}); goal at least {GOAL_VS_NONPRIVATE:.2f}: "
          f"{verdict(ratios['dp_over_nonprivate'] >= GOAL_VS_NONPRIVATE)}")
    if v is not None:
        ratios["bk_over_vmap"] = v["seconds"] / b["seconds"]
        ratios["vmap_over_nonprivate"] = a["seconds"] / v["seconds"]
        print(f"ours book-keeping / ours vmap samples/s: {ratios['bk_over_vmap']:.2f}; "
              f"vmap / non-private: {ratios['vmap_over_nonprivate']:.2f}")
    if c is None:
        print("opacus not installed: no comparison column")
        return ratios
    if v is not None:
        ratios["vmap_over_opacus"] = c["seconds"] / v["seconds"]
        print(f"ours vmap / opacus samples/s: {ratios['vmap_over_opacus']:.2f}")
    ratios["dp_over_opacus"] = c["seconds"] / b["seconds"]
    ratios["dp_over_opacus_cpu"] = c["cpu_seconds"] / b["cpu_seconds"]
    print(f"ours / opacus samples/s: {ratios['dp_over_opacus']:.2f} (CPU time: {ratios['dp_over_opacus_cpu']:.2f}); "
          f"goal at least {GOAL_VS_OPACUS}: {verdict(ratios['dp_over_opacus'] >= GOAL_VS_OPACUS)}")
    g = results["g"]
    ratios["dp_over_opacus_ghost"] = g["seconds"] / b["seconds"]
    ratios["dp_over_opacus_ghost_cpu"] = g["cpu_seconds"] / b["cpu_seconds"]
    print(f"ours / opacus ghost samples/s: {ratios['dp_over_opacus_ghost']:.2f} (CPU time: "
          f"{ratios['dp_over_opacus_ghost_cpu']:.2f}); goal at least {GOAL_VS_GHOST}: "
          f"{verdict(ratios['dp_over_opacus_ghost'] >= GOAL_VS_GHOST)}")
    return ratios


def verdict(ok):
    return "met" if ok else "NOT met"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    parser.add_argument("--batch", type=int, default=256, help="examples per logical step (B)")
    parser.add_argument("--physical-batch", type=int, default=None,
                        help="micro-batch for per-sample gradients (ours and Opacus); default: --batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, caches)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dp-blocks", default=None, help="transformer blocks to train (dp/select.py; default: the "
                        "preset's)")
    parser.add_argument("--dp-lora", type=int, default=0, help="LoRA rank on the blocks' attention projections "
                        "(0: train the blocks' own weights)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    parser.add_argument("--only", choices=tuple(METHODS), default=None,
                        help="measure one method in this process (used by the main run for each subprocess)")
    parser.add_argument("--sequential", action="store_true",
                        help="time the methods one after another (less memory at once) instead of in turn")
    parser.add_argument("--serve", action="store_true",
                        help="with --only: take one step per 'step' line on stdin (used by the interleaved run)")
    args = parser.parse_args(argv)
    args.physical_batch = args.physical_batch or args.batch
    for name in ("batch", "physical_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be >= 0 and --threads >= 1")
    if args.serve and not args.only:
        parser.error("--serve needs --only METHOD (it is how the interleaved run drives each subprocess)")
    if args.only in OPACUS_METHODS and importlib.util.find_spec("opacus") is None:
        parser.error(f"--only {args.only}: opacus not installed (it is a benchmark-only dependency)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    if args.only is None:  # --dp-blocks and --dp-lora as training checks them; the subprocesses get checked values
        try:
            random_task(make_config(args.preset, {"dp_blocks": args.dp_blocks, "dp_lora": args.dp_lora}), 1,
                        torch.device("cpu"))
        except UserError as e:
            parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only and args.serve:  # stdout is the reply channel: anything else printed goes to stderr
        replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        serve(args, sys.stdin, replies)
        return
    if args.only:
        result = measure(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
        return
    with_opacus = importlib.util.find_spec("opacus") is not None
    s = build_setup(args, torch.device("cpu"))
    n_train, share = selection_size(s.task.unet, s.task.params)
    where = device_name(args.device)
    version = f"opacus {importlib.import_module('opacus').__version__}" if with_opacus else "opacus not installed"
    print(f"dp.bench: preset {args.preset}, UNet {sum(p.numel() for p in s.task.unet.parameters()):,} parameters, "
          f"trainable {n_train:,} ({100 * share:.1f}%) in blocks '{s.cfg.dp.dp_blocks}'"
          f"{f' as rank-{args.dp_lora} LoRA' if args.dp_lora else ''}"
          f"{' + class embedding' if s.cfg.dp.dp_class_embed else ''}; "
          f"batch {args.batch}, physical batch {args.physical_batch}, C={s.cfg.dp.clip:g}, sigma={SIGMA:g}; "
          f"{where}; torch {torch.__version__}; {version}")
    print(environment_line())
    del s
    methods = [m for m in METHODS if m not in OPACUS_METHODS or with_opacus]
    if args.sequential:
        results = {m: run_child(args, m) for m in tqdm(methods, desc="methods (one subprocess each)")}
    else:
        results = run_interleaved(args, methods)
    ratios = print_report(results, args.device)
    lines, check = sanity_check(args, with_opacus)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            shown = dict(vars(args), json=os.path.basename(args.json))  # no path of this machine in the file
            json.dump({"args": shown, "device": where, "environment": timing_environment(), "opacus": version,
                       "trainable": n_train, "results": results, "ratios": ratios, "sanity": check}, f, indent=1)


if __name__ == "__main__":
    main()
