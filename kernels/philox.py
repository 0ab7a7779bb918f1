"""Philox4x32-10 in plain torch, bit-identical to Triton's `triton.language.random`.

Philox4x32-R (Salmon, Moraes, Dror and Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3",
Sec. 3.3 and Random123's philox.h) maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1)
to four 32-bit words by R rounds of

    hi_A, lo_A = mulhilo(0xD2511F53, c0)        hi_B, lo_B = mulhilo(0xCD9E8D57, c2)
    (c0, c1, c2, c3) <- (hi_B ^ c1 ^ k0,  lo_B,  hi_A ^ c3 ^ k1,  lo_A)
    (k0, k1) <- (k0 + 0x9E3779B9, k1 + 0xBB67AE85) mod 2^32            (Weyl key schedule)

This module is the CPU (and CUDA) twin of the Triton kernels' generator, so that a plain-torch reference
and a kernel draw the same DP noise for the same key. Triton 3.x semantics, read from
`triton/language/random.py` and checked against Triton's interpreter in tests/test_philox.py:

- Key: `tl.philox(seed, ...)` with 32-bit counters casts the seed to uint64 and uses
  k0 = seed & 0xFFFFFFFF, k1 = seed >> 32. Triton types a Python-int seed by its value (i32, u32, i64,
  u64) and accepts [-2^63, 2^64); a negative seed s is sign-extended, i.e. it is the key s + 2^64
  (seed -1 and 2^64 - 1 give the same stream). Values outside raise OverflowError in Triton. Here keys
  are ints in [0, 2^64), all 64 bits used.
- Offsets: `tl.randint4x(seed, offset)` uses the counter (c0, c1, c2, c3) = (offset mod 2^32,
  (offset >> 32) mod 2^32, 0, 0) for an int64 offset (arithmetic shift: any int64 is accepted, -1 is
  the counter (2^32 - 1, 2^32 - 1, 0, 0)), and (offset mod 2^32, 0, 0, 0) for an int32 offset.
  So an int64 offset hi * 2^32 + lo addresses counter words (lo, hi): dp/randomness.py puts the example
  index in c1 that way.
- `tl.rand`: word 0 -> uniform float32 by `uint_to_uniform_float`: reinterpret as int32 x, take
  x if x >= 0 else ~x (a value in [0, 2^31)), convert to float32 (round to nearest) and multiply by the
  float32 constant 4.6566127342e-10; the result lies in [0, 1) (0 included, exactly 1 excluded).
- `tl.randn`: words 0 and 1 -> uniforms u1, u2 as above; Box-Muller's first output,
  sqrt(-2 log(max(u1, 1e-7))) * cos(2 pi u2), all in float32 (Box and Muller 1958). Words 2 and 3 are
  unused. Because of the clamp, |randn| <= sqrt(-2 log(1e-7)) = 5.68.
- `tl.randn4x`: all four words -> uniforms u1..u4; both Box-Muller outputs of (u1, u2) and of (u3, u4):
  (r cos(2 pi u2), r sin(2 pi u2), r' cos(2 pi u4), r' sin(2 pi u4)), r = sqrt(-2 log(max(u1, 1e-7))),
  r' the same of u3. The two outputs of one pair are independent N(0, 1) (Box and Muller 1958).
- The DP noise layout (`coordinate_normals`, and `_coordinate_normals` in kernels/clip_noise.py):
  coordinate i of a noise vector is output i mod 4 of `tl.randn4x(key, i // 4)`, so one Philox call
  serves four coordinates and every coordinate still has its own draw.

Exactness: the integer part is exact on every backend. torch has no uint32 arithmetic, so words are
int64 tensors holding [0, 2^32), and no step relies on int64 overflow: each 32x32 -> 64-bit product M * x
is p = x * (M - 2^32), exact in int64 since 2^32 - M < 2^30 for both multipliers, so |p| < 2^62; then
M * x = p + x * 2^32, hence hi = (p >> 32) + x (torch's >> on int64 is arithmetic: floor) and
lo = p mod 2^32 = p & 0xFFFFFFFF. `uniform` equals `tl.rand` bit for bit (one int -> float32 conversion
and one float32 product, both correctly rounded on every backend; constants are pre-rounded to float32).
`randn` uses torch's float32 log / sqrt / cos, which differ from Triton's in rounding only: against the
interpreter (numpy float32), over 7.9e5 draws under 3 keys, 75% were identical and the largest
difference was 4.8e-7, i.e. <= 5 float32 ulps of the larger magnitude and <= 1.6e-7 (1 + |x|); the tests
allow 1e-6 (1 + |x|). Compiled Triton on a GPU may use faster log / cos / sqrt: not measured (no GPU).

Not cryptographic: Philox is a counter-based generator with good statistical quality, not a stream
cipher; whoever knows the key can regenerate (and subtract) the noise. The project derives each
stream's 64-bit key from a 256-bit OS secret by SHA-256 (HMAC-SHA256, dp/randomness.py), so the key
itself is the secret: never log or store it in a released artefact. Keys are ints in [0, 2^64).

Speed: the integer work runs on blocks of `_CPU_CHUNK` = 2^15 counters, whose six int64 buffers
(1.5 MiB) stay in L2, in 12 int64 passes per round with no allocation inside the loop. torch runs an
op on 2^15 elements on the calling thread (its grain size), so this part is single-threaded by design:
splitting each op over 2 threads was 4-10x slower on the shared 2-core test machine (every op waits
for the slower thread). randn's float math runs once over whole tensors, where torch may use threads.
Measured for 4M (2^22) counters on that 2-core Xeon (AVX-512), `python -m kernels.philox`, best of 5
while the other core was idle: randint4x 224 ms, uniform 172 ms, randn 197 ms with 1 thread; 224, 177
and 220 ms with 2. While other users loaded the machine: 200-320 ms, either thread count.
The DP noise of the quick preset's 1.66M trainable coordinates (2026-12-01, 2-core AVX2 machine, 1 thread,
the other core busy): 81 ms one randn counter per coordinate, 26 ms by `coordinate_normals` (a quarter of
the counters; the float math is the same per coordinate).
"""

import numbers
import struct
import time

import torch

MASK32 = 0xFFFFFFFF
# Random123 / Salmon et al. 2011 constants, named as in triton/language/random.py.
PHILOX_ROUND_A = 0xD2511F53  # multiplier of counter word c0
PHILOX_ROUND_B = 0xCD9E8D57  # multiplier of counter word c2
PHILOX_KEY_A = 0x9E3779B9  # key word k0 increment per round (golden ratio)
PHILOX_KEY_B = 0xBB67AE85  # key word k1 increment per round (sqrt(3) - 1)
_A_NEG = PHILOX_ROUND_A - 2 ** 32  # M - 2^32, so that x * (M - 2^32) fits in int64
_B_NEG = PHILOX_ROUND_B - 2 ** 32


def _f32(x):
    """The float32 nearest to x, as a Python float: exact in float32, so float32 and float64 op math agree."""
    return struct.unpack("f", struct.pack("f", x))[0]


UNIFORM_SCALE = _f32(4.6566127342e-10)  # Triton's uint_to_uniform_float scale for 32-bit words
BOX_MULLER_MIN_U = _f32(1.0e-7)  # Triton's clamp of u1 before the log
TWO_PI = _f32(6.283185307179586)
_CPU_CHUNK = 1 << 15  # counters per block on CPU: 6 int64 buffers of 256 KiB, see "Speed"
_CUDA_CHUNK = 1 << 22  # on CUDA: few launches, 192 MiB of buffers at most


# ----------------------------------------------------------------------------------------------
# Philox rounds
# ----------------------------------------------------------------------------------------------


def _philox_rounds(c, spare, k0, k1, rounds):
    """Run `rounds` Philox rounds in place. c: 4 int64 tensors (n,) in [0, 2^32); spare: 2 buffers (n,).

    Returns (c0, c1, c2, c3), aliases of the six buffers (their roles rotate; no allocation).
    """
    c0, c1, c2, c3 = c
    s0, s1 = spare
    for _ in range(rounds):
        torch.mul(c2, _B_NEG, out=s0)  # p = B c2 - c2 2^32, exact
        torch.bitwise_right_shift(s0, 32, out=s1)
        s1.add_(c2).bitwise_xor_(c1).bitwise_xor_(k0)  # new c0 = hi(B c2) ^ c1 ^ k0
        s0.bitwise_and_(MASK32)  # new c1 = lo(B c2)
        torch.mul(c0, _A_NEG, out=c1)  # q = A c0 - c0 2^32 (old c1 is consumed)
        torch.bitwise_right_shift(c1, 32, out=c2)
        c2.add_(c0).bitwise_xor_(c3).bitwise_xor_(k1)  # new c2 = hi(A c0) ^ c3 ^ k1
        c1.bitwise_and_(MASK32)  # new c3 = lo(A c0)
        c0, c1, c2, c3, s0, s1 = s1, s0, c2, c1, c0, c3
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _key_words(key):
    """(k0, k1) = (low, high) 32-bit words of a 64-bit key, as Triton splits its seed."""
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or not 0 <= key < 2 ** 64:
        raise ValueError(f"key must be an int in [0, 2**64) (a stream key from dp/randomness.py); got {key!r}. "
                         f"Triton's negative seed s is the key s + 2**64")
    key = int(key)
    return key & MASK32, key >> 32


def _check_rounds(rounds):
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int (10 for Philox4x32-10); got {rounds!r}")
    return int(rounds)


def _blocks(k0, k1, rounds, n, device, fill):
    """Philox outputs for n counters, one cache-sized block at a time.

    fill(start, stop, c0, c1, c2, c3) writes the counter words of counters start..stop-1 into the four
    int64 buffers (stop - start,). Yields (start, stop, (x0, x1, x2, x3)): views valid until the next block.
    """
    chunk = max(1, min(n, _CUDA_CHUNK if device.type == "cuda" else _CPU_CHUNK))
    buffers = [torch.empty(chunk, dtype=torch.int64, device=device) for _ in range(6)]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        views = [b[:stop - start] for b in buffers]
        fill(start, stop, *views[:4])
        yield start, stop, _philox_rounds(views[:4], views[4:], k0, k1, rounds)


def _offset_blocks(key, offsets, rounds):
    """Checked arguments, then _blocks over Triton's randint4x counters (offset lo, offset hi, 0, 0)."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int64, torch.int32):
        what = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise ValueError(f"offsets must be an int64 (or int32) torch tensor, as Triton's offsets; got {what}")
    k0, k1 = _key_words(key)
    rounds = _check_rounds(rounds)
    flat = offsets.reshape(-1)

    def fill(start, stop, c0, c1, c2, c3):
        off = flat[start:stop]
        if flat.dtype == torch.int64:
            torch.bitwise_right_shift(off, 32, out=c1).bitwise_and_(MASK32)
            torch.bitwise_and(off, MASK32, out=c0)
        else:  # int32: Triton uses no high word; c0 = the int32 reinterpreted as uint32
            c0.copy_(off).bitwise_and_(MASK32)
            c1.zero_()
        c2.zero_()
        c3.zero_()

    return _blocks(k0, k1, rounds, flat.numel(), flat.device, fill)


def _to_uniform_(x, scratch, out):
    """Triton's uint_to_uniform_float: x int64 (n,) in [0, 2^32) -> out float32 (n,) in [0, 1). Clobbers x."""
    torch.bitwise_right_shift(x, 31, out=scratch).mul_(MASK32)
    x.bitwise_xor_(scratch)  # x if x < 2^31 else 2^32 - 1 - x: Triton's `where(x < 0, ~x, x)` on int32
    out.copy_(x).mul_(UNIFORM_SCALE)  # int -> float32 rounds to nearest (exact below 2^24), as Triton's
    return out


def _polar_(u1, u2):
    """Box-Muller's radius and angle as Triton's pair_uniform_to_normal(u1, u2) forms them, in place over whole
    tensors (float math parallelises well): u1 becomes sqrt(-2 log(max(u1, 1e-7))), u2 becomes 2 pi u2.

    u1, u2: float32 (n,) in [0, 1). The normals are radius * cos(angle) and radius * sin(angle).
    """
    return u1.clamp_min_(BOX_MULLER_MIN_U).log_().mul_(-2.0).sqrt_(), u2.mul_(TWO_PI)


def _uniforms(key, offsets, rounds, k):
    """Triton's `tl.rand` of words 0..k-1 at each offset: k float32 tensors (*offsets.shape,) in [0, 1)."""
    blocks = _offset_blocks(key, offsets, rounds)
    outs = [torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device) for _ in range(k)]
    scratch = None
    for start, stop, words in blocks:
        if scratch is None:  # one buffer of the first (largest) block's size, sliced for the last
            scratch = torch.empty_like(words[0])
        for out, x in zip(outs, words):
            _to_uniform_(x, scratch[:stop - start], out.view(-1)[start:stop])
    return outs


def _gather(blocks, shape, device):
    """The four output words of all blocks, as int64 tensors (*shape,)."""
    outs = [torch.empty(shape, dtype=torch.int64, device=device) for _ in range(4)]
    for start, stop, xs in blocks:
        for out, x in zip(outs, xs):
            out.view(-1)[start:stop].copy_(x)
    return tuple(outs)

# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def philox4x32(key, c0, c1, c2, c3, rounds=10):
    """Philox4x32-`rounds` of the counters (c0, c1, c2, c3) under `key` (Salmon et al. 2011).

    key: int in [0, 2^64), key words (k0, k1) = (key mod 2^32, key >> 32) as Triton's `tl.philox`.
    c0..c3: int64 tensors, broadcastable to one shape S, on one device, values in [0, 2^32).
    Returns four int64 tensors (S,) with values in [0, 2^32): Random123's philox4x32_R(ctr, key).
    """
    words = (c0, c1, c2, c3)
    if not all(isinstance(c, torch.Tensor) and c.dtype == torch.int64 for c in words):
        raise ValueError(f"c0..c3 must be int64 torch tensors; got {[getattr(c, 'dtype', type(c)) for c in words]}")
    if len({c.device for c in words}) != 1:
        raise ValueError(f"c0..c3 must be on one device; got {[c.device for c in words]}")
    k0, k1 = _key_words(key)
    rounds = _check_rounds(rounds)
    if any(bool(((c >> 32) != 0).any()) for c in words):
        raise ValueError("c0..c3 must hold 32-bit words, values in [0, 2**32); reduce them mod 2**32")
    words = torch.broadcast_tensors(*words)
    shape, device = words[0].shape, c0.device
    words = [w.reshape(-1) for w in words]  # (prod(S),) each

    def fill(start, stop, *c):
        for dst, src in zip(c, words):
            dst.copy_(src[start:stop])

    return _gather(_blocks(k0, k1, rounds, words[0].numel(), device, fill), shape, device)


def randint4x(key, offsets, rounds=10):
    """Triton's `tl.randint4x(key, offsets)`: four int64 tensors (*offsets.shape,) of 32-bit words.

    key: int in [0, 2^64). offsets: tensor of any shape on CPU or CUDA, int64 (any value; counter words
    (offset mod 2^32, (offset >> 32) mod 2^32, 0, 0)) or int32 (counter (offset mod 2^32, 0, 0, 0)).
    Triton returns int32 bit patterns; these are their unsigned values in [0, 2^32) (Triton's & 0xFFFFFFFF).
    """
    blocks = _offset_blocks(key, offsets, rounds)
    return _gather(blocks, offsets.shape, offsets.device)


def uniform(key, offsets, rounds=10):
    """Triton's `tl.rand(key, offsets)`, bit for bit: float32 (*offsets.shape,) in [0, 1) from word 0."""
    return _uniforms(key, offsets, rounds, 1)[0]


def randn(key, offsets, rounds=10):
    """Triton's `tl.randn(key, offsets)`: float32 (*offsets.shape,) ~ N(0, 1), Box-Muller of words 0 and 1.

    n = sqrt(-2 log(max(u1, 1e-7))) cos(2 pi u2) with u1, u2 = `uniform` of words 0, 1 (Box and Muller
    1958, first output); equal to Triton's up to float32 rounding of log / sqrt / cos (module docstring).
    Memory: two float32 tensors of offsets' size plus the fixed block buffers.
    """
    u1, u2 = _uniforms(key, offsets, rounds, 2)
    radius, angle = _polar_(u1, u2)
    return radius.mul_(angle.cos_())


def randn4x(key, offsets, rounds=10):
    """Triton's `tl.randn4x(key, offsets)`: four float32 tensors (*offsets.shape,) ~ N(0, 1), independent.

    Both Box-Muller outputs of words (0, 1) and of words (2, 3): r cos, r sin, r' cos, r' sin (module
    docstring); equal to Triton's up to float32 rounding of log / sqrt / cos / sin, as `randn`.
    Memory: four float32 tensors of offsets' size plus the fixed block buffers.
    """
    u1, u2, u3, u4 = _uniforms(key, offsets, rounds, 4)
    normals = []
    for u_radius, u_angle in ((u1, u2), (u3, u4)):
        radius, angle = _polar_(u_radius, u_angle)
        normals += [radius * torch.cos(angle), radius.mul_(angle.sin_())]
    return tuple(normals)


def coordinate_normals(key, n, device="cpu", rounds=10):
    """The DP noise vector: float32 (n,) ~ N(0, I), coordinate i = output i mod 4 of `randn4x(key, i // 4)`.

    kernels/clip_noise.py's kernel draws exactly these (its `_coordinate_normals`), so both backends add the
    same noise for the same key. n: int >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int (the number of noise coordinates); got {n!r}")
    counters = torch.arange(-(-int(n) // 4), device=device)
    return torch.stack(randn4x(key, counters, rounds), dim=1).reshape(-1)[:n]


def _benchmark(n=1 << 22):
    """Print the time of each generator for n counters, with 1 and 2 torch threads (numbers in the docstring)."""
    offsets = torch.arange(n)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for fn in (randint4x, uniform, randn):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                fn(2 ** 63 + 12345, offsets)
                times.append(time.perf_counter() - start)
            print(f"{fn.__name__:9s} n={n} threads={threads}: {min(times) * 1e3:6.1f} ms "
                  f"({n / min(times) / 1e6:5.1f} M counters/s)")


if __name__ == "__main__":
    _benchmark()
