"""Tests that would fail if the privacy audit were toothless or its statistics wrong."""

import contextlib
import io
import json
import math
import os
import shutil
import warnings
from fractions import Fraction

import pytest
import torch

import dp.bookkeeping as bk
import dp.step
from dp import audit, canaries
from dp.accountant import compute_epsilon
from dp.finetune import encode_private, load_pretrained, private_task
from dp.per_sample import per_sample_grads
from dp.randomness import seeded_secret
from dp.select import select_parameters
from kernels.clip_noise import clip_and_noise, clip_factors
from ldm.build import build_diffusion
from ldm.config import make_config
from ldm.data import load_dataset

# smoke model (its 60 + 60 public steps), 64 fake images per set: each audited run takes seconds
TINY = ["--preset", "smoke", "--fake-n", "64",
        "--ckpt-every", "4", "--log-every", "4", "--noise-seed", "3", "--delta", "1e-5"]
BASE = {"fake_n": 64, "noise_seed": 3, "delta": 1e-5}
N_REAL = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, one_thread):
    """`python -m dp.audit` on an empty folder: runs the public stages, then a short audit."""
    out = str(tmp_path_factory.mktemp("audit"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the --noise-seed warning
        status = audit.main([*TINY, "--out", out, "--m", "100", "--steps", "3"])
    return out, status, stdout.getvalue()


def audited(out, m, steps, canary="white", **overrides):
    cfg = make_config("smoke", {**BASE, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return audit.run_audit(cfg, out, torch.device("cpu"), m=m, canary=canary, steps=steps)


# ---- The statistics --------------------------------------------------------------------------


def exact_p_value(r, v, eps, delta, m):
    """Theorem 5.2 of Steinke, Nasr, Jagielski 2023 in exact rational arithmetic (p rounded to a float)."""
    p = Fraction(math.exp(eps) / (1 + math.exp(eps)))
    pmf = [math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(r + 1)]
    spread = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(Fraction(1), sum(pmf[v:]) + 2 * m * Fraction(delta) * spread)


@pytest.mark.parametrize("delta", [0.0, 1e-3])
def test_p_value_matches_exact_binomial_tails_on_small_cases(delta):
    for r in (1, 2, 5, 12):
        for v in range(r + 1):
            for eps in (0.0, 0.3, 1.0, 4.0):
                expected = float(exact_p_value(r, v, eps, delta, m=3 * r))
                assert audit.p_value(r, v, eps, delta, 3 * r) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    # P[Bin(4, 1/2) >= 3] = 5/16, by hand
    assert audit.p_value(4, 3, 0.0, 0.0, 4) == pytest.approx(5 / 16, rel=1e-12)


@pytest.mark.parametrize("r,level", [(1, 0.05), (20, 0.05), (100, 0.01), (1000, 0.05 / 3)])
def test_bound_with_delta_zero_and_all_guesses_correct_matches_closed_form(r, level):
    # P[Bin(r, p) >= r] = p^r <= level  <=>  eps <= log(level^(1/r) / (1 - level^(1/r)))
    p = level ** (1 / r)
    closed = max(0.0, math.log(p / (1 - p)))
    assert audit.epsilon_lower_bound(r, r, r, 0.0, level) == pytest.approx(closed, abs=1e-7)


def test_bound_needs_evidence_and_delta_weakens_it():
    assert audit.epsilon_lower_bound(200, 100, 1000, 0.0, 0.05) == 0.0  # chance level: no evidence
    bounds = [audit.epsilon_lower_bound(200, v, 1000, 1e-5, 0.05) for v in (120, 150, 180, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert audit.epsilon_lower_bound(200, 180, 1000, 1e-3, 0.05) < bounds[2]
    for v, b in zip((120, 150, 180, 200), bounds):  # the returned eps is rejected at the level
        assert audit.p_value(200, v, b, 1e-5, 1000) <= 0.05 < audit.p_value(200, v, b + 1e-6, 1e-5, 1000)


def test_guesses_are_top_and_bottom_k_and_pay_bonferroni():
    included = torch.tensor([True, False] * 50)
    scores = included.double() + torch.linspace(0, 0.5, 100)  # perfectly separated
    result = audit.one_run_bound(scores, included, 0.0, 0.05)
    assert [t["k"] for t in result["tried"]] == [5, 10, 20]
    assert all(t["correct_guesses"] == t["guesses"] for t in result["tried"])
    assert result["guesses"] == 40 and result["epsilon_lower_bound"] == pytest.approx(
        audit.epsilon_lower_bound(40, 40, 100, 0.0, 0.05 / 3), abs=1e-9)
    assert result["epsilon_lower_bound"] < audit.epsilon_lower_bound(40, 40, 100, 0.0, 0.05)
    assert audit.count_correct(-scores, included, 10) == 0  # guessing backwards is all wrong


# ---- The canaries ----------------------------------------------------------------------------


def test_canary_gradients_are_one_hot_and_clipped_to_c():
    shapes = [torch.Size([3, 4]), torch.Size([6]), torch.Size([5]), torch.Size([2, 2])]
    coords, present = torch.tensor([0, 19, 25, 7]), torch.tensor([2, 0, 1])  # offsets 0, 12, 18, 23
    grads = audit.canary_gradients(coords, present, shapes, 4 * 0.5, "cpu")
    flat = torch.cat([g.flatten(1) for g in grads], dim=1)  # (3, 27)
    expected = torch.zeros(3, 27)
    expected[[0, 1, 2], [25, 0, 19]] = 2.0
    assert torch.equal(flat, expected)
    assert grads[1].stride(0) == 0  # a parameter without canaries costs no memory
    summed = torch.cat([g.flatten() for g in clip_and_noise(grads, 0.5, 0.0, 1.0, 0)])
    torch.testing.assert_close(summed, expected.sum(0) / 4, rtol=1e-5, atol=0)  # each clipped to C = 0.5
    assert audit.canary_gradients(coords, present[:0], shapes, 1.0, "cpu") is None


def test_canary_coordinates_are_distinct_seeded_and_untouched_by_the_private_data(cli_run):
    out = cli_run[0]
    cfg = make_config("smoke", BASE)
    ae, unet = load_pretrained(cfg, out, torch.device("cpu"))
    params = select_parameters(unet, "all")
    diffusion = build_diffusion(cfg)
    coords, untouched = audit.canary_coordinates(unet, diffusion, params, cfg, 2000, audit.audit_generator(0, "c"))
    again, _ = audit.canary_coordinates(unet, diffusion, params, cfg, 2000, audit.audit_generator(0, "c"))
    assert untouched == 2000 and len(set(coords.tolist())) == 2000 and torch.equal(coords, again)
    data = load_dataset("fake", cfg.data, "private")
    mean, _ = encode_private(ae, data, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    t, noise = diffusion.draw(mean, g)
    grads = per_sample_grads(unet, diffusion, params, mean, data.y, t, noise)
    flat = torch.cat([grads[n].flatten(1) for n in params], dim=1)  # (64, P)
    assert torch.all(flat[:, coords] == 0) and flat.abs().sum() > 0
    names = [n for n, p in params.items() for _ in range(p.numel())]
    assert {names[i].split(".", 2)[2] for i in coords.tolist()} <= {
        "attn2.to_q.weight", "attn2.to_k.weight", "norm2.weight", "norm2.bias"}


def test_without_noise_scores_count_the_samplings_of_included_canaries_only(cli_run, monkeypatch):
    real = dp.step.gaussian_noise
    monkeypatch.setattr(dp.step, "gaussian_noise", lambda shapes, std, key, **k: real(shapes, 0.0, key, **k))
    seen, real_bound = {}, audit.one_run_bound

    def spy(scores, included, delta, level):
        seen.update(scores=scores, included=included)
        return real_bound(scores, included, delta, level)
    monkeypatch.setattr(audit, "one_run_bound", spy)
    m, steps = 200, 4
    audited(cli_run[0], m, steps, expected_batch=(N_REAL + m) // 2)  # q = 1/2
    scores, included = seen["scores"], seen["included"]
    assert torch.all(scores[~included] == 0)  # an excluded canary never enters, real data never reaches it
    counts = scores[included]
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)  # each sampling adds exactly C
    assert counts.min() >= 0 and counts.max() <= steps and abs(counts.mean().item() - steps / 2) < 0.3
    assert 80 < int(included.sum()) < 120


# ---- The audit against the real mechanism and against planted faults -------------------------


def noise_quartered(monkeypatch):  # a bug planted in the noise that training's step adds
    real = dp.step.gaussian_noise
    monkeypatch.setattr(dp.step, "gaussian_noise", lambda shapes, std, key, **k: real(shapes, std / 4, key, **k))


def clipping_disabled(monkeypatch):  # a bug planted in the clipping of the canaries' per-example gradients
    real = audit.clip_and_noise
    monkeypatch.setattr(audit, "clip_and_noise", lambda g, c, s, d, seed, **k: real(g, 1e30, s, d, seed, **k))


@pytest.mark.parametrize("fault", [None, noise_quartered, clipping_disabled])
def test_real_run_audits_below_its_epsilon_and_planted_faults_audit_above(cli_run, monkeypatch, fault):
    if fault is not None:
        fault(monkeypatch)
    m = 2000
    # q = 1 (expected batch = N): no subsampling, the setting where the one-run audit is sharpest
    report = audited(cli_run[0], m, 10, epsilon=2.0, expected_batch=N_REAL + m, physical_batch=64)
    assert report["steps"] == 10 and report["q"] == 1.0 and report["accounted_epsilon"] <= 2.0
    bound = report["empirical_epsilon_lower_bound"]
    if fault is None:
        assert 0.2 < bound <= report["accounted_epsilon"] and report["verdict"] == "consistent"
    else:
        assert bound > 2.0 + 1.0 and report["verdict"] == "inconsistent"


def test_black_box_input_canaries_run_and_are_consistent(cli_run):
    report = audited(cli_run[0], 200, 5, canary="black")
    assert report["verdict"] == "consistent" and report["m"] == 200
    assert 0 <= report["empirical_epsilon_lower_bound"] <= report["accounted_epsilon"]
    assert report["score"].startswith("minus the diffusion loss")


# ---- The command line ------------------------------------------------------------------------


def test_command_prints_one_json_object_and_writes_it(cli_run):
    out, status, stdout = cli_run
    assert status == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for key in ("accounted_epsilon", "empirical_epsilon_lower_bound", "m", "guesses", "correct_guesses", "level",
                "verdict"):
        assert key in report
    assert report["verdict"] == "consistent" and report["m"] == 100 and report["steps"] == 3
    assert report["level"] == 0.05 and report["n_with_canaries"] == N_REAL + 100
    # sigma is calibrated for the 3 steps actually run, and the epsilon reported is theirs
    assert report["accounted_epsilon"] == compute_epsilon(report["sigma"], report["q"], 3, 1e-5).epsilon
    assert 9.5 < report["accounted_epsilon"] <= report["target_epsilon"] == 10.0
    assert json.load(open(os.path.join(out, "audit.json"))) == report
    assert os.path.exists(os.path.join(out, "pretrain.pt"))  # the public stages ran in --out


@pytest.mark.parametrize("flags,needle", [
    (["--m", "1"], "--m"),
    (["--level", "1.5"], "--level"),
    (["--steps", "0"], "--steps"),
    (["--delta", "1e-3", "--m", "2000"], "canaries"),  # delta >= 1/N for N = 64 + 2000
])
def test_bad_audit_input_is_refused_with_one_line(cli_run, tmp_path, capsys, flags, needle):
    out = str(tmp_path / "run")
    os.makedirs(out)
    for f in ("autoencoder.pt", "pretrain.pt"):
        shutil.copy(os.path.join(cli_run[0], f), out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert audit.main([*TINY, "--out", out, *flags]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0] and captured.out == ""
    assert not os.path.exists(os.path.join(out, "audit.json"))


# ---- Example canaries: real examples through the default book-keeping step (dp/canaries.py) ----------

EXAMPLE = dict(epsilon=2.0, clip=1e-3, dp_blocks="up1_1")  # the paper's C; one block (see README: audit)
DOMINANT = "attn.up1_1.proj_out.weight"  # carries ~99% of a canary's gradient norm in that block


def test_reference_direction_is_what_the_correct_step_releases_for_one_example(cli_run):
    cfg = make_config("smoke", {**BASE, **EXAMPLE})
    ae, unet = load_pretrained(cfg, cli_run[0], torch.device("cpu"))
    data = load_dataset("fake", cfg.data, "private")
    task = private_task(cfg, ae, unet, data, torch.device("cpu"))
    secret = seeded_secret(5, "test")
    mech = dp.step.Mechanism(1.0, cfg.dp.clip, 0.0, 1.0)
    for i in (0, 7):
        idx = torch.tensor([i])
        released = torch.cat([g.flatten() for g in dp.step.private_gradient(task, mech, secret, 3, idx)]).double()
        joint, tensor = canaries.reference_directions(task, cfg.dp.clip, dp.step.example_inputs(task, secret, 3, idx))
        torch.testing.assert_close(released, joint, rtol=1e-4, atol=1e-9)
        assert joint.norm() == pytest.approx(cfg.dp.clip, rel=1e-6)  # clipped: the norm is far above 1e-3
        assert tensor.norm() > 2 * cfg.dp.clip  # several tensors each at C


def test_without_noise_example_canary_scores_are_one_per_sampling_of_an_included_canary(cli_run, monkeypatch):
    real = dp.step.gaussian_noise
    monkeypatch.setattr(dp.step, "gaussian_noise", lambda shapes, std, key, **k: real(shapes, 0.0, key, **k))
    seen, real_bound = {}, audit.one_run_bound
    monkeypatch.setattr(audit, "one_run_bound", lambda s, inc, d, lv: seen.update(s=s, inc=inc) or real_bound(s, inc, d, lv))
    m = 200
    report = audited(cli_run[0], m, None, canary="example", expected_batch=(N_REAL + m) // 2, **EXAMPLE)  # q = 1/2
    joint, included = seen["s"]["joint"], seen["inc"]
    assert report["steps"] == 1 and report["steps_run"] == m
    assert torch.all(joint[~included] == 0) and torch.all(seen["s"]["tensor"][~included] == 0)
    ones = joint[included]
    torch.testing.assert_close(ones, ones.round(), rtol=0, atol=1e-4)  # sampled: exactly C along its own gradient
    assert set(ones.round().tolist()) == {0.0, 1.0} and 0.3 < ones.mean().item() < 0.7


def drop_one_norm_term(monkeypatch):  # book-keeping forgets the norm term of the tensor that carries the most
    real = bk.joint_norms
    monkeypatch.setattr(bk, "joint_norms", lambda sq: real({k: v for k, v in sq.items() if k != DOMINANT}))


def clip_per_tensor(monkeypatch):  # book-keeping clips each tensor to C on its own instead of jointly
    monkeypatch.setattr(bk, "tensor_factors",
                        lambda sq, c: ({k: clip_factors(v.sqrt(), c) for k, v in sq.items()}, bk.joint_norms(sq)))


@pytest.mark.parametrize("fault", [None, drop_one_norm_term, clip_per_tensor, noise_quartered])
def test_example_canaries_audit_book_keeping_faults_above_their_epsilon(cli_run, monkeypatch, fault):
    if fault is not None:
        fault(monkeypatch)
    m = 1000
    report = audited(cli_run[0], m, None, canary="example", expected_batch=N_REAL + m, **EXAMPLE)  # q = 1
    assert report["q"] == 1.0 and report["accounted_epsilon"] <= 2.0 and report["steps_run"] == m
    bound = report["empirical_epsilon_lower_bound"]
    if fault is None:
        assert 0.2 < bound <= report["accounted_epsilon"] and report["verdict"] == "consistent"
    else:
        assert bound > 2.0 + 0.5 and report["verdict"] == "inconsistent"
