"""Stage 3: DP fine-tuning of the attention blocks on the PRIVATE set.

Threat model. The adversary knows the code, the resolved configuration (seeds included) and every file a run
writes: checkpoints, logs, the privacy ledger, the report and the sample grids. It also knows every private
example but one. The only secret is the randomness the run draws from the operating system: a 256-bit key
(dp/randomness.py), never stored in a release run. Under add/remove-one neighbours the released model is the
Poisson-subsampled Gaussian mechanism that dp/accountant.py accounts, with sensitivity C, post-processed.
The number N of private examples is treated as public, as Opacus and the original work do: q = expected
batch / N, T and the check delta < 1/N use it. `--private-size N` fixes them from a public bound instead, and
then the real size is neither printed nor stored. Nothing else computed from private data leaves the run: no
batch sizes, losses, label statistics or per-example norms in logs, and no error message shows a data value.

Read top to bottom, one logical step (dp/step.py, `dp_step`) is:
  1. Poisson-sample the private set with rate q from the secret (dp/randomness.py);
  2. write the step to the privacy ledger and fsync it (dp/ledger.py);
  3. for each sampled example, its own posterior sample, timestep and diffusion noise from counters keyed by
     (secret, step, its index): adding or removing one example changes no other example's draws. (Adding or
     removing an example of the data set shifts the indices of later examples; their draws then come from
     other counters of a generator keyed by a secret the adversary does not know, so they stay independent
     of the example either way.)
  4. per-example gradients of the selected parameters over physical micro-batches, each clipped to C jointly
     and summed: by book-keeping, never storing them (dp/bookkeeping.py, the default), or materialised with
     torch.func.vmap (dp/per_sample.py) and clipped by kernels/clip_noise.py; a non-finite example adds zero;
  5. add N(0, (sigma C)^2) once, divide by q N (kernels/clip_noise.py), one optimiser step, warm-up, EMA.
sigma is calibrated before training from (epsilon, delta, q, T) by dp/accountant.py. The autoencoder is frozen
and only encodes; UNet parameters outside the selected blocks never change (checked at the end).
With --dp-lora RANK the selected parameters are instead LoRA factors on the blocks' attention projections
(dp/lora.py); the blocks' own weights stay frozen too, and the EMA UNet, what the checkpoint releases and sample.py
reads, holds the adapters merged into the plain architecture.
"""

import dataclasses
import os

import torch
from tqdm import tqdm

from dp.accountant import calibrate_sigma, neighbouring_relation, validate_privacy_params
from dp.bookkeeping import Unsupported, check_supported
from dp.ledger import PrivacyLedger
from dp.lora import merged_copy, merged_names, merged_state
from dp.poisson import num_steps, sampling_rate
from dp.randomness import run_secret
from dp.report import privacy_report, write_report
from dp.select import select_trainable, selection_size
from dp.step import Mechanism, Task, dp_step, make_optimizer
from kernels.clip_noise import check_triton_usable
from ldm.build import build_diffusion
from ldm.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_private, num_classes
from ldm.diffusion import ema_update
from ldm.distributed import Dist, barrier
from ldm.errors import UserError
from ldm.latents import encode_latents
from ldm.run_folder import (check_compatible, load_stage, refuse_overwrite, stage_path, trained_autoencoder,
                            trained_unet)
from ldm.sampling import write_samples
from ldm.schedule import lr_at


# no rate and no elapsed time: a step's duration grows with its Poisson-sampled batch size
PRIVATE_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}"


def public_size(dp_cfg, data):
    """(N used for q, T and delta, where it comes from): --private-size, or the private set's size (public)."""
    if dp_cfg.private_size is not None:
        return dp_cfg.private_size, "--private-size (a public bound; the real size is not used)"
    held = f", {dp_cfg.tune_holdout} training images held out for tuning" if dp_cfg.tune_holdout else ""
    return len(data), f"the private set's size{held}, treated as public (as Opacus and the original work do)"


def privacy_plan(dp_cfg, n):
    """(q, T, sigma) for N = n (public) examples, every input validated before any example is used."""
    validate_privacy_params(epsilon=dp_cfg.epsilon, delta=dp_cfg.delta, n=n)
    if not dp_cfg.clip > 0:
        raise UserError(f"--clip must be positive, got {dp_cfg.clip}")
    q = sampling_rate(dp_cfg.expected_batch, n)
    steps = num_steps(dp_cfg.epochs, q)
    sigma = calibrate_sigma(dp_cfg.epsilon, q, steps, dp_cfg.delta)
    return q, steps, sigma


def check_labels(data, classes, name):
    """Every private label lies in [0, K) for the registry's K classes; the message shows no data value."""
    if len(data) and not bool(((data.y >= 0) & (data.y < classes)).all()):
        raise UserError(f"the private set {name!r} has labels outside 0..{classes - 1}, the {classes} classes the "
                        f"data registry gives it; fix the data set (no label value is shown: they are private)")


def check_clip_backend(backend, device):
    """--clip-backend triton where the kernel cannot run is a user error, found before any work."""
    if backend == "triton":
        try:
            check_triton_usable(device)
        except ValueError as e:
            raise UserError(f"--clip-backend triton: {e}") from None


def load_pretrained(cfg, out, device):
    """Frozen autoencoder and the pretrained EMA UNet from <out>/pretrain.pt (public stages only)."""
    state, path = load_stage(out, "pretrain", cfg, finished=True)
    return trained_autoencoder(state, cfg, path, device), trained_unet(state, cfg, path, device)


def resolve_grad_method(method, unet, params):
    """--grad-method auto: book-keeping when every selected parameter's module supports it, else vmap."""
    if method == "vmap":
        return method
    try:
        check_supported(unet, params)
    except Unsupported as e:
        if method == "bookkeeping":
            raise UserError(f"--grad-method bookkeeping: {e}") from None
        return "vmap"
    return "bookkeeping"


def encode_private(ae, data, device):
    """Scaled latents (mean, std) of the private set under the frozen encoder (ldm/latents.py)."""
    return encode_latents(ae, data, device, "encoding private set")


def private_task(cfg, ae, unet, data, device):
    """The fine-tuning Task (dp/step.py): selected parameters (of `unet`, adapted in place with --dp-lora),
    encoded private latents, labels, grad method."""
    dp_cfg = cfg.dp
    params = select_trainable(unet, cfg)
    return Task(unet, build_diffusion(cfg), params, encode_private(ae, data, device), data.y.to(device),
                resolve_grad_method(dp_cfg.grad_method, unet, params), dp_cfg.physical_batch, dp_cfg.clip_backend)


@dataclasses.dataclass
class FinetuneRun:
    """Everything the loop of `train_finetune` needs, built by `start_finetune`."""

    cfg: object
    out: str
    path: str
    ae: torch.nn.Module
    task: Task
    mech: Mechanism
    steps: int
    n: int
    n_source: str
    secret: object
    opt: torch.optim.Optimizer
    ema: torch.nn.Module
    ledger: PrivacyLedger
    pretrained: dict


def start_finetune(cfg, out, device, resume, dist):
    """Load the public model and the private set, plan the mechanism, open the ledger, resume if asked."""
    dp_cfg = cfg.dp
    path = stage_path(out, "finetune")
    refuse_overwrite(path, resume)
    check_clip_backend(dp_cfg.clip_backend, device)
    ae, unet = load_pretrained(cfg, out, device)
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}
    data = load_private(cfg)
    check_labels(data, num_classes(cfg.data), cfg.data.private)
    n, n_source = public_size(dp_cfg, data)
    q, steps, sigma = privacy_plan(dp_cfg, n)
    task = private_task(cfg, ae, unet, data, device)
    ledger = PrivacyLedger(os.path.join(out, "privacy_ledger.jsonl"), sigma, q, dp_cfg.clip, writer=dist.main)
    ledger.check_mechanism()
    run = FinetuneRun(cfg, out, path, ae, task, Mechanism(q, dp_cfg.clip, sigma, q * n), steps, n, n_source,
                      run_secret(dp_cfg.noise_seed), make_optimizer(dp_cfg, task.params),
                      merged_copy(unet), ledger, pretrained)
    if resume and os.path.exists(path):
        restore(run)
    elif ledger.steps:
        raise UserError(f"{ledger.path} already records {ledger.steps} steps; pass --resume or choose another --out")
    return run


def stored_privacy(run):
    """What a finetune checkpoint records of the mechanism, compared on resume (`restore`)."""
    m = run.mech
    return dict(sigma=m.sigma, q=m.q, clip=m.clip, divisor=m.divisor, steps_planned=run.steps,
                delta=run.cfg.dp.delta, epsilon_target=run.cfg.dp.epsilon, private_set=run.cfg.data.private,
                n=run.n, n_source=run.n_source)


def restore(run):
    """Continue from <out>/finetune.pt. Refused unless it is a finetune checkpoint of this very mechanism and
    private set, and the ledger on disk holds every step it records (the ledger may hold more: steps after
    the last checkpoint count although their updates were lost)."""
    state, stored = load_checkpoint(run.path)
    if state.get("stage") != "finetune":
        raise UserError(f"{run.path} holds stage {state.get('stage')!r}, not a DP fine-tuning checkpoint; "
                        f"it cannot be resumed as one")
    check_compatible(stored, run.cfg, "finetune", run.path)
    current, recorded = stored_privacy(run), state["privacy"]
    diffs = [f"{k} {recorded.get(k)!r} (stored) vs {v!r} (now)" for k, v in current.items() if recorded.get(k) != v]
    if diffs:
        raise UserError(f"{run.path} was trained with another mechanism or private set: {'; '.join(diffs)}; "
                        f"resume with the same settings and data or choose another --out")
    copy_in_ckpt, on_disk = state["privacy"]["ledger"], run.ledger.entries
    if not os.path.exists(run.ledger.path):
        raise UserError(f"{run.ledger.path} is missing but {run.path} records {len(copy_in_ckpt)} spent steps; "
                        f"resuming would under-count the privacy spent. Restore the ledger or start a new run")
    if len(on_disk) < len(copy_in_ckpt) or on_disk[:len(copy_in_ckpt)] != copy_in_ckpt:
        raise UserError(f"{run.ledger.path} ({len(on_disk)} steps) disagrees with the copy in {run.path} "
                        f"({len(copy_in_ckpt)} steps); the ledger cannot be trusted. Restore it or start a new run")
    load_state_strict(run.task.unet, state["unet"], "UNet", run.path)
    load_state_strict(run.ema, state["ema"], "EMA UNet", run.path)
    run.opt.load_state_dict(state["optimizer"])


def save(run, done, dist):
    """The finetune checkpoint: model, EMA, optimiser, ledger copy and privacy report. No secret, ever."""
    if dist.main:
        report = privacy_report(run)
        save_checkpoint(run.path, dict(
            config=config_to_dict(run.cfg), stage="finetune", step=run.ledger.steps, done=done,
            differentially_private=True, privacy_report=report, unet=run.task.unet.state_dict(),
            ema=run.ema.state_dict(), optimizer=run.opt.state_dict(), autoencoder=run.ae.state_dict(),
            privacy=dict(stored_privacy(run), epsilon=report["epsilon"], ledger=list(run.ledger.entries))))
    barrier(dist)


def announce(run, dist):
    """One line with the plan; N is shown only when it is the data set's own size (treated as public)."""
    if not dist.main:
        return
    dp_cfg, task = run.cfg.dp, run.task
    n_train, share = selection_size(task.unet, task.params)
    print(f"finetune: N={run.n} ({run.n_source}), q={run.mech.q:.6g}, T={run.steps} logical steps, C={dp_cfg.clip:g}, "
          f"sigma={run.mech.sigma:.4f} for ({dp_cfg.epsilon:g}, {dp_cfg.delta:g})-DP under {neighbouring_relation}; "
          f"trainable {n_train:,} parameters ({100 * share:.1f}% of the UNet) in blocks '{dp_cfg.dp_blocks}'"
          f"{lora_text(dp_cfg)}, clipping by {task.method}, {dist.world} process(es)")


def lora_text(dp_cfg):
    """How the blocks are trained, for the plan lines: '' (their own weights) or the LoRA rank."""
    return f" as rank-{dp_cfg.dp_lora} LoRA adapters of their attention projections" if dp_cfg.dp_lora else ""


def train_finetune(cfg, out, device, resume, log, stop_at=None, dist=Dist()):
    """Stage 3. Returns the privacy report (a dict) when the run finishes."""
    run = start_finetune(cfg, out, device, resume, dist)
    announce(run, dist)
    log.write(stage="finetune", event="plan", n_public=run.n, n_source=run.n_source, q=run.mech.q,
              steps=run.steps, sigma=run.mech.sigma, clip=run.mech.clip)
    dp_cfg, task = cfg.dp, run.task
    bar = tqdm(range(run.ledger.steps, run.steps), desc="finetune (DP)", initial=run.ledger.steps, total=run.steps,
               disable=not dist.main, bar_format=PRIVATE_BAR)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return None
        dp_step(task, run.mech, run.secret, step, run.opt, lr_at(step, dp_cfg.lr, dp_cfg.warmup), run.ledger, dist)
        ema_update(run.ema, merged_state(task.unet), dp_cfg.dp_ema)
        done_steps = step + 1
        if dist.main and (done_steps % cfg.run.log_every == 0 or done_steps == run.steps):
            eps = run.ledger.epsilon(dp_cfg.delta)  # from (sigma, q, steps) only: no private value
            bar.set_postfix(eps=f"{eps.epsilon:.3f}")
            log.write(stage="finetune", step=done_steps, epsilon=eps.epsilon, accountant=eps.accountant,
                      lr=run.opt.param_groups[0]["lr"])
        if done_steps % cfg.run.ckpt_every == 0:
            save(run, False, dist)
    return finish(run, log, dist)


def finish(run, log, dist):
    """Final checkpoint, the frozen-parameter check, the privacy report and the sample grid."""
    save(run, True, dist)
    check_frozen(run.task.unet, run.ema, run.pretrained, run.task.params)
    if not dist.main:
        return None
    report = privacy_report(run)
    write_report(run.out, report, log)
    provenance = dict(stage="finetune", differentially_private=True, epsilon=report["epsilon"],
                      delta=report["delta"], neighbouring_relation=report["neighbouring_relation"])
    grid = write_samples(run.cfg, run.ae, run.ema.eval(), os.path.join(run.out, "samples_finetune.png"),
                         num_classes(run.cfg.data), provenance)
    print(f"finetune: done, samples in {grid}")
    return report


def check_frozen(unet, ema, pretrained, params):
    """Every parameter outside the selected set is bit-identical to the pretrained one, in the model (with
    --dp-lora: the adapted projections' own weights included) and in the EMA (which holds the merged weights: with
    --dp-lora there the adapted projections' weights W + B A may differ too)."""
    for model, trained in ((unet, set(params)), (ema, merged_names(unet, params))):
        for name, value in model.state_dict().items():
            if name not in trained and not torch.equal(value, pretrained[name]):
                raise RuntimeError(f"frozen parameter {name} changed during DP fine-tuning")
