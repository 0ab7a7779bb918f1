"""Privacy audit: an empirical lower bound on epsilon from one DP fine-tuning run with canaries.

    python -m dp.audit --preset smoke --out /tmp/audit                  # example canaries (default)
    python -m dp.audit --preset smoke --out /tmp/audit --delta 1e-6     # a sharper bound (see `warning`)
    python -m dp.audit --preset quick --out runs/quick --m 1000
    python -m dp.audit --preset smoke --out /tmp/audit --canary white   # one-coordinate gradient canaries
    python -m dp.audit --preset smoke --out /tmp/audit --canary black   # input canaries, weaker

The one-run audit of Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training Run"):
  1. m canaries, each included in the private set with probability 1/2, decided before training from
     the audit's own generator (--seed) and read only when the guesses are counted;
  2. DP steps built from the training stage's own functions: the same Poisson sampler and rate
     q = expected_batch / N, where N counts the private examples and all m canaries; the same
     `private_gradient` of dp/step.py (clip, sum, noise once, divide by q N); the same sigma calibration
     for the steps each canary takes part in (--steps);
  3. a score per canary, from what the run released; guess "in" for the k highest scores and "out" for
     the k lowest, count the correct guesses v out of r = 2k;
  4. the empirical lower bound is the largest epsilon for which an (epsilon, delta)-DP run would get v or
     more correct guesses with probability at most `level` (Theorem 5.2 of the paper, `p_value` below).
The command runs the public stages first if they are missing in --out, prints one JSON object on stdout,
writes it to <out>/audit.json and exits 0 ("consistent": bound <= accounted epsilon) or 1 ("inconsistent").

Canaries (`--canary`):
  example  (default) real examples through the default step (dp/canaries.py): uniform-noise images with
         random labels, encoded and appended to the private set, one canary per logical step (--steps each,
         default 1; parallel composition). Clipped by the configured --grad-method, book-keeping by default,
         so a clipping bug there reaches them. Scores: the released gradient projected on the canary's own
         gradient recomputed by plain autograd and clipped jointly ("joint") or tensor by tensor ("tensor").
  white  a canary is a per-example gradient, a one-hot of value CANARY_GRADIENT * C on its own coordinate
         of the trainable attention parameters, passed as `extra` to `private_gradient` after the vmap
         path's `clip_and_noise` clipped it to C, in one run of --steps steps (default: the configuration's)
         with the real examples. The coordinates are drawn (seeded) among those that no data can reach:
         cross-attention to one context token has a constant softmax, so the forward never calls its to_q,
         to_k and the norm2 before it (ldm/attention.py `Attention.one_key`), whose gradient is exactly zero
         (`untouched_coordinates`). The score then sees only the canary and the
         mechanism's noise. Score: the sum over steps of the noisy gradient at the canary's coordinate, in
         units of one clipped canary (C / (q N)): the DP output the optimiser receives (with AdamW the
         parameter change is a nonlinear function of it, so the audit scores the released gradient).
         Refused with --dp-lora: LoRA factors have no coordinates that data never reaches.
  black  a canary is a uniform-noise image with a random label, added to the private set for one run;
         score: minus its diffusion loss under the fine-tuned UNet, mean over SCORE_DRAWS fixed (t, noise) draws.

Guarantees: if the run is (epsilon, delta)-DP for add/remove-one neighbours, the chance that the
reported bound exceeds epsilon is at most `level` (the choice of the score and of k among GUESS_FRACTIONS
is paid for by Bonferroni: each pair is tested at level / the number of pairs). A bound above the accounted epsilon is
therefore evidence, at that level, of a bug in clipping, noise, sampling or accounting.
Not proven: a bound below the accounted epsilon does not show that the run is private. The one-run bound
is far from tight (a correct run at epsilon 10 typically audits below 1); it checks only the mechanism the
canaries pass through, with these hyperparameters, not leaks outside it (data loading, checkpoints, logs,
hyperparameter search), not the floating-point noise sampler. Example canaries are uniform-noise images, not
private-looking ones; white-box gradient canaries skip the per-example gradient path altogether.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from dp.accountant import compute_epsilon, neighbouring_relation
from dp.canaries import example_canary_scores, input_canaries
from dp.finetune import check_clip_backend, encode_private, load_pretrained, privacy_plan, private_task
from dp.per_sample import per_sample_grads
from dp.randomness import poisson_sample, run_secret
from dp.sensitivity import check_sensitivity, random_task
from dp.step import Mechanism, apply_update, make_optimizer, private_gradient
from kernels.clip_noise import clip_and_noise
from ldm import autoencoder_stage, pretrain_stage
from ldm.build import latent_shape
from ldm.checkpoint import atomic_write_json
from ldm.config import add_config_flags, config_from_args
from ldm.data import check_pair, load_private
from ldm.distributed import pick_device
from ldm.errors import UserError
from ldm.metrics_log import MetricsLog
from ldm.run_folder import prepare_out, stage_path
from ldm.schedule import lr_at

CANARY_KINDS = ("example", "white", "black")
GUESS_FRACTIONS = (0.05, 0.1, 0.2)  # k = fraction * m guesses on each side, fixed in advance (Bonferroni)
CANARY_GRADIENT = 4.0  # a white-box canary's gradient norm before clipping, in units of C
SCORE_DRAWS = 16  # (t, noise) draws per black-box canary
SENSITIVITY_OTHERS = 32  # --check-sensitivity: examples in the batch besides x
EPS_MAX = 50.0  # the bisection's upper end: no run of m <= 10^9 canaries can audit above it


# ---- The one-run bound (Steinke, Nasr, Jagielski 2023, Theorem 5.2) ----------------------------


def binomial_pmf(r, eps):
    """P[Bin(r, p) = k] for k = 0..r with p = e^eps / (1 + e^eps): a (r + 1,) float64 tensor, from log space."""
    k = torch.arange(r + 1, dtype=torch.float64)
    log_p, log_1mp = -math.log1p(math.exp(-eps)), -math.log1p(math.exp(eps))  # log p, log(1 - p)
    log_choose = math.lgamma(r + 1) - torch.lgamma(k + 1) - torch.lgamma(r - k + 1)
    return torch.exp(log_choose + k * log_p + (r - k) * log_1mp)


def p_value(r, v, eps, delta, m):
    """Bound on P[>= v of r guesses correct] for an (eps, delta)-DP run with m canaries (paper, Theorem 5.2):

        P[Bin(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i,   p = e^eps / (1 + e^eps).

    Every probability is summed in float64 from exact log-space terms; capped at 1.
    """
    if v == 0:
        return 1.0
    pmf = binomial_pmf(r, eps)
    tail = pmf[v:].sum().item()
    below = pmf[:v].flip(0).cumsum(0)  # below[i - 1] = P[v - i <= Bin < v], i = 1..v
    spread = (below / torch.arange(1, v + 1, dtype=torch.float64)).max().item()
    return min(1.0, tail + 2 * m * delta * spread)


def epsilon_lower_bound(r, v, m, delta, level):
    """The largest eps (to 1e-9) with p_value(r, v, eps, delta, m) <= level; 0 when eps = 0 is not rejected.

    Bisection keeps p_value(lo) <= level, so the returned eps is always rejected at `level`; a run that is
    (eps', delta)-DP for some eps' <= eps is also (eps, delta)-DP, so every smaller eps is rejected too.
    """
    if not (isinstance(r, int) and isinstance(v, int) and 0 <= v <= r <= m):
        raise ValueError(f"need integers 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not (0 <= delta < 1 and 0 < level < 1):
        raise UserError(f"need 0 <= delta < 1 and 0 < --level < 1, got delta={delta}, level={level}")
    if p_value(r, v, 0.0, delta, m) > level:
        return 0.0
    lo, hi = 0.0, EPS_MAX
    if p_value(r, v, hi, delta, m) <= level:
        return hi
    while hi - lo > 1e-9:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(r, v, mid, delta, m) <= level else (lo, mid)
    return lo


def count_correct(scores, included, k):
    """Correct guesses when the k highest scores are guessed "in" and the k lowest "out" (r = 2k guesses).

    scores: (m,) float; included: (m,) bool, the secret. Ties are broken by index (stable sort).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    return int(included[order[:k]].sum()) + int((~included[order[len(order) - k:]]).sum())


def one_run_bound(scores, included, delta, level, fractions=GUESS_FRACTIONS):
    """The audit's result: the best bound over k = fraction * m and over the scores, each (score, k) pair
    tested at level / (number of pairs) (Bonferroni). scores: (m,) or {name: (m,)}, fixed before training.

    Returns a dict: epsilon_lower_bound, guesses (r), correct_guesses (v), k, score, and every pair tried.
    """
    scores = scores if isinstance(scores, dict) else {"score": scores}
    tests = len(fractions) * len(scores)
    tried = []
    for name, s in scores.items():
        m = len(s)
        for f in fractions:
            k = min(max(1, round(f * m)), m // 2)
            v = count_correct(s, included, k)
            tried.append(dict(score=name, k=k, guesses=2 * k, correct_guesses=v,
                              bound=epsilon_lower_bound(2 * k, v, m, delta, level / tests)))
    best = max(tried, key=lambda t: (t["bound"], t["correct_guesses"] / t["guesses"]))
    return dict(epsilon_lower_bound=best["bound"], guesses=best["guesses"], correct_guesses=best["correct_guesses"],
                k=best["k"], score=best["score"], tried=tried, bonferroni_level=level / tests)


# ---- Canaries ---------------------------------------------------------------------------------


def audit_generator(seed, purpose):
    """A CPU generator for one audit purpose, seeded by hashing (seed, purpose), so that it never shares a
    stream with the DP noise or sampling generators (seeded directly by --noise-seed in experiments)."""
    digest = hashlib.sha256(f"dp-audit/{seed}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def untouched_coordinates(unet, diffusion, params, cfg, generator, probes=8):
    """Flat indices (into the concatenation of `params`, in order) of attention-block coordinates whose
    gradient is exactly zero for `probes` random latents, labels and timesteps: structurally unreachable
    by any data (e.g. to_q, to_k and norm2 before a one-token cross-attention, whose softmax is constant).
    No private example is read. The class embedding table is never used for canaries."""
    device = next(unet.parameters()).device
    z0 = torch.randn(probes, *latent_shape(cfg), generator=generator).to(device)
    y = torch.randint(0, unet.class_embed.num_embeddings, (probes,), generator=generator).to(device)
    t, noise = diffusion.draw(z0, generator)
    grads = per_sample_grads(unet, diffusion, params, z0, y, t, noise)
    zero = torch.cat([(grads[n] == 0).flatten(1).all(0) for n in params])  # (P,)
    return (zero & attention_mask(params).to(device)).nonzero().flatten().cpu()


def attention_mask(params):
    """(P,) bool over the concatenated parameters: True on the attention blocks' coordinates."""
    return torch.cat([torch.full((p.numel(),), n.startswith("attn.")) for n, p in params.items()])


def canary_coordinates(unet, diffusion, params, cfg, m, generator):
    """m distinct flat coordinates for white-box canaries: untouched ones first (in random order), then, if
    there are too few, random other attention coordinates (their score also carries real gradients, which
    only weakens the bound). Returns ((m,) long, how many of them are untouched by data)."""
    attention = attention_mask(params)
    if m > int(attention.sum()):
        raise UserError(f"--m {m} canaries need as many trainable attention coordinates, there are "
                        f"{int(attention.sum())}; lower --m or select more blocks with --dp-blocks")
    untouched = untouched_coordinates(unet, diffusion, params, cfg, generator)
    others = (attention & ~torch.isin(torch.arange(len(attention)), untouched)).nonzero().flatten()
    ranked = torch.cat([untouched[torch.randperm(len(untouched), generator=generator)],
                        others[torch.randperm(len(others), generator=generator)]])
    return ranked[:m], min(m, len(untouched))


def canary_gradients(coords, present, shapes, value, device):
    """Per-example gradients of the canaries `present` this step: a list of (k, *shape) tensors, one per
    parameter, row b a one-hot of `value` at canary present[b]'s coordinate. Parameters holding none of
    those coordinates get a stride-0 view of zeros (no memory). None when no canary is present.

    coords: (m,) flat coordinates; present: (k,) canary ids; shapes: the parameters' shapes, in order.
    """
    if len(present) == 0:
        return None
    where = coords[present]  # (k,)
    grads, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        rows = ((where >= start) & (where < start + size)).nonzero().flatten()
        if len(rows) == 0:
            grads.append(torch.zeros((1, *shape), device=device).expand(len(present), *shape))
        else:
            g = torch.zeros(len(present), size, device=device)
            g[rows.to(device), (where[rows] - start).to(device)] = value
            grads.append(g.view(len(present), *shape))
        start += size
    return grads


@torch.no_grad()
def loss_scores(unet, diffusion, z0, y, generator, draws=SCORE_DRAWS, batch=256):
    """Minus the mean diffusion loss of each canary over `draws` (t, noise) draws: (m,) float64.

    z0: (m, z, h, w) scaled posterior means of the canary images; y: (m,) labels.
    """
    losses = torch.zeros(len(z0), dtype=torch.float64)
    for _ in range(draws):
        t, noise = diffusion.draw(z0.cpu(), generator)
        for i in range(0, len(z0), batch):
            s = slice(i, i + batch)
            loss = diffusion.loss_per_example(unet, z0[s], y[s], t[s].to(z0.device), noise[s].to(z0.device))
            losses[s] += loss.double().cpu()
    return -losses / draws


# ---- The audited fine-tuning ------------------------------------------------------------------


def check_audit_args(m, canary, level, steps):
    """Refuse audit settings that cannot work, before any stage runs."""
    if canary not in CANARY_KINDS:
        raise UserError(f"--canary must be one of {', '.join(CANARY_KINDS)}, got {canary!r}")
    if isinstance(m, bool) or not (isinstance(m, int) and m >= 2):
        raise UserError(f"--m must be a whole number of canaries >= 2, got {m!r}")
    if isinstance(level, bool) or not (isinstance(level, (int, float)) and 0 < level < 1):
        raise UserError(f"--level must lie in (0, 1), e.g. 0.05; got {level!r}")
    if steps is not None and (isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 1)):
        raise UserError(f"--steps must be a whole number >= 1, got {steps!r}")


def check_canary_model(canary, dp_cfg):
    """White-box gradient canaries need coordinates no data can reach; LoRA factors have none (a `down` factor's
    gradient is zero only while its `up` factor is), so --canary white with --dp-lora is refused."""
    if canary == "white" and dp_cfg.dp_lora:
        raise UserError(f"--canary white cannot audit --dp-lora {dp_cfg.dp_lora}: LoRA factors have no coordinates "
                        f"that data never reaches; use --canary example or black, or --dp-lora 0")


def audit_plan(dp_cfg, n, m, steps):
    """(q, T, sigma) of the audited run over N = n examples (private set plus all m canaries).

    With `steps`, the run is shortened to T = steps and sigma is calibrated for that T.
    """
    if steps is not None:
        dp_cfg = replace(dp_cfg, epochs=steps * dp_cfg.expected_batch / n)  # round(epochs / q) == steps
    try:
        return privacy_plan(dp_cfg, n)
    except UserError as e:
        raise UserError(f"{e} (the audit's N = {n - m} private examples + {m} canaries)") from None


def train_with_canaries(task, n_real, included, coords, dp_cfg, q, steps, sigma):
    """T logical DP steps over the private set plus the included canaries, with dp/step.py's `private_gradient`.

    Canary j is slot n_real + j of the sampled set; a slot whose canary is out is discarded. White-box
    (coords given): the canaries' one-hot gradients are clipped to C by the same `clip_and_noise` as the vmap
    path and added to the clipped sum; returns the (m,) float64 white-box scores. Black-box (coords None):
    canary j is example n_real + j of the task's latents, through the default gradient path.
    No EMA, ledger or checkpoints: post-processing and bookkeeping that change nothing the audit scores.
    """
    n, device = n_real + len(included), task.latents[0].device
    mech = Mechanism(q, dp_cfg.clip, sigma, q * n)
    opt, secret = make_optimizer(dp_cfg, task.params), run_secret(dp_cfg.noise_seed)
    scores = torch.zeros(len(included), dtype=torch.float64)
    for step in tqdm(range(steps), desc=f"audit: DP fine-tune with {len(included)} canaries"):
        idx = poisson_sample(secret, step, n, q)  # real examples and canary slots, each with rate q
        real, slots = idx[idx < n_real], idx[idx >= n_real] - n_real
        present = slots[included[slots]]
        if coords is None:
            grads = private_gradient(task, mech, secret, step, torch.cat([real, n_real + present]).to(device))
        else:
            extra = canary_gradients(coords, present, task.shapes, CANARY_GRADIENT * dp_cfg.clip, device)
            extra = None if extra is None else clip_and_noise(extra, dp_cfg.clip, 0.0, 1.0, 0, backend=task.backend)
            grads = private_gradient(task, mech, secret, step, real.to(device), extra=extra)
            released = torch.cat([g.flatten() for g in grads])  # (P,) what the optimiser receives
            scores += released[coords.to(device)].double().cpu() * (q * n / dp_cfg.clip)
        apply_update(opt, list(task.params.values()), grads, lr_at(step, dp_cfg.lr, dp_cfg.warmup))
    return scores if coords is not None else None


def append_canaries(task, ae, images, device):
    """Append the canary images, encoded by the frozen autoencoder, to the task's latents and labels."""
    task.latents = tuple(torch.cat(pair) for pair in zip(task.latents, encode_private(ae, images, device)))
    task.labels = torch.cat([task.labels, images.y.to(device)])


CANARY_TEXT = {
    "example": "white-box example canaries: uniform-noise images with random labels through the default DP step, "
               "one canary per step (dp/canaries.py)",
    "white": "white-box gradient canaries: a gradient of norm {g:g} C on one coordinate, clipped with the real "
             "examples; {u} of the {m} coordinates are untouched by data",
    "black": "black-box: uniform-noise images with random labels in the private set"}
SCORE_TEXT = {
    "example": "the released gradient projected on the canary's own gradient, clipped jointly (score joint) or "
               "tensor by tensor (score tensor), summed over its steps, in units of the noise's sigma C",
    "white": "sum over steps of the noisy gradient at the canary's coordinate, in units of C / (q N)",
    "black": f"minus the diffusion loss, mean over {SCORE_DRAWS} (t, noise) draws"}


def run_audit(cfg, out, device, m=500, canary="example", steps=None, level=0.05):
    """Fine-tune the pretrained model in `out` with m canaries and audit it. Returns the report (a dict).

    The public stages must be finished in `out`; nothing is written there. Seeds: cfg.run.seed draws the
    canaries (inclusion, coordinates or images, score draws); the DP noise and sampling come from the
    OS, or from --noise-seed for reproducible experiments. Example canaries take `steps` steps each
    (default 1); the other kinds share one run of `steps` steps (default: the configuration's).
    """
    dp_cfg, started = cfg.dp, time.time()
    check_audit_args(m, canary, level, steps)
    check_canary_model(canary, dp_cfg)
    check_clip_backend(dp_cfg.clip_backend, device)
    data = load_private(cfg)
    n_real = len(data)
    if canary == "example" and steps is None:
        steps = 1
    q, steps, sigma = audit_plan(dp_cfg, n_real + m, m, steps)  # every input checked before training
    ae, unet = load_pretrained(cfg, out, device)
    task = private_task(cfg, ae, unet, data, device)
    # the secret: which canaries are in the data set, drawn before training, read only by `one_run_bound`
    included = torch.rand(m, generator=audit_generator(cfg.run.seed, "inclusion")) < 0.5
    untouched = 0
    if canary == "white":
        coords, untouched = canary_coordinates(unet, task.diffusion, task.params, cfg, m,
                                               audit_generator(cfg.run.seed, "coordinates"))
        scores = train_with_canaries(task, n_real, included, coords, dp_cfg, q, steps, sigma)
    else:
        append_canaries(task, ae, input_canaries(m, data, audit_generator(cfg.run.seed, "images")), device)
    if canary == "example":
        mech = Mechanism(q, dp_cfg.clip, sigma, q * (n_real + m))
        scores = example_canary_scores(task, n_real, included, mech, run_secret(dp_cfg.noise_seed), steps)
    if canary == "black":
        train_with_canaries(task, n_real, included, None, dp_cfg, q, steps, sigma)
        scores = loss_scores(unet.eval(), task.diffusion, task.latents[0][n_real:], task.labels[n_real:],
                             audit_generator(cfg.run.seed, "score"))
    accounted = compute_epsilon(sigma, q, steps, dp_cfg.delta)
    result = one_run_bound(scores, included, dp_cfg.delta, level)
    where = CANARY_TEXT[canary].format(g=CANARY_GRADIENT, u=untouched, m=m)
    report = audit_report(cfg, accounted, result, level, m, int(included.sum()), canary, where, sigma, q, steps,
                          n_real)
    return dict(report, seconds=round(time.time() - started, 1))


def audit_report(cfg, accounted, result, level, m, n_included, kind, canary, sigma, q, steps, n_real):
    """The audit as a flat dict: the verdict, both epsilons, the guesses and the run's mechanism."""
    dp_cfg = cfg.dp
    bound = result["epsilon_lower_bound"]
    return dict(
        verdict="consistent" if bound <= accounted.epsilon else "inconsistent",
        accounted_epsilon=accounted.epsilon, empirical_epsilon_lower_bound=bound, delta=dp_cfg.delta, level=level,
        m=m, guesses=result["guesses"], correct_guesses=result["correct_guesses"], best_score=result["score"],
        canaries_included=n_included, guess_sets=result["tried"], bonferroni_level=result["bonferroni_level"],
        canary=canary, score=SCORE_TEXT[kind],
        target_epsilon=dp_cfg.epsilon, accountant=accounted.accountant, sigma=sigma, q=q, clip=dp_cfg.clip,
        steps=steps, steps_run=steps * m if kind == "example" else steps,
        accounted_for=("each canary: its own steps (parallel composition)" if kind == "example"
                       else "every example: all the steps"),
        n_private=n_real, n_with_canaries=n_real + m, neighbouring_relation=neighbouring_relation,
        sampling="Poisson, canaries and examples alike with rate q", preset=cfg.preset,
        noise_source=("operating system" if dp_cfg.noise_seed is None
                      else f"fixed seed {dp_cfg.noise_seed} (experiments only)"),
        warning=(f"2 m delta = {2 * m * dp_cfg.delta:.3g}: the delta term of the bound dominates and even a broken run "
                 f"audits near 0; audit at a smaller --delta" if 2 * m * dp_cfg.delta >= 0.1 else None))


# ---- Command line -----------------------------------------------------------------------------


EXIT_STATUS = """exit status:
  0    consistent: the bound is at most the accounted epsilon (--check-sensitivity: no change above C)
  1    inconsistent: the bound exceeds the accounted epsilon (--check-sensitivity: a change above C);
       an uncaught error also exits 1, with a traceback
  2    bad input: a UserError, printed as one line starting with "error:" (argparse usage errors too)"""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dp.audit", description=__doc__, epilog=EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="run folder holding (or receiving) the public stages; "
                                               "default runs/<preset>; the report goes to <out>/audit.json")
    p.add_argument("--steps", type=int, default=None, help="shorten the run to this many DP steps "
                                                           "(sigma is calibrated for them)")
    p.add_argument("--m", type=int, default=500, help="number of canaries (each in with probability 1/2)")
    p.add_argument("--level", type=float, default=0.05, help="significance level of the bound")
    p.add_argument("--canary", default="example", choices=CANARY_KINDS,
                   help="example: white-box canaries that are real examples through the default DP step, one per "
                        "step (default); white: white-box one-coordinate gradient canaries in one shared run; "
                        "black: black-box input canaries scored by their loss")
    p.add_argument("--check-sensitivity", action="store_true",
                   help="instead of the audit: check that adding one example changes the clipped sum by at most C "
                        "(dp/sensitivity.py), on the pretrained model in --out if there is one, else on the "
                        "preset's architecture with random weights and latents; exit 1 above 1 + 1e-5")
    add_config_flags(p, argv)
    return p.parse_args(argv)


def sensitivity(cfg, out, device):
    """The --check-sensitivity report: on <out>'s pretrained model and private set if finished, else random."""
    secret = run_secret(cfg.dp.noise_seed)
    if os.path.exists(stage_path(out, "pretrain")):
        ae, unet = load_pretrained(cfg, out, device)
        task, model = private_task(cfg, ae, unet, load_private(cfg), device), out
    else:
        task, model = random_task(cfg, SENSITIVITY_OTHERS + 1, device), "the preset's architecture, random weights"
    report = check_sensitivity(task, cfg.dp.clip, secret, SENSITIVITY_OTHERS)
    return dict(report, preset=cfg.preset, model=model, clip=cfg.dp.clip)


def run(argv=None):
    """Run the public stages if missing, then the audited fine-tuning; return the report."""
    args = parse_args(argv)
    check_audit_args(args.m, args.canary, args.level, args.steps)
    cfg = config_from_args(args)
    check_pair(cfg.data)
    if not args.check_sensitivity:
        check_canary_model(args.canary, cfg.dp)  # before the public stages run
    out = args.out or os.path.join("runs", cfg.preset)
    if args.check_sensitivity:
        with contextlib.redirect_stdout(sys.stderr):
            return sensitivity(cfg, out, pick_device(cfg.run.device))
    prepare_out(out)
    device = pick_device(cfg.run.device)
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON report only
        autoencoder_stage.train_autoencoder(cfg, out, device, True, log)  # resume=True: a finished stage is reused
        pretrain_stage.train_pretrain(cfg, out, device, True, log)
        report = run_audit(cfg, out, device, m=args.m, canary=args.canary, steps=args.steps, level=args.level)
    atomic_write_json(os.path.join(out, "audit.json"), report)
    log.write(stage="audit", **{k: v for k, v in report.items() if k != "guess_sets"})
    return report


def main(argv=None):
    """Exit status: 0 consistent, 1 inconsistent (the bound exceeds the accounted epsilon), 2 user error."""
    try:
        report = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0 if report["verdict"] == "consistent" else 1


if __name__ == "__main__":
    raise SystemExit(main())
