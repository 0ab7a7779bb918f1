"""Benchmark `clip_and_noise`: time per call, achieved bandwidth, and speed-ups over the alternatives.

    python -m kernels.bench [--device cpu|cuda] [--dtype fp32|bf16] [--sizes 64x1e5,256x1e6]
                            [--repeats 7] [--json PATH] [--threads N]

Bytes a call must move (the formula the GB/s column uses): the per-sample gradients read twice
(pass 1 for the norms, pass 2 for the clipped sum) and the result written once:

    bytes = 2 * B * P * elem_size + P * 4

"% copy" compares that with this device's copy bandwidth measured in the same run
(2 * bytes / time of `dst.copy_(src)` on a large buffer). Compared against:
- reference: `clip_and_noise_reference` (plain torch, the CPU path);
- multi-pass: what DP libraries do (Opacus's DPOptimizer, written out here in plain torch):
  a norm per tensor, torch.stack, norm of norms, clamped factor, an einsum per tensor, torch.normal
  noise per tensor, divide;
- opacus: Opacus's own DPOptimizer clip/noise/scale, when opacus is importable.
Every implementation gets the same list of per-parameter tensors (16 of them, separately allocated
as torch.func.vmap returns them). On a CPU the kernel runs only under Triton's interpreter, which
is no timing: the table then times the torch paths, and GB/s is the reference's (the "auto" path).
"""

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from kernels.clip_noise import clip_and_noise, clip_and_noise_reference
from kernels.machine import device_name, environment_line, timing_environment

CUDA_SIZES = [(b, p) for b in (64, 256, 1024) for p in (10**5, 10**6, 10**7)]
CPU_SIZES = [(b, p) for b in (64, 256) for p in (10**5, 10**6)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_NORM, NOISE_STD, DIVISOR, SEED = 1.0, 1.0, 256.0, 0  # a benchmark: a fixed seed is fine here


MIN_P = 16  # param_sizes splits P into 16 tensors of at least one coordinate each


def param_sizes(total):
    """Split `total` coordinates like an attention block: 8 weights interleaved with 8 biases/norms."""
    small = max(1, total // 2000)
    large, rest = divmod(total - 8 * small, 8)
    sizes = []
    for i in range(8):
        sizes += [large + (rest if i == 7 else 0), small]
    return sizes


def make_grads(n_rows, total, dtype, device):
    """list of (B, n_i) per-sample gradients, each its own allocation; norms around 1 (some clipped)."""
    gen = torch.Generator(device=device).manual_seed(0)
    scale = 1.0 / total**0.5
    return [(torch.randn(n_rows, n, generator=gen, device=device) * scale).to(dtype) for n in param_sizes(total)]


def multi_pass(grads, max_norm, noise_std, divisor, generator):
    """The DP-library recipe (Opacus DPOptimizer.clip_and_accumulate + add_noise + scale_grad)."""
    per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grads]  # one pass per tensor
    per_sample_norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)  # (B,)
    factor = (max_norm / (per_sample_norms + 1e-6)).clamp(max=1.0)
    summed = [torch.einsum("i,i...", factor.to(g.dtype), g) for g in grads]  # second pass
    noisy = [s + torch.normal(0.0, noise_std, s.shape, generator=generator, device=s.device) for s in summed]
    return [n / divisor for n in noisy]


def opacus_step(grads, max_norm, noise_std, divisor):
    """A callable running Opacus's clip/noise/scale on `grads`, or None when opacus is not installed."""
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:
        return None
    params = [torch.nn.Parameter(torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device)) for g in grads]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=noise_std / max_norm,
                            max_grad_norm=max_norm, expected_batch_size=max(1, round(divisor)))

    def step():
        for p, g in zip(params, grads):
            p.grad_sample = g.view(g.shape)  # a fresh tensor object: Opacus flags the one it processed
        optimizer.clip_and_accumulate()
        optimizer.add_noise()
        optimizer.scale_grad()
        optimizer.zero_grad(set_to_none=True)  # drops grad_sample and summed_grad for the next call

    return step


def timed(fn, device, repeats, warmup=2):
    """Median seconds per call of fn(), after warm-up (compilation, allocator)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, repeats):
    """Bytes per second of dst.copy_(src) (each byte read once and written once)."""
    n_bytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * n_bytes / seconds


def free_bytes(device):
    """Memory available for the next configuration (on CUDA, counting the allocator's unused cache)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    with open("/proc/meminfo") as f:  # Linux; elsewhere no check
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in info else float("inf")


def bench_one(n_rows, total, dtype, device, repeats, copy_bw):
    """One row of the table (a dict); None where the gradients do not fit with headroom."""
    elem = torch.finfo(dtype).bits // 8
    need = n_rows * total * elem + (n_rows * total * 4 // 8 if dtype != torch.float32 else 0)  # + fp32 temp
    if 1.5 * need > free_bytes(device):
        return None
    grads = make_grads(n_rows, total, dtype, device)
    gen = torch.Generator(device=device).manual_seed(SEED)
    args = (MAX_NORM, NOISE_STD, DIVISOR, SEED)
    row = {"B": n_rows, "P": total, "dtype": str(dtype).replace("torch.", ""),
           "bytes": 2 * n_rows * total * elem + total * 4}
    row["reference_s"] = timed(lambda: clip_and_noise_reference(grads, *args), device, repeats)
    row["multi_pass_s"] = timed(lambda: multi_pass(grads, MAX_NORM, NOISE_STD, DIVISOR, gen), device, repeats)
    opacus = opacus_step(grads, MAX_NORM, NOISE_STD, DIVISOR)
    row["opacus_s"] = timed(opacus, device, repeats) if opacus else None
    if device.type == "cuda":
        got = torch.cat(clip_and_noise(grads, MAX_NORM, 0.0, DIVISOR, SEED, backend="triton"))
        want = torch.cat(clip_and_noise_reference(grads, MAX_NORM, 0.0, DIVISOR, SEED))
        row["rel_err"] = ((got - want).norm() / want.norm()).item()
        row["kernel_s"] = timed(lambda: clip_and_noise(grads, *args, backend="triton"), device, repeats)
    main_s = row.get("kernel_s", row["reference_s"])
    row["gb_per_s"] = row["bytes"] / main_s / 1e9
    row["copy_share"] = row["bytes"] / main_s / copy_bw
    for name in ("reference", "multi_pass", "opacus"):
        if device.type == "cpu" and name == "reference":
            continue
        row[f"speedup_vs_{name}"] = row[f"{name}_s"] / main_s if row[f"{name}_s"] else None
    return row


def print_table(rows, device):
    """One line per configuration; times in ms; '-' where not measured."""
    on_gpu = device.type == "cuda"
    cols = [("B", "B", "d", 1), ("P", "P", ".0e", 1)]
    cols += [("kernel ms", "kernel_s", ".3f", 1e3)] if on_gpu else []
    cols += [("ref ms", "reference_s", ".3f", 1e3), ("multi ms", "multi_pass_s", ".3f", 1e3),
             ("opacus ms", "opacus_s", ".3f", 1e3),
             ("kernel GB/s" if on_gpu else "ref GB/s", "gb_per_s", ".1f", 1), ("% copy", "copy_share", ".1%", 1)]
    cols += [("x vs ref", "speedup_vs_reference", ".2f", 1)] if on_gpu else []
    cols += [("x vs multi", "speedup_vs_multi_pass", ".2f", 1), ("x vs opacus", "speedup_vs_opacus", ".2f", 1)]
    cols += [("rel err", "rel_err", ".1e", 1)] if on_gpu else []
    print(" | ".join(f"{title:>11}" for title, *_ in cols))
    for row in rows:
        cells = ["-" if row.get(key) is None else format(row[key] * scale, spec) for _, key, spec, scale in cols]
        print(" | ".join(f"{cell:>11}" for cell in cells))


def parse_sizes(text):
    """'64x1e5,256x1000000' -> [(64, 100000), (256, 1000000)]"""
    sizes = []
    for item in text.split(","):
        b, _, p = item.strip().partition("x")
        try:
            sizes.append((int(b), int(float(p))))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes items are BxP, like 64x1e5; got {item!r}") from None
        if sizes[-1][0] < 1 or sizes[-1][1] < MIN_P:
            raise argparse.ArgumentTypeError(f"--sizes {item!r}: need B >= 1 examples and P >= {MIN_P} coordinates "
                                             f"(P is split into 16 tensors, none of them empty)")
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=parse_sizes, default=None, help="BxP list, e.g. 64x1e5,256x1e6")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this path")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    dtype = DTYPES[args.dtype]

    copy_bw = copy_bandwidth(device, args.repeats)
    name = device_name(device)
    print(f"clip_and_noise on {name}, {args.dtype}; bytes = 2 * B * P * elem_size + P * 4 "
          f"(gradients read twice, result written once); copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(environment_line())
    if device.type == "cpu":
        print("CPU: the Triton kernel only runs under the interpreter, which is no timing; "
              "timing the torch paths, GB/s of the reference")
    try:
        import opacus  # noqa: F401
    except ImportError:
        print("opacus not installed")
    rows, skipped = [], []
    for n_rows, total in tqdm(sizes, desc="configurations"):
        row = bench_one(n_rows, total, dtype, device, args.repeats, copy_bw)
        if row is None:
            skipped.append(f"{n_rows}x{total:.0e}")
        else:
            rows.append(row)
    print_table(rows, device)
    if skipped:
        print(f"skipped (gradients do not fit in memory with headroom): {', '.join(skipped)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "environment": timing_environment(), "dtype": args.dtype,
                       "copy_bandwidth_bytes_per_s": copy_bw, "formula": "2 * B * P * elem_size + P * 4", "rows": rows,
                       "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
