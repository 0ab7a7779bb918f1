"""Tests for kernels/philox.py: Random123's known answers, bit identity with Triton's `tl.randint4x`,
`tl.rand`, `tl.randn` and `tl.randn4x` (the normals up to float32 rounding), the DP noise layout, key
sensitivity, moments, errors.

Triton's side runs through its interpreter, which must be switched on before triton is first imported.
This module sets TRITON_INTERPRET=1 first thing; if triton was imported earlier without it (another test
module), the Triton draws are computed in a fresh process (`python tests/test_philox.py OUT.pt`) instead.
On a GPU machine with TRITON_INTERPRET=0 the compiled kernels draw on CUDA and are compared the same way.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, by this module or another

import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as the fresh-process script
    sys.path.insert(0, str(REPO))

from kernels import philox  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
except ImportError:
    triton = None

M32 = 0xFFFFFFFF
# Random123 tests/kat_vectors, the philox4x32 lines: rounds, counter (c0..c3), key (k0, k1), expected output.
KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (M32,) * 4, (M32, M32), (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# Seeds of every Triton integer type: i32, u32 (bit 31), i64 (bits 32, 62), u64 (bit 63, all ones).
SEEDS = [0, 1, 12345, 2 ** 31 + 7, 2 ** 32 + 3, 2 ** 62 + 9, 2 ** 63 + 12345, 2 ** 64 - 1]
NEGATIVE_SEEDS = [-1, -12345, -2 ** 63]  # Triton sign-extends these to the key seed + 2**64
REFUSED_SEEDS = [2 ** 64, -2 ** 63 - 1]
# Offsets whose word 0 gives u1 < 1e-7 under key 0 (found by search): Box-Muller's clamp applies; 38471471
# has word 0xFFFFFFEC, the `~x` branch of uint_to_uniform_float.
CLAMPED_OFFSETS_KEY0 = [14883995, 17758991, 38471471, 48643752]
# |randn - tl.randn| <= RANDN_TOL (1 + |tl.randn|): measured max 1.6e-7 against the interpreter (module doc).
RANDN_TOL = 1e-6


def offset_sets():
    """Irregular lengths; offsets across 2**32 (c0 wraps, c1 counts), over all of int64, and edge values."""
    gen = torch.Generator().manual_seed(0)
    edges = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, -2 ** 63, -1, *CLAMPED_OFFSETS_KEY0]
    return {
        "arange_1000": torch.arange(1000),
        "across_2**32_4097": torch.arange(4097) + (2 ** 32 - 2048),
        "any_int64_4097": torch.randint(-2 ** 63, 2 ** 63 - 1, (4097,), generator=gen),
        "edges": torch.tensor(edges),
    }


INT32_OFFSETS = torch.cat([torch.arange(-500, 501, dtype=torch.int32), torch.tensor([-2 ** 31, 2 ** 31 - 1],
                                                                                   dtype=torch.int32)])


# ----------------------------------------------------------------------------------------------
# Triton's side
# ----------------------------------------------------------------------------------------------


def triton_mode():
    """"interpreter", "compiled" or "unavailable", as kernels/clip_noise.py's triton_mode."""
    if triton is None:
        return "unavailable"
    from triton.runtime.interpreter import InterpretedFunction
    return "interpreter" if isinstance(tl.randn, InterpretedFunction) else "compiled"


if triton is not None:
    @triton.jit
    def _philox_kernel(seed, c_ptr, out_ptr, n, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
        """out[j, i] = word j of tl.philox(seed, c[0, i], .., c[3, i]); c, out: (4, n) int32 bit patterns."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        c0, c1 = tl.load(c_ptr + i, mask=mask), tl.load(c_ptr + n + i, mask=mask)
        c2, c3 = tl.load(c_ptr + 2 * n + i, mask=mask), tl.load(c_ptr + 3 * n + i, mask=mask)
        x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3, N_ROUNDS)
        tl.store(out_ptr + i, x0, mask=mask)
        tl.store(out_ptr + n + i, x1, mask=mask)
        tl.store(out_ptr + 2 * n + i, x2, mask=mask)
        tl.store(out_ptr + 3 * n + i, x3, mask=mask)

    @triton.jit
    def _draw_kernel(seed, off_ptr, words_ptr, uni_ptr, nrm_ptr, nrm4_ptr, n, BLOCK: tl.constexpr):
        """words (4, n) int32 = tl.randint4x(seed, off); uni, nrm (n,) = tl.rand, tl.randn(seed, off);
        nrm4 (4, n) = tl.randn4x(seed, off)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        off = tl.load(off_ptr + i, mask=mask)
        x0, x1, x2, x3 = tl.randint4x(seed, off)
        tl.store(words_ptr + i, x0, mask=mask)
        tl.store(words_ptr + n + i, x1, mask=mask)
        tl.store(words_ptr + 2 * n + i, x2, mask=mask)
        tl.store(words_ptr + 3 * n + i, x3, mask=mask)
        tl.store(uni_ptr + i, tl.rand(seed, off), mask=mask)
        tl.store(nrm_ptr + i, tl.randn(seed, off), mask=mask)
        n0, n1, n2, n3 = tl.randn4x(seed, off)
        tl.store(nrm4_ptr + i, n0, mask=mask)
        tl.store(nrm4_ptr + n + i, n1, mask=mask)
        tl.store(nrm4_ptr + 2 * n + i, n2, mask=mask)
        tl.store(nrm4_ptr + 3 * n + i, n3, mask=mask)


def _triton_draw(seed, offsets, device, block=512):
    """(words (4, n) int64 in [0, 2**32), tl.rand (n,), tl.randn (n,), tl.randn4x (4, n)) on the CPU."""
    n = offsets.numel()
    words = torch.empty(4, n, dtype=torch.int32, device=device)
    uni, nrm = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(2))
    nrm4 = torch.empty(4, n, dtype=torch.float32, device=device)
    _draw_kernel[(triton.cdiv(n, block),)](seed, offsets.to(device), words, uni, nrm, nrm4, n, BLOCK=block)
    return words.cpu().to(torch.int64) & M32, uni.cpu(), nrm.cpu(), nrm4.cpu()


def compute_triton_draws(device):
    """Everything the tests compare against, computed by Triton on `device`; CPU tensors in a dict."""
    draws = {"sets": offset_sets(), "int32_offsets": INT32_OFFSETS, "draws": {}, "refused": {}, "kat": []}
    for seed in SEEDS:
        for name, offsets in draws["sets"].items():
            draws["draws"][seed, name] = _triton_draw(seed, offsets, device)
    for seed in NEGATIVE_SEEDS:
        draws["draws"][seed, "arange_1000"] = _triton_draw(seed, draws["sets"]["arange_1000"], device)
    draws["draws"][SEEDS[-2], "int32"] = _triton_draw(SEEDS[-2], INT32_OFFSETS, device)
    for seed in REFUSED_SEEDS:
        try:
            _triton_draw(seed, draws["sets"]["edges"], device)
            draws["refused"][seed] = None
        except Exception as error:  # noqa: BLE001 -- recorded, the test names what Triton should raise
            draws["refused"][seed] = type(error).__name__
    for rounds, counter, (k0, k1), _ in KAT:
        c = torch.tensor([w - 2 ** 32 if w >= 2 ** 31 else w for w in counter], dtype=torch.int32).view(4, 1)
        out = torch.empty(4, 1, dtype=torch.int32, device=device)
        _philox_kernel[(1,)](k1 << 32 | k0, c.to(device), out, 1, N_ROUNDS=rounds, BLOCK=16)
        draws["kat"].append(tuple((out.cpu().view(-1).to(torch.int64) & M32).tolist()))
    return draws


@pytest.fixture(scope="module")
def triton_draws(tmp_path_factory):
    mode = triton_mode()
    if mode == "unavailable":
        pytest.skip("triton is not installed")
    if mode == "interpreter":
        return compute_triton_draws("cpu")
    if mode == "compiled" and torch.cuda.is_available():
        return compute_triton_draws("cuda")
    path = tmp_path_factory.mktemp("triton") / "draws.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, str(path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(path, weights_only=False)


def key_of(seed):
    """Triton's seed -> this module's key: the seed as a uint64."""
    return seed % 2 ** 64


def set_names():
    return list(offset_sets())


# ----------------------------------------------------------------------------------------------
# Known answers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounds, counter, key_words, expected", KAT)
def test_philox4x32_random123_known_answers(rounds, counter, key_words, expected):
    c = [torch.tensor([w]) for w in counter]
    out = philox.philox4x32(key_words[1] << 32 | key_words[0], *c, rounds=rounds)
    assert tuple(int(x) for x in out) == expected


def test_triton_philox_gives_the_same_known_answers(triton_draws):
    """Triton's tl.philox(seed, c0..c3) is Random123's philox4x32 with key (seed lo, seed hi)."""
    assert triton_draws["kat"] == [expected for *_, expected in KAT]


# ----------------------------------------------------------------------------------------------
# Bit identity with Triton
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", set_names())
@pytest.mark.parametrize("seed", SEEDS)
def test_randint4x_bit_identical_to_triton(triton_draws, seed, name):
    words, *_ = triton_draws["draws"][seed, name]
    ours = philox.randint4x(key_of(seed), triton_draws["sets"][name])
    assert torch.equal(torch.stack(ours), words)


@pytest.mark.parametrize("name", set_names())
@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_bit_identical_to_triton_rand(triton_draws, seed, name):
    _, uni, *_ = triton_draws["draws"][seed, name]
    ours = philox.uniform(key_of(seed), triton_draws["sets"][name])
    assert torch.equal(ours, uni)
    assert 0 <= ours.min() and ours.max() < 1


@pytest.mark.parametrize("name", set_names())
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_matches_triton_randn_to_fp32_rounding(triton_draws, seed, name):
    _, _, nrm, _ = triton_draws["draws"][seed, name]
    ours = philox.randn(key_of(seed), triton_draws["sets"][name])
    err = (ours.double() - nrm.double()).abs()
    assert (err <= RANDN_TOL * (1 + nrm.double().abs())).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("name", set_names())
@pytest.mark.parametrize("seed", SEEDS)
def test_randn4x_matches_triton_randn4x_to_fp32_rounding(triton_draws, seed, name):
    *_, nrm4 = triton_draws["draws"][seed, name]
    ours = torch.stack(philox.randn4x(key_of(seed), triton_draws["sets"][name]))
    err = (ours.double() - nrm4.double()).abs()
    assert (err <= RANDN_TOL * (1 + nrm4.double().abs())).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("seed", NEGATIVE_SEEDS)
def test_negative_triton_seed_is_the_key_seed_plus_2_64(triton_draws, seed):
    words, uni, *_ = triton_draws["draws"][seed, "arange_1000"]
    assert torch.equal(torch.stack(philox.randint4x(seed + 2 ** 64, torch.arange(1000))), words)
    assert torch.equal(philox.uniform(seed + 2 ** 64, torch.arange(1000)), uni)


def test_triton_refuses_seeds_outside_int64_and_uint64(triton_draws):
    assert triton_draws["refused"] == {seed: "OverflowError" for seed in REFUSED_SEEDS}


def test_int32_offsets_match_triton_with_no_high_word(triton_draws):
    words, uni, *_ = triton_draws["draws"][SEEDS[-2], "int32"]
    offsets = triton_draws["int32_offsets"]
    assert torch.equal(torch.stack(philox.randint4x(SEEDS[-2], offsets)), words)
    assert torch.equal(philox.uniform(SEEDS[-2], offsets), uni)
    # c0 = the int32's bit pattern, c1 = 0: not the int64 offset of the same value when negative
    as_uint32 = offsets.to(torch.int64) & M32
    assert torch.equal(torch.stack(philox.randint4x(SEEDS[-2], as_uint32)), words)


# ----------------------------------------------------------------------------------------------
# Without Triton: layout, blocks, keys, statistics, errors
# ----------------------------------------------------------------------------------------------


def test_randint4x_is_philox4x32_of_the_offset_words():
    offsets = offset_sets()["any_int64_4097"]
    via_words = philox.philox4x32(SEEDS[-2], offsets & M32, (offsets >> 32) & M32,
                                  torch.zeros(1, dtype=torch.int64), torch.zeros((), dtype=torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(via_words, philox.randint4x(SEEDS[-2], offsets)))


def test_philox4x32_broadcasts_like_elementwise_calls():
    c0 = torch.arange(3).view(3, 1) * 2 ** 30
    c1 = torch.tensor([[0, 7, M32, 2 ** 31]])
    c2, c3 = torch.tensor(5), torch.tensor([M32])
    out = philox.philox4x32(2 ** 63 + 1, c0, c1, c2, c3)
    assert all(o.shape == (3, 4) and o.dtype == torch.int64 for o in out)
    for i in range(3):
        for j in range(4):
            one = philox.philox4x32(2 ** 63 + 1, c0[i], c1[0, j:j + 1], c2, c3)
            assert [int(x) for x in one] == [int(o[i, j]) for o in out]


def test_blocks_do_not_change_the_draws(monkeypatch):
    offsets = offset_sets()["across_2**32_4097"].view(17, 241)  # (B, k) as dp/randomness.py passes them
    whole = (philox.randint4x(7, offsets), philox.uniform(7, offsets), philox.randn(7, offsets))
    monkeypatch.setattr(philox, "_CPU_CHUNK", 1000)  # 4097 counters in 5 blocks, the last partial
    blocked = (philox.randint4x(7, offsets), philox.uniform(7, offsets), philox.randn(7, offsets))
    assert all(torch.equal(a, b) for a, b in zip(whole[0], blocked[0]))
    assert torch.equal(whole[1], blocked[1]) and torch.equal(whole[2], blocked[2])
    assert whole[2].shape == (17, 241) and whole[2].dtype == torch.float32


def test_randn4x_blocks_and_first_output(monkeypatch):
    offsets = offset_sets()["across_2**32_4097"].view(17, 241)
    whole = philox.randn4x(7, offsets)
    assert torch.equal(whole[0], philox.randn(7, offsets))  # output 0 is tl.randn's, the same float ops
    monkeypatch.setattr(philox, "_CPU_CHUNK", 1000)
    assert all(torch.equal(a, b) for a, b in zip(whole, philox.randn4x(7, offsets)))
    assert all(n.shape == (17, 241) and n.dtype == torch.float32 for n in whole)


@pytest.mark.parametrize("n", [0, 1, 5, 4099])
def test_coordinate_normals_layout(n):
    """Coordinate i is output i % 4 of randn4x(key, i // 4); a prefix of a longer vector is the shorter one."""
    key = 2 ** 63 + 99
    out = philox.coordinate_normals(key, n)
    assert out.shape == (n,) and out.dtype == torch.float32
    draws = philox.randn4x(key, torch.arange(n // 4 + 1))
    for i in sorted({0, 1, 2, 3, n // 2, n - 1} & set(range(n))):
        assert out[i] == draws[i % 4][i // 4]
    assert torch.equal(philox.coordinate_normals(key, n + 3)[:n], out)
    assert out.unique().numel() == n  # no two coordinates share a draw


def test_coordinate_normals_moments_and_independent_pairs():
    x = philox.coordinate_normals(12345, 1 << 20).double()
    assert abs(x.mean()) < 5 / 2 ** 10 and abs(x.var() - 1) < 5 * 2 ** 0.5 / 2 ** 10
    pairs = x.view(-1, 4)  # the four outputs of one counter: uncorrelated, including cos and sin of one angle
    corr = torch.corrcoef(pairs.T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / 2 ** 9
    assert abs((pairs[:, 0] ** 2 * pairs[:, 1] ** 2).mean() - 1) < 0.02  # not merely uncorrelated: E[x^2 y^2] = 1


@pytest.mark.parametrize("n", [-1, 2.0, True, None])
def test_coordinate_normals_refuses_a_bad_size(n):
    with pytest.raises(ValueError, match="non-negative int"):
        philox.coordinate_normals(1, n)


def test_empty_offsets_give_empty_draws():
    empty = torch.zeros(0, 3, dtype=torch.int64)
    assert [w.shape for w in philox.randint4x(1, empty)] == [(0, 3)] * 4
    assert philox.randn(1, empty).shape == (0, 3) and philox.uniform(1, empty).shape == (0, 3)


def test_randn_clamps_u1_at_1e_minus_7():
    """At these offsets word 0 maps below 1e-7: n = sqrt(-2 log(fp32(1e-7))) cos(2 pi u2) = +-5.68 cos(.)."""
    offsets = torch.tensor(CLAMPED_OFFSETS_KEY0)
    x0, x1, _, _ = philox.randint4x(0, offsets)
    v0 = torch.where(x0 < 2 ** 31, x0, M32 - x0)
    assert (v0.float() * philox.UNIFORM_SCALE < 1e-7).all()
    u2 = (torch.where(x1 < 2 ** 31, x1, M32 - x1).float() * philox.UNIFORM_SCALE).double()
    expected = math.sqrt(-2 * math.log(philox.BOX_MULLER_MIN_U)) * torch.cos(2 * math.pi * u2)
    assert torch.allclose(philox.randn(0, offsets).double(), expected, rtol=0, atol=2e-6)


def test_uniform_of_the_edge_words():
    """Word -> float32 as Triton's uint_to_uniform_float: 0 and 2**32 - 1 give 0; the largest is 1 - 2**-24."""
    words = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 2, 2 ** 32 - 1])
    out = philox._to_uniform_(words.clone(), torch.empty_like(words), torch.empty(6))
    assert out.tolist() == [0.0, philox.UNIFORM_SCALE, 1 - 2 ** -24, 1 - 2 ** -24, philox.UNIFORM_SCALE, 0.0]


@pytest.mark.parametrize("bit", [32, 33, 62, 63])
def test_keys_differing_in_one_high_bit_give_different_streams(bit):
    """Both 32-bit key words are used: a flip at bit 32 or above (key word k1) changes every draw."""
    key = 0x0123456789ABCDEF
    offsets = torch.arange(10000)
    a, b = philox.randint4x(key, offsets), philox.randint4x(key ^ (1 << bit), offsets)
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    assert same <= 2  # independent words collide with probability 2**-32 each; 40000 words
    na, nb = philox.randn(key, offsets).double(), philox.randn(key ^ (1 << bit), offsets).double()
    assert abs(torch.corrcoef(torch.stack([na, nb]))[0, 1]) < 5 / math.sqrt(len(offsets))


def test_randn_and_uniform_moments_over_a_million_draws():
    """5-sigma bounds for n = 1e6: mean +- 5/sqrt(n), std +- 5/sqrt(2n), 4th moment 3 +- 5 sqrt(96/n)."""
    n = 10 ** 6
    z = philox.randn(2 ** 63 + 12345, torch.arange(n) + 2 ** 40).double()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / n)
    assert z.abs().max() <= math.sqrt(-2 * math.log(1e-7))  # the clamp bounds every draw
    u = philox.uniform(2 ** 63 + 12345, torch.arange(n) + 2 ** 40).double()
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)


BAD = [
    (dict(key=-1), "key must be an int in \\[0, 2\\*\\*64\\).*got -1"),
    (dict(key=2 ** 64), "key must be an int in \\[0, 2\\*\\*64\\)"),
    (dict(key=1.5), "key must be an int"),
    (dict(key=True), "key must be an int"),
    (dict(offsets=torch.zeros(3)), "offsets must be an int64 \\(or int32\\) torch tensor.*float32"),
    (dict(offsets=[1, 2]), "offsets must be an int64 \\(or int32\\) torch tensor.*list"),
    (dict(rounds=-1), "rounds must be a non-negative int"),
]


@pytest.mark.parametrize("fn", [philox.randint4x, philox.uniform, philox.randn])
@pytest.mark.parametrize("bad, message", BAD)
def test_bad_arguments_raise_clearly(fn, bad, message):
    args = {"key": 1, "offsets": torch.arange(3), "rounds": 10, **bad}
    with pytest.raises(ValueError, match=message):
        fn(args["key"], args["offsets"], rounds=args["rounds"])


@pytest.mark.parametrize("words, message", [
    ([torch.tensor([2 ** 32])] + [torch.tensor([0])] * 3, "values in \\[0, 2\\*\\*32\\)"),
    ([torch.tensor([-1])] + [torch.tensor([0])] * 3, "values in \\[0, 2\\*\\*32\\)"),
    ([torch.tensor([1], dtype=torch.int32)] + [torch.tensor([0])] * 3, "int64 torch tensors"),
])
def test_philox4x32_refuses_words_that_are_not_uint32(words, message):
    with pytest.raises(ValueError, match=message):
        philox.philox4x32(1, *words)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_draws_equal_cpu_draws():
    offsets = offset_sets()["any_int64_4097"]
    for seed in SEEDS:
        cpu = philox.randint4x(seed, offsets)
        cuda = philox.randint4x(seed, offsets.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda))
        assert torch.equal(philox.uniform(seed, offsets), philox.uniform(seed, offsets.cuda()).cpu())
        z = philox.randn(seed, offsets)
        assert ((philox.randn(seed, offsets.cuda()).cpu() - z).abs() <= RANDN_TOL * (1 + z.abs())).all()


if __name__ == "__main__":  # the fixture's fresh process, with TRITON_INTERPRET=1 from the start
    torch.save(compute_triton_draws("cpu"), sys.argv[1])
