"""Tests for kernels/clip_noise.py: the reference against a per-example loop, the Triton kernel
against the reference on irregular shapes, the noise's statistics, seeds, dtypes and errors.

The kernel runs on CPU tensors through Triton's interpreter, which must be switched on before
triton is first imported (it decorates triton's own library functions at import). This module sets
TRITON_INTERPRET=1 first thing; if another test module imported triton earlier without it, the
kernel tests here skip and `test_kernel_tests_in_a_fresh_interpreter` runs them in a subprocess.
On a GPU machine, run with TRITON_INTERPRET=0 to test the compiled kernel on CUDA tensors instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, by this module or kernels

import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import clip_noise as cn  # noqa: E402
from kernels import philox  # noqa: E402
from ldm.errors import UserError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MODE = cn.triton_mode()
if MODE == "interpreter":
    KERNEL_DEVICE = "cpu"
elif MODE == "compiled" and torch.cuda.is_available():
    KERNEL_DEVICE = "cuda"
else:
    KERNEL_DEVICE = None
needs_kernel = pytest.mark.skipif(KERNEL_DEVICE is None, reason=(
    f"triton mode {MODE!r} (imported before TRITON_INTERPRET=1 was set) and no GPU: "
    "test_kernel_tests_in_a_fresh_interpreter runs these"))

# Irregular shapes: P not a multiple of the block, B = 1, B = 0, many tiny tensors and a large one.
SMALL_SHAPES = [(3,), (5, 7), (1,), (2, 2, 2), (17,)] * 4  # 20 tensors
CASES = {
    "single_P_2500": (3, [(2500,)], True),
    "single_B1": (1, [(1500,)], True),
    "list_B0": (0, [(3,), (5, 7), (1000,)], False),
    "list_20_small_1_large": (4, SMALL_SHAPES + [(3000,)], False),
}


def make_grads(n_rows, shapes, single=False, dtype=torch.float32, seed=0):
    """Per-sample gradients whose norms span 0.01 to 10 (so max_norm=1 clips some, not all)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, n_rows, dtype=torch.float64) if n_rows > 1 else torch.full((n_rows,), 3.0)
    total = sum(math.prod(s) for s in shapes)
    grads = []
    for shape in shapes:
        g = torch.randn(n_rows, *shape, generator=gen, dtype=torch.float64)
        grads.append((g * (scales / math.sqrt(total)).view(-1, *[1] * len(shape))).to(dtype))
    return grads[0] if single else grads


def flat(result):
    return result.reshape(-1) if isinstance(result, torch.Tensor) else torch.cat([r.reshape(-1) for r in result])


def to(grads, device):
    return grads.to(device) if isinstance(grads, torch.Tensor) else [g.to(device) for g in grads]


def kernel(grads, max_norm, noise_std, divisor, seed, config=None, **kwargs):
    """The Triton path on KERNEL_DEVICE, results back on the CPU."""
    grads = to(grads, KERNEL_DEVICE)
    if config is None:
        out = cn.clip_and_noise(grads, max_norm, noise_std, divisor, seed, backend="triton", **kwargs)
    else:
        out = cn._clip_and_noise_triton(grads, max_norm, noise_std, divisor, seed, config=config, **kwargs)
    if kwargs.get("return_norms"):
        return to(out[0], "cpu"), out[1].cpu()
    return to(out, "cpu")


def reference(grads, max_norm, noise_std, divisor, seed, **kwargs):
    return cn.clip_and_noise_reference(grads, max_norm, noise_std, divisor, seed, **kwargs)


def naive(grads, max_norm):
    """The definition, one example at a time in float64: (sum_b factor_b * g_b, norms)."""
    tensors = [grads] if isinstance(grads, torch.Tensor) else grads
    total = torch.zeros(sum(math.prod(g.shape[1:]) for g in tensors), dtype=torch.float64)
    norms = []
    for b in range(tensors[0].shape[0]):
        g_b = torch.cat([g[b].reshape(-1).double() for g in tensors])
        norm = g_b.norm()
        total += min(1.0, max_norm / (norm.item() + 1e-6)) * g_b
        norms.append(norm)
    return total, torch.tensor(norms, dtype=torch.float64)


def assert_rel_close(actual, expected, tol):
    a, e = flat(actual).double(), flat(expected).double()
    assert a.shape == e.shape
    if not e.any():  # all zeros, or empty
        assert not a.any()
        return
    assert ((a - e).norm() / e.norm()).item() < tol
    assert ((a - e).abs().max() / e.abs().max()).item() < tol


def assert_gaussian(x, std):
    """Mean within 5 standard errors of 0, std within 3% (a 1.5x error fails), Gaussian mass in 1 sd."""
    x = x.double().reshape(-1)
    n = x.numel()
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(x.std().item() / std - 1) < 0.03
    assert abs((x.abs() < std).double().mean().item() - 0.6827) < 0.02


def assert_same_structure(out, grads):
    if isinstance(grads, torch.Tensor):
        assert out.shape == grads.shape[1:] and out.dtype == torch.float32
    else:
        assert [o.shape for o in out] == [g.shape[1:] for g in grads]
        assert all(o.dtype == torch.float32 for o in out)


# ------------------------------------------------------------------------------------------
# The reference against the definition
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_per_example_loop(case):
    grads = make_grads(*CASES[case])
    out, norms = reference(grads, 1.0, 0.0, 3.0, 0, return_norms=True)
    total, want_norms = naive(grads, 1.0)
    assert_same_structure(out, grads)
    assert_rel_close(out, total / 3.0, 1e-5)
    assert_rel_close(norms, want_norms, 1e-5)


def test_reference_noise_is_philox_over_the_flattened_coordinates():
    grads = make_grads(4, [(30,), (2, 5)])
    key = 2**63 + 1234  # a 64-bit key: bits above 63 are used too
    out = reference(grads, 1.0, 2.0, 4.0, key)
    total, _ = naive(grads, 1.0)
    draws = philox.randn4x(key, torch.arange(10))  # Triton's tl.randn4x(key, counter), in plain torch
    noise = torch.stack(draws, dim=1).reshape(-1)  # coordinate i: output i % 4 of counter i // 4
    assert noise.unique().numel() == 40  # every coordinate its own draw
    assert_rel_close(out, (total + 2.0 * noise.double()) / 4.0, 1e-6)


def test_clipped_contributions_have_norm_at_most_max_norm():
    grads = make_grads(8, [(40,), (3, 3)])
    for b in range(8):
        one = [g[b:b + 1] for g in grads]
        contribution = flat(reference(one, 1.0, 0.0, 1.0, 0)).double()
        norm = torch.cat([g.reshape(-1) for g in one]).double().norm()
        assert contribution.norm() <= 1.0 * (1 + 1e-6)
        if norm < 1.0:  # below the bound: passed through unchanged
            assert_rel_close(contribution, torch.cat([g.reshape(-1) for g in one]), 1e-5)
        else:  # above: scaled onto the bound
            assert contribution.norm() >= 1.0 - 1e-5


def test_auto_on_cpu_is_the_reference():
    grads = make_grads(3, [(100,), (4, 4)])
    torch.testing.assert_close(cn.clip_and_noise(grads, 1.0, 1.0, 2.0, 5), reference(grads, 1.0, 1.0, 2.0, 5),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# The kernel against the reference
# ------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_without_noise(case):
    grads = make_grads(*CASES[case])
    out, norms = kernel(grads, 1.0, 0.0, 3.0, 0, return_norms=True)
    want, want_norms = reference(grads, 1.0, 0.0, 3.0, 0, return_norms=True)
    assert_same_structure(out, grads)
    assert_rel_close(out, want, 1e-5)
    assert_rel_close(norms, want_norms, 1e-5)


@needs_kernel
@pytest.mark.parametrize("config", [
    cn.TritonConfig(block=16, norm_blocks=3, rows=2, rows_per_program=3),  # chunks span tensors; 3 splits
    cn.TritonConfig(block=64, rows=4, rows_per_program=1),  # one example per split
])
def test_kernel_launch_configs_agree(config):
    grads = make_grads(7, SMALL_SHAPES[:10] + [(150,)])
    want, want_norms = reference(grads, 1.0, 0.0, 2.0, 0, return_norms=True)
    out, norms = kernel(grads, 1.0, 0.0, 2.0, 0, config=config, return_norms=True)
    assert_rel_close(out, want, 1e-5)
    assert_rel_close(norms, want_norms, 1e-5)
    noisy_default = flat(kernel(grads, 1.0, 2.0, 2.0, 9)) - flat(kernel(grads, 1.0, 0.0, 2.0, 9))
    noisy_config = flat(kernel(grads, 1.0, 2.0, 2.0, 9, config=config)) - flat(out)
    torch.testing.assert_close(noisy_config, noisy_default, rtol=1e-5, atol=1e-5)  # noise by coordinate


@needs_kernel
def test_kernel_non_contiguous_and_mixed_dtype_inputs():
    base = make_grads(5, [(300,)], single=True)
    transposed = base.t().contiguous().t()  # each example strided: copied
    column_slice = torch.cat([base, base], dim=1)[:, 7:307]  # rows strided, unaligned: scalar loads
    mixed = [make_grads(5, [(50,)])[0], make_grads(5, [(7, 3)], dtype=torch.bfloat16)[0],
             make_grads(5, [(9,)], dtype=torch.float16)[0]]
    for grads in (transposed, column_slice, mixed):
        assert_rel_close(kernel(grads, 1.0, 0.0, 1.0, 0), reference(grads, 1.0, 0.0, 1.0, 0), 1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    exact = make_grads(4, [(700,), (3, 11)])
    grads = [g.to(dtype) for g in exact]
    upcast = [g.float() for g in grads]
    # loads are converted to fp32 exactly: only the summation order differs
    assert_rel_close(kernel(grads, 1.0, 0.0, 2.0, 0), reference(upcast, 1.0, 0.0, 2.0, 0), 1e-5)
    assert_rel_close(reference(grads, 1.0, 0.0, 2.0, 0), reference(upcast, 1.0, 0.0, 2.0, 0), 1e-5)
    # against the fp32 gradients before rounding: a bf16/fp16 tolerance
    assert_rel_close(kernel(grads, 1.0, 0.0, 2.0, 0), reference(exact, 1.0, 0.0, 2.0, 0), 1e-2)


# ------------------------------------------------------------------------------------------
# Noise: statistics, seeds, layout, empty batches (both backends)
# ------------------------------------------------------------------------------------------

BACKENDS = ["torch", pytest.param("kernel", marks=needs_kernel)]


def run(backend, *args, **kwargs):
    return kernel(*args, **kwargs) if backend == "kernel" else reference(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend):
    grads = make_grads(3, [(20_000,)], single=True)
    noise = run(backend, grads, 1.0, 2.0, 4.0, 77) - run(backend, grads, 1.0, 0.0, 4.0, 77)
    assert_gaussian(noise, 2.0 / 4.0)
    with pytest.raises(AssertionError):  # the check has the power to see a 1.5x error
        assert_gaussian(noise * 1.5, 2.0 / 4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_noise_only(backend):
    grads = [torch.zeros(0, 20_000), torch.zeros(0, 4, 5)]
    out = run(backend, grads, 1.0, 2.0, 4.0, 3)
    assert_same_structure(out, grads)
    assert_gaussian(flat(out), 0.5)
    assert torch.equal(flat(run(backend, grads, 1.0, 0.0, 4.0, 3)), torch.zeros(20_020))
    _, norms = run(backend, grads, 1.0, 0.0, 4.0, 3, return_norms=True)
    assert norms.shape == (0,) and norms.dtype == torch.float32


def test_gaussian_noise_is_the_noise_of_a_sum_of_zero_examples_bit_for_bit():
    """The training step's noise (`gaussian_noise`, drawn straight from Philox on the reference path) is exactly
    what `clip_and_noise` adds to an empty sum: same key, same numbers, each tensor its own coordinate range."""
    shapes = [(3000,), (7, 11), (), (0, 4), (2, 3, 5)]
    for key, std in ((5, 1.5), (2**63 + 5, 0.02), (2**64 - 1, 1.0)):
        got = cn.gaussian_noise(shapes, std, key)
        want = reference([torch.zeros(0, *s) for s in shapes], 1.0, std, 1.0, key)
        assert [g.shape for g in got] == [torch.Size(s) for s in shapes]
        assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    assert all(not g.any() for g in cn.gaussian_noise(shapes, 0.0, 5))
    assert_gaussian(flat(cn.gaussian_noise([(20_000,), (50, 40)], 2.0, 8)), 2.0)
    with pytest.raises(UserError, match="noise_std"):
        cn.gaussian_noise(shapes, -1.0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_determined_by_the_seed(backend):
    grads = torch.zeros(0, 20_000)
    first, again, other = (run(backend, grads, 1.0, 1.0, 1.0, seed) for seed in (2**40 + 1, 2**40 + 1, 2**40 + 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert abs(torch.corrcoef(torch.stack([first, other]))[0, 1].item()) < 5 / math.sqrt(20_000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_parameter_gets_its_own_noise_range(backend):
    two = run(backend, [torch.zeros(0, 5000), torch.zeros(0, 5000)], 1.0, 1.0, 1.0, 11)
    joined = run(backend, torch.zeros(0, 10_000), 1.0, 1.0, 1.0, 11)
    assert torch.equal(torch.cat(two), joined)  # noise is a function of (seed, global coordinate)
    assert abs(torch.corrcoef(torch.stack(two))[0, 1].item()) < 5 / math.sqrt(5000)


@needs_kernel
def test_kernel_and_reference_draw_the_same_noise_for_the_same_key():
    grads = [torch.zeros(0, 3000), torch.zeros(0, 7, 11)]  # irregular sizes, two parameters
    for key in (5, 2**32 + 5, 2**63 + 5, 2**64 - 1):
        ours = flat(kernel(to(grads, KERNEL_DEVICE), 1.0, 1.5, 2.0, key)).cpu()
        torch.testing.assert_close(ours, flat(reference(grads, 1.0, 1.5, 2.0, key)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_with_non_finite_gradients_contribute_exactly_zero(backend):
    grads = make_grads(5, [(40,), (3, 3)])
    grads[0][1, 3], grads[1][3, 0, 2] = float("inf"), float("nan")  # examples 1 and 3
    finite = [g[[0, 2, 4]] for g in grads]
    dev = KERNEL_DEVICE if backend == "kernel" else "cpu"
    out = flat(run(backend, to(grads, dev), 0.5, 1.0, 2.0, 9)).cpu()
    want = flat(run(backend, to(finite, dev), 0.5, 1.0, 2.0, 9)).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_norms_matches_torch(backend):
    grads = make_grads(6, [(100,), (3, 7), (1,)])
    _, norms = run(backend, grads, 1.0, 1.0, 1.0, 0, return_norms=True)
    want = torch.cat([g.reshape(6, -1) for g in grads], dim=1).norm(dim=1)
    assert norms.shape == (6,) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, want, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

GOOD = dict(grads=torch.ones(2, 3), max_norm=1.0, noise_std=1.0, divisor=2.0, seed=0)
BAD = [
    (dict(max_norm=0.0), UserError, "max_norm must be a finite number > 0"),
    (dict(max_norm=float("nan")), UserError, "max_norm"),
    (dict(noise_std=-1.0), UserError, "noise_std must be a finite number >= 0"),
    (dict(noise_std=float("inf")), UserError, "noise_std"),
    (dict(divisor=0), UserError, "divisor must be a finite number > 0"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(grads=torch.ones(2, 3, 4)), ValueError, r"must be \(B, P\); got shape \(2, 3, 4\)"),
    (dict(grads=[torch.ones(2, 3), torch.ones(3, 3)]), ValueError, "batch size 3 but grads"),
    (dict(grads=[torch.ones(2, 3, dtype=torch.float64)]), ValueError, "dtype torch.float64"),
    (dict(grads=[torch.ones(2, 3, dtype=torch.int32)]), ValueError, "supported: fp32, bf16, fp16"),
    (dict(grads=[torch.ones(2, 3), torch.ones(2, 3, device="meta")]), ValueError, "is on meta"),
    (dict(grads=[]), TypeError, "non-empty list"),
    (dict(grads=None), TypeError, "grads must be"),
]


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=needs_kernel)])
@pytest.mark.parametrize("bad, error, message", BAD)
def test_bad_arguments_raise_clearly(bad, error, message, backend):
    args = {**GOOD, **bad}
    if backend == "triton" and KERNEL_DEVICE == "cuda":
        args["grads"] = to(args["grads"], "cuda") if args["grads"] is not None else None
    with pytest.raises(error, match=message):
        cn.clip_and_noise(*args.values(), backend=backend)


def test_unknown_backend_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"one of \('auto', 'triton', 'torch'\); got 'cuda'"):
        cn.clip_and_noise(*GOOD.values(), backend="cuda")


def run_python(code, interpret):
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(MODE == "unavailable", reason="triton is not installed")
def test_triton_backend_on_cpu_without_the_interpreter_says_how_to_enable_it():
    code = ("import torch\nfrom kernels.clip_noise import clip_and_noise\n"
            "try:\n    clip_and_noise(torch.ones(2, 3), 1.0, 1.0, 1.0, 0, backend='triton')\n"
            "except ValueError as e:\n    print(e)\n")
    result = run_python(["-c", code], interpret="0")
    assert result.returncode == 0, result.stderr
    assert "set TRITON_INTERPRET=1" in result.stdout and "backend='torch'" in result.stdout


@pytest.mark.skipif(KERNEL_DEVICE is not None or MODE == "unavailable", reason="kernel tests ran in this process")
def test_kernel_tests_in_a_fresh_interpreter():
    """Triton was imported before this module could switch the interpreter on: rerun the kernel
    tests of this file in a fresh process where it is on from the start."""
    selection = "(kernel or triton) and not fresh_interpreter and not without_the_interpreter"
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selection], interpret="1")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]
