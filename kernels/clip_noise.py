"""Clip per-sample gradients, sum them, add Gaussian noise, divide: the private core of a DP-SGD step.

    result = (sum_b  min(1, C / (||g_b|| + 1e-6)) * g_b  +  N(0, noise_std^2 I)) / divisor

with ||g_b|| the L2 norm of example b's gradient over *all* selected parameters jointly
(Abadi et al. 2016, Algorithm 1; the clip factor is Opacus's). Two implementations, same semantics:

- `clip_and_noise_reference`: plain torch, the CPU path and the definition the kernel is tested against.
- the Triton kernel (`clip_and_noise(..., backend="triton")`): two passes over the per-sample gradients,
  the least any exact method can read (the norm must be known before any example is scaled):
    pass 1  `_sq_norm_kernel`        partial squared norms, one per (example, chunk of coordinates)
            (tiny torch ops)          norms (B,), clip factors (B,)
    pass 2  `_clip_sum_noise_kernel` per block of coordinates, loop over examples accumulating
                                      factor[b] * g[b, block] in fp32 registers, add noise_std *
                                      N(0, 1) of the coordinate (`_coordinate_normals`), divide, write
                                      the result once.
  Memory traffic: 2 * B * P * elem_size (gradients read twice) + P * 4 (result written), plus
  P * 4 * 2 * splits when pass 2 splits the examples (small P, see `_rows_per_program`).

Guarantees (what a privacy reviewer can rely on)
- Clipping: each example contributes factor_b * g_b with norm <= max_norm, up to fp32 rounding of the
  norm (relative ~1e-6, as in Opacus). Norms are accumulated in fp32 for fp32, bf16 and fp16 inputs.
- Sensitivity: under add/remove-one neighbours the clipped sum has L2 sensitivity max_norm; the added
  noise makes it the Gaussian mechanism with noise multiplier noise_std / max_norm. Dividing by
  `divisor` is post-processing; it must be data-independent (the expected batch size q*N of Poisson
  sampling, not the realised batch size). Sampling and accounting are the caller's job.
- Non-finite gradients: an example whose norm is not finite (an inf or NaN anywhere in its gradient)
  gets factor 0 and contributes exactly zero (never 0 x inf = NaN), in both backends.
- Noise: both backends draw it with Philox4x32-10 and Box-Muller: coordinate i is output i mod 4 of
  Triton's `tl.randn4x(key, i // 4)` in the kernel (`_coordinate_normals`) and of its plain-torch twin
  `kernels.philox.randn4x` in the reference (`kernels.philox.coordinate_normals`): the same key gives the
  same noise, up to fp32 rounding of log/cos/sin. One Philox call serves four coordinates. Philox is not a
  cryptographic generator: whoever knows the key can regenerate and subtract the noise. The key must be
  the step's stream key derived from the run's 256-bit OS secret (dp/randomness.py), fresh every step,
  and never logged or stored in a released artefact. Floating-point Gaussian samplers are known to leak in
  theory (Mironov 2012; Jin et al. 2022): the samples are not exactly Gaussian (Triton's Box-Muller clamps
  its uniform at 1e-7, so |noise| <= 5.68 noise_std per coordinate). Summing several draws mitigates this
  (Holohan and Braghin 2021); not done here.
- Noise layout: coordinate i of the flattened concatenation of all parameters (in list order) gets
  output i mod 4 of the draw for (key, i // 4): each parameter owns a distinct coordinate range, so no
  two coordinates share an output. Same key -> same noise; different keys -> independent noise.
- `return_norms=True` returns the per-sample norms: they are private data, for diagnostics and
  auditing only; nothing here logs them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers

import torch

from kernels.philox import coordinate_normals
from ldm.errors import UserError

try:  # the reference path needs no triton; only importing it here, no device is touched
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

EPS = 1e-6  # the clip factor is min(1, max_norm / (norm + EPS))
BACKENDS = ("auto", "triton", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_SEED = 2**64  # noise keys are 64-bit Philox keys


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def clip_and_noise(grads, max_norm, noise_std, divisor, seed, *, backend="auto", return_norms=False):
    """Clipped, summed, noised and divided per-sample gradients.

    grads: a (B, P) tensor, or a list/tuple of (B, ...) tensors (one per parameter, as
        torch.func.vmap returns them); fp32, bf16 or fp16; all on one device. B may be 0.
    max_norm: clipping bound C > 0. noise_std: noise standard deviation (sigma * C) >= 0.
    divisor: > 0, the expected batch size. seed: the 64-bit Philox key of the step's noise, an int in
        [0, 2**64) derived from the run's secret (see the module docstring for what it guarantees).
    backend: "auto" (Triton kernel for CUDA tensors, reference otherwise), "triton" (the kernel; on
        CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1) or "torch" (the reference).
    Returns fp32: a (P,) tensor for a tensor input, a list of g.shape[1:] tensors for a list
    (views of one buffer); with return_norms, also the (B,) fp32 per-sample norms (private).
    """
    tensors, _ = _as_list(grads)
    device = tensors[0].device
    if _reference_path(backend, device):
        return clip_and_noise_reference(grads, max_norm, noise_std, divisor, seed, return_norms=return_norms)
    check_triton_usable(device)
    return _clip_and_noise_triton(grads, max_norm, noise_std, divisor, seed, return_norms=return_norms)


@torch.no_grad()
def clip_and_noise_reference(grads, max_norm, noise_std, divisor, seed, *, return_norms=False):
    """Plain-torch definition of `clip_and_noise` (same arguments, same result up to the noise draw).

    Noise: `kernels.philox.coordinate_normals(seed, n)` over the flattened concatenation, as the kernel
    draws it. bf16/fp16 tensors are converted to fp32 one parameter at a time for the scaled sum (a
    temporary of that size). Examples with a non-finite norm are left out of the sum (factor 0).
    """
    seed = _checked_scalars(max_norm, noise_std, divisor, seed)
    tensors, single = _as_list(grads)
    B, device = tensors[0].shape[0], tensors[0].device
    flat = [g.reshape(B, math.prod(g.shape[1:])) for g in tensors]  # (B, n_i), views when contiguous
    sq = torch.zeros(B, dtype=torch.float32, device=device)
    for f in flat:
        sq += torch.linalg.vector_norm(f, dim=1, dtype=torch.float32).square()
    norms = sq.sqrt()  # (B,)
    factor = clip_factors(norms, max_norm)  # (B,)
    finite = torch.isfinite(norms)
    if not bool(finite.all()):  # 0 x inf would be NaN: leave those examples out of the sum altogether
        flat, factor = [f[finite] for f in flat], factor[finite]
    noise = _scaled_normals(seed, sum(f.shape[1] for f in flat), noise_std, device)
    outs, offset = [], 0
    for f, g in zip(flat, tensors):
        n = f.shape[1]
        summed = factor @ f.to(torch.float32)  # (n,) = sum_b factor[b] * g[b]
        outs.append(((summed + noise[offset:offset + n]) / divisor).view(g.shape[1:]))
        offset += n
    result = outs[0] if single else outs
    return (result, norms) if return_norms else result


def _scaled_normals(seed, n, noise_std, device):
    """noise_std * `coordinate_normals(seed, n)`: (n,) fp32; zeros without a draw when noise_std is 0 (a
    micro-batch's share of a step)."""
    if noise_std > 0:
        return coordinate_normals(seed, n, device).mul_(noise_std)
    return torch.zeros(n, device=device)


def clip_factors(norms, max_norm):
    """min(1, C / (norm + EPS)) per example, and exactly 0 where the norm is not finite: (B,) fp32."""
    factor = (max_norm / (norms + EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factor, torch.zeros_like(factor))


def gaussian_noise(shapes, noise_std, seed, *, backend="auto", device="cpu"):
    """N(0, noise_std^2) for every coordinate of tensors of `shapes`: a list of fp32 tensors.

    The mechanism's noise, coordinate i of the flattened concatenation drawn from Philox at (seed, i): the
    noise `clip_and_noise` adds to a sum of zero examples, by the kernel (backend triton, or auto on CUDA) or,
    on the reference path, straight from `kernels.philox.coordinate_normals` times noise_std (the same numbers
    bit for bit, without the reference's passes over an empty sum: 31 ms instead of 38 for the quick preset's
    1.66M coordinates on one thread; tests/test_clip_noise.py).
    """
    if _reference_path(backend, torch.device(device)):
        seed = _checked_scalars(1.0, noise_std, 1.0, seed)
        sizes = [math.prod(s) for s in shapes]
        return [v.view(s) for v, s in zip(_scaled_normals(seed, sum(sizes), noise_std, device).split(sizes), shapes)]
    empty = [torch.zeros((0, *s), dtype=torch.float32, device=device) for s in shapes]
    return clip_and_noise(empty, 1.0, noise_std, 1.0, seed, backend=backend)


def triton_mode() -> str:
    """How the kernels would run in this process.

    "interpreter": triton was imported with TRITON_INTERPRET=1; the kernels run on CPU tensors.
    "compiled": the kernels compile for the GPU. "mixed": TRITON_INTERPRET changed between importing
    triton and importing this module; the kernels cannot run. "unavailable": triton is not installed.
    """
    if triton is None:
        return "unavailable"
    from triton.runtime.interpreter import InterpretedFunction
    kernels, lang = (isinstance(f, InterpretedFunction) for f in (_clip_sum_noise_kernel, tl.randn))
    if kernels != lang:
        return "mixed"
    return "interpreter" if kernels else "compiled"


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _reference_path(backend, device):
    """True when `backend` on `device` means the plain-torch reference: "torch", or "auto" off CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return backend == "torch" or (backend == "auto" and device.type != "cuda")


def _checked_scalars(max_norm, noise_std, divisor, seed):
    """The seed as an int. Hyperparameters come from user flags (UserError); the seed from code (ValueError)."""
    for name, value, low, strict in (("max_norm", max_norm, 0.0, True), ("noise_std", noise_std, 0.0, False),
                                     ("divisor", divisor, 0.0, True)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strict and value == low):
            bound = "> 0" if strict else ">= 0"
            raise UserError(f"{name} must be a finite number {bound}; got {value!r}. Fix the DP configuration.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**64), the step's noise key (dp/randomness.py); got {seed!r}")
    return int(seed)


def _as_list(grads):
    """(tensors, single): the per-parameter (B, ...) tensors, checked; single if given one (B, P) tensor."""
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"a single gradient tensor must be (B, P); got shape {tuple(grads.shape)}. "
                             "Pass a list of (B, ...) tensors for per-parameter gradients.")
        tensors, single = [grads], True
    elif isinstance(grads, (list, tuple)) and grads and all(isinstance(g, torch.Tensor) for g in grads):
        tensors, single = list(grads), False
    else:
        raise TypeError("grads must be a (B, P) tensor or a non-empty list/tuple of (B, ...) tensors; "
                        f"got {type(grads).__name__}")
    first = tensors[0]
    for i, g in enumerate(tensors):
        if g.dim() < 1:
            raise ValueError(f"grads[{i}] is a scalar; every per-sample gradient must be (B, ...)")
        if g.shape[0] != first.shape[0]:
            raise ValueError(f"grads[{i}] has batch size {g.shape[0]} but grads[0] has {first.shape[0]}: "
                             "all per-sample gradients must share B")
        if g.dtype not in DTYPES:
            raise ValueError(f"grads[{i}] has dtype {g.dtype}; supported: fp32, bf16, fp16")
        if g.device != first.device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[0] is on {first.device}")
    return tensors, single


def check_triton_usable(device):
    """Raise a clear error where the kernel cannot run on `device`."""
    mode = triton_mode()
    if mode == "unavailable":
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if mode == "mixed":
        raise ValueError("TRITON_INTERPRET changed between importing triton and importing kernels.clip_noise; "
                         "set it once, before triton is first imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' supports CUDA tensors (and CPU under the interpreter); got {device}")
    if device.type == "cpu" and mode != "interpreter":
        raise ValueError("backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                         "in the environment before triton is first imported, or use backend='torch'/'auto'")
    if device.type == "cuda" and mode == "interpreter":
        raise ValueError("Triton's interpreter (TRITON_INTERPRET=1) reads tensors through host pointers: "
                         "pass CPU tensors, or unset TRITON_INTERPRET to run the kernel on the GPU")


# ----------------------------------------------------------------------------------------------
# Triton kernels. A list of parameters is read through a pointer table (one launch per pass for all
# tensors) rather than one launch per tensor: a DP fine-tune selects tens to hundreds of tensors,
# many tiny (biases, norms), and two launches each would cost more than moving their data. The
# table is a (4, T) int64 tensor: base address, row stride (between examples), numel per example,
# offset of the tensor in the flattened result; a block map (2, NB) gives each block of BLOCK
# coordinates its tensor and start. Inputs of one dtype share a launch (DTYPE is a constexpr).
# ----------------------------------------------------------------------------------------------


def _sq_norm_kernel(
    # pointers
    table_ptr, block_map_ptr, partial_ptr,
    # sizes
    n_tensors, n_blocks, n_chunks,
    # constexprs
    DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Pass 1. Program (b, chunk) writes partial[b, chunk] = sum of g_b^2 over BLOCKS_PER_PROGRAM
    consecutive blocks of the block map (a chunk may span several tensors: all count for example b)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    chunk = pid % n_chunks
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(BLOCKS_PER_PROGRAM):
        blk = chunk * BLOCKS_PER_PROGRAM + j
        in_range = blk < n_blocks
        blk = tl.minimum(blk, n_blocks - 1)
        t = tl.load(block_map_ptr + blk)
        start = tl.load(block_map_ptr + n_blocks + blk)
        base = tl.load(table_ptr + t).to(tl.pointer_type(DTYPE))
        row_stride = tl.load(table_ptr + n_tensors + t)
        numel = tl.load(table_ptr + 2 * n_tensors + t)
        cols = start + tl.arange(0, BLOCK)  # int64
        ptrs = base + b * row_stride + cols
        if ALIGNED:  # every row start is 16-byte aligned (checked on the host): vector loads
            ptrs = tl.multiple_of(ptrs, 16)
        if start + BLOCK <= numel:  # full block: no column mask, so the loads can vectorise
            x = tl.load(ptrs, mask=in_range, other=0.0)
        else:
            x = tl.load(ptrs, mask=in_range & (cols < numel), other=0.0)
        x = x.to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def _coordinate_normals(seed, cols):
    """N(0, 1) of the global coordinates `cols` (int64 >= 0): output cols mod 4 of tl.randn4x(seed, cols // 4),
    the layout of kernels.philox.coordinate_normals."""
    n0, n1, n2, n3 = tl.randn4x(seed, cols // 4)
    r = cols % 4
    return tl.where(r == 0, n0, tl.where(r == 1, n1, tl.where(r == 2, n2, n3)))


def _clip_sum_noise_kernel(
    # pointers
    table_ptr, block_map_ptr, factor_ptr, out_ptr,
    # sizes
    n_tensors, n_blocks, n_rows, rows_per_program, out_split_stride,
    # scalars
    seed, noise_std, divisor,
    # constexprs
    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr, FINAL: tl.constexpr,
):
    """Pass 2. Program (block, split) sums factor[b] * g[b, block] over its examples b, ROWS at a
    time, in fp32. FINAL (one split): adds noise, divides and writes the result; otherwise writes
    the partial sum to out[split, :] for `_noise_finish_kernel`."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t = tl.load(block_map_ptr + pid)
    start = tl.load(block_map_ptr + n_blocks + pid)
    base = tl.load(table_ptr + t).to(tl.pointer_type(DTYPE))
    row_stride = tl.load(table_ptr + n_tensors + t)
    numel = tl.load(table_ptr + 2 * n_tensors + t)
    out_offset = tl.load(table_ptr + 3 * n_tensors + t)
    cols = start + tl.arange(0, BLOCK)  # int64
    col_mask = cols < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_lo = split * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, n_rows)
    full = start + BLOCK <= numel  # no column mask on full blocks, so the loads can vectorise
    for r in range(row_lo, row_hi, ROWS):
        rows = r + tl.arange(0, ROWS)
        row_mask = rows < row_hi
        f = tl.load(factor_ptr + rows, mask=row_mask, other=0.0)  # (ROWS,)
        ptrs = base + rows[:, None] * row_stride + cols[None, :]  # (ROWS, BLOCK)
        if ALIGNED:  # every row start is 16-byte aligned (checked on the host)
            ptrs = tl.multiple_of(ptrs, [16, 16])
        if full:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        # factor 0 (a non-finite example): exactly zero, never 0 x inf
        acc += tl.sum(tl.where(f[:, None] > 0, x.to(tl.float32) * f[:, None], 0.0), axis=0)
    out_cols = out_offset + cols  # global coordinate: it addresses the noise
    if FINAL:
        acc = (acc + noise_std * _coordinate_normals(seed, out_cols)) / divisor
        tl.store(out_ptr + out_cols, acc, mask=col_mask)
    else:
        tl.store(out_ptr + split.to(tl.int64) * out_split_stride + out_cols, acc, mask=col_mask)


def _noise_finish_kernel(
    # pointers
    partial_ptr, out_ptr,
    # sizes
    n_splits, n_cols,
    # scalars
    seed, noise_std, divisor,
    # constexprs
    BLOCK: tl.constexpr,
):
    """After a split pass 2: out[i] = (sum_s partial[s, i] + noise_std * N(0, 1)_i) / divisor."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = partial_ptr + cols
    for _ in range(n_splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += n_cols  # pointer arithmetic: 64-bit
    acc = (acc + noise_std * _coordinate_normals(seed, cols)) / divisor
    tl.store(out_ptr + cols, acc, mask=mask)


if triton is not None:  # decorated here so the functions above stay readable as plain code
    # Sizes that change every step (Poisson batch size, seed) are not specialised: no recompiles.
    _coordinate_normals = triton.jit(_coordinate_normals)
    _sq_norm_kernel = triton.jit(_sq_norm_kernel)
    _clip_sum_noise_kernel = triton.jit(_clip_sum_noise_kernel, do_not_specialize=["n_rows", "rows_per_program",
                                                                                   "seed"])
    _noise_finish_kernel = triton.jit(_noise_finish_kernel, do_not_specialize=["n_splits", "seed"])

_TL_DTYPES = {} if tl is None else {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                                     torch.float16: tl.float16}


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch configuration; defaults sized for a recent GPU (not autotuned: pick by `kernels.bench`).

    block: coordinates per block (both passes). norm_blocks: blocks per pass-1 program (fewer,
    larger programs). rows: examples loaded per pass-2 iteration (a (rows, block) tile in flight).
    rows_per_program: examples per pass-2 program; None chooses (`_rows_per_program`).
    """

    block: int = 1024
    norm_blocks: int = 8
    rows: int = 4
    rows_per_program: int | None = None
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block", "rows"):  # tl.arange sizes; block >= 16 keeps block starts 16-byte aligned
            value = getattr(self, name)
            if value < (16 if name == "block" else 1) or value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two (block >= 16); got {value}")
        if self.norm_blocks < 1 or (self.rows_per_program is not None and self.rows_per_program < 1):
            raise ValueError(f"TritonConfig needs norm_blocks >= 1 and rows_per_program >= 1 or None; got {self}")


def _rows_per_program(n_rows, n_blocks, device):
    """Split the examples across programs only when the coordinate blocks cannot fill the GPU
    (8 programs per SM: pass 2 uses ~64 registers x 128 threads, so 8 fit), in splits of >= 32
    examples: each split costs P * 8 bytes (partial written and read), <= 1/16 of what reading its
    examples costs pass 2 in fp32 (1/8 in bf16)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(min(triton.cdiv(8 * sms, max(n_blocks, 1)), triton.cdiv(n_rows, 32)), 1)
    return max(triton.cdiv(n_rows, splits), 1)


@functools.lru_cache(maxsize=64)
def _block_map(numels, block, device):
    """(2, NB) int64 on `device`: tensor index and start coordinate of every block (depends on shapes only)."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(int(counts.sum())) - first_block[tensor_idx]) * block
    return torch.stack([tensor_idx, starts]).to(device)


def _per_example_contiguous(g):
    """g (B, ...) with each example's elements contiguous; a copy (one read and write pass) otherwise.
    vmap outputs are contiguous and cost nothing here."""
    return g if g.shape[0] == 0 or g[0].is_contiguous() else g.contiguous()


def _row_starts_aligned(g):
    """Every example's first element 16-byte aligned: the kernels may then use vector loads."""
    return g.data_ptr() % 16 == 0 and (g.shape[0] <= 1 or g.stride(0) * g.element_size() % 16 == 0)


@dataclasses.dataclass(frozen=True)
class _Group:
    """The tensors of one dtype, as the kernels see them."""

    dtype: object  # tl dtype, a constexpr
    n_tensors: int
    table: torch.Tensor  # (4, T) int64: address, row stride, numel per example, offset in the result
    block_map: torch.Tensor  # (2, NB) int64: tensor index, start coordinate
    n_blocks: int
    aligned: bool


def _groups(tensors, numels, offsets, block):
    """One `_Group` per dtype present (usually one)."""
    device, groups = tensors[0].device, []
    for dtype in DTYPES:
        idx = [i for i, g in enumerate(tensors) if g.dtype == dtype]
        if not idx:
            continue
        rows = [[tensors[i].data_ptr() for i in idx], [tensors[i].stride(0) for i in idx],
                [numels[i] for i in idx], [offsets[i] for i in idx]]
        block_map = _block_map(tuple(numels[i] for i in idx), block, device)
        groups.append(_Group(_TL_DTYPES[dtype], len(idx), torch.tensor(rows, dtype=torch.int64).to(device),
                             block_map, block_map.shape[1], all(_row_starts_aligned(tensors[i]) for i in idx)))
    return groups


def _squared_norms(groups, n_rows, device, config):
    """Pass 1: (B,) fp32 squared per-sample norms over all tensors."""
    sq = torch.zeros(n_rows, dtype=torch.float32, device=device)
    for grp in groups:
        n_chunks = triton.cdiv(grp.n_blocks, config.norm_blocks)
        if n_rows == 0 or n_chunks == 0:
            continue
        partial = torch.empty(n_rows, n_chunks, dtype=torch.float32, device=device)  # every slot written
        _sq_norm_kernel[(n_rows * n_chunks,)](
            grp.table, grp.block_map, partial,
            grp.n_tensors, grp.n_blocks, n_chunks,
            DTYPE=grp.dtype, BLOCK=config.block, BLOCKS_PER_PROGRAM=config.norm_blocks, ALIGNED=grp.aligned,
            num_warps=config.num_warps)
        sq += partial.sum(dim=1)  # fixed order: deterministic, unlike atomics
    return sq


def _noisy_clipped_sum(groups, factor, n_cols, seed, noise_std, divisor, config):
    """Pass 2 (and the finishing kernel when examples are split): the (n_cols,) fp32 result."""
    device, n_rows = factor.device, factor.shape[0]
    out = torch.empty(n_cols, dtype=torch.float32, device=device)
    total_blocks = sum(grp.n_blocks for grp in groups)
    rows_per_program = config.rows_per_program or _rows_per_program(n_rows, total_blocks, device)
    n_splits = max(triton.cdiv(n_rows, rows_per_program), 1)
    target = out if n_splits == 1 else torch.empty(n_splits, n_cols, dtype=torch.float32, device=device)
    for grp in groups:
        if grp.n_blocks == 0:
            continue
        _clip_sum_noise_kernel[(grp.n_blocks, n_splits)](
            grp.table, grp.block_map, factor, target,
            grp.n_tensors, grp.n_blocks, n_rows, rows_per_program, n_cols,
            seed, noise_std, divisor,
            DTYPE=grp.dtype, BLOCK=config.block, ROWS=config.rows, ALIGNED=grp.aligned, FINAL=n_splits == 1,
            num_warps=config.num_warps)
    if n_splits > 1 and n_cols > 0:
        _noise_finish_kernel[(triton.cdiv(n_cols, config.block),)](
            target, out,
            n_splits, n_cols,
            seed, noise_std, divisor,
            BLOCK=config.block, num_warps=config.num_warps)
    return out


@torch.no_grad()
def _clip_and_noise_triton(grads, max_norm, noise_std, divisor, seed, *, return_norms=False,
                           config=TritonConfig()):
    """The two-pass kernel path of `clip_and_noise` (inputs on one CUDA device, or CPU under the interpreter)."""
    seed = _checked_scalars(max_norm, noise_std, divisor, seed)
    tensors, single = _as_list(grads)
    tensors = [_per_example_contiguous(g) for g in tensors]
    n_rows, device = tensors[0].shape[0], tensors[0].device
    numels = [math.prod(g.shape[1:]) for g in tensors]
    offsets = [0, *itertools.accumulate(numels)][:-1]  # each parameter's range of noise counters
    groups = _groups(tensors, numels, offsets, config.block)
    norms = _squared_norms(groups, n_rows, device, config).sqrt()  # (B,)
    factor = clip_factors(norms, max_norm)  # (B,)
    out = _noisy_clipped_sum(groups, factor, sum(numels), seed, float(noise_std), float(divisor), config)
    outs = [out[o:o + n].view(g.shape[1:]) for o, n, g in zip(offsets, numels, tensors)]
    result = outs[0] if single else outs
    return (result, norms) if return_norms else result
