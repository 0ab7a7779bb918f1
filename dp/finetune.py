"""Stage 3: DP fine-tuning of the attention blocks on the PRIVATE set. The only code that reads private data.

Read top to bottom, one logical step is:
  1. Poisson-sample the private set with rate q (dp/poisson.py), from a secret generator;
  2. write the step to the privacy ledger and fsync it (dp/ledger.py);
  3. per-sample gradients of the selected parameters over physical micro-batches, each clipped to C
     jointly and summed: by book-keeping, never storing them (dp/bookkeeping.py, the default), or
     materialised with torch.func.vmap (dp/per_sample.py) and clipped by kernels/clip_noise.py;
  4. add N(0, (sigma C)^2) once, divide by q N (dp/step.py -> kernels/clip_noise.py);
  5. one optimiser step, one warm-up step, one EMA update.
sigma is calibrated before training from (epsilon, delta, q, T) by dp/accountant.py. The autoencoder is
frozen and only encodes; UNet parameters outside the selected blocks never change.
"""

import copy
import json
import os
import secrets
import warnings

import torch
from tqdm import tqdm

from dp.accountant import calibrate_sigma, neighbouring_relation, validate_privacy_params
from dp.bookkeeping import Unsupported, check_supported, clipped_sum
from dp.ledger import PrivacyLedger
from dp.per_sample import per_sample_grads
from dp.poisson import num_steps, poisson_sample, sampling_rate
from dp.select import select_parameters, trainable_share
from dp.step import ClippedSum, apply_update, draw_seed, noisy_clipped_gradient
from kernels.clip_noise import check_triton_usable
from ldm.checkpoint import atomic_write_json, load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_dataset
from ldm.diffusion import ema_update
from ldm.distributed import Dist, all_reduce_sum_, barrier, broadcast_, shard
from ldm.errors import UserError
from ldm.runtime import (build_autoencoder, build_diffusion, build_unet, check_compatible, encode_latents, lr_at,
                         stage_path)

NOT_COVERED = ("the public data sets used for the autoencoder and pretraining (assumed public)",
               "hyperparameter search or repeated runs on the private data (each run spends its own budget)",
               "floating-point artefacts of the Gaussian sampler (Jin et al. 2022)")


def secret_generators(noise_seed):
    """(sampling generator, noise generator): seeded from the OS, or from --noise-seed for experiments."""
    if noise_seed is None:
        return (torch.Generator().manual_seed(secrets.randbits(63)),
                torch.Generator().manual_seed(secrets.randbits(63)))
    warnings.warn(f"--noise-seed {noise_seed}: Poisson sampling and noise are reproducible from this seed; "
                  f"the run is for experiments, not for release", stacklevel=2)
    return torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(noise_seed + 7919)


def privacy_plan(dp_cfg, n):
    """(q, T, sigma) for N private examples, every input validated before any example is used."""
    validate_privacy_params(epsilon=dp_cfg.epsilon, delta=dp_cfg.delta, n=n)
    if not dp_cfg.clip > 0:
        raise UserError(f"--clip must be positive, got {dp_cfg.clip}")
    q = sampling_rate(dp_cfg.expected_batch, n)
    steps = num_steps(dp_cfg.epochs, q)
    sigma = calibrate_sigma(dp_cfg.epsilon, q, steps, dp_cfg.delta)
    return q, steps, sigma


def check_clip_backend(backend, device):
    """--clip-backend triton where the kernel cannot run is a user error, found before any work."""
    if backend == "triton":
        try:
            check_triton_usable(device)
        except ValueError as e:
            raise UserError(f"--clip-backend triton: {e}") from None


def load_pretrained(cfg, out, device):
    """Frozen autoencoder and the pretrained EMA UNet from <out>/pretrain.pt (public stages only)."""
    path = stage_path(out, "pretrain")
    state, stored = load_checkpoint(path)
    check_compatible(stored, cfg, "pretrain", path)
    if state.get("stage") != "pretrain" or not state["done"]:
        raise UserError(f"{path} is not a finished pretraining checkpoint; run --stage pretrain first")
    ae = build_autoencoder(cfg)
    load_state_strict(ae, state["autoencoder"], "autoencoder", path)
    unet = build_unet(cfg)
    load_state_strict(unet, state["ema"], "UNet", path)
    return ae.to(device).eval().requires_grad_(False), unet.to(device)


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
    """Scaled latents (mean, std) of the private set under the frozen encoder (ldm/runtime.py)."""
    return encode_latents(ae, data, device, "encoding private set")


def private_gradient(unet, diffusion, params, latents, labels, idx, loss_gen, dp_cfg, sigma, divisor, seed,
                     extra_grads=None, dist=Dist()):
    """The noisy clipped gradient of one logical step for the sampled examples `idx` (any size, even 0).

    latents: (mean, std) scaled posterior tensors of the whole private set; labels: (N,).
    extra_grads: optional list of (k, *shape) per-sample gradients clipped and summed with the examples'
    (the audit's canaries); None in training. Returns a list of tensors shaped like `params`.
    With several processes, each computes its shard of `idx`; the sums are all-reduced and the noise
    is added by rank 0 only (see dp/step.py), so every rank returns the same gradient.
    """
    mean, std = latents
    names = list(params)
    # every example's randomness is drawn for the whole logical batch first, on every rank alike, so that
    # neither the micro-batches nor the processes change which posterior sample, timestep and noise it gets
    z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=loss_gen).to(mean.device)
    t, eps = diffusion.draw(z0, loss_gen)  # one timestep and one noise draw per example
    mine = torch.arange(len(idx))[shard(len(idx), dist)]

    method = resolve_grad_method(dp_cfg.grad_method, unet, params)

    def micro_batches():
        for chunk in mine.split(dp_cfg.physical_batch) if len(mine) else ():
            args = (z0[chunk], labels[idx[chunk]], t[chunk], eps[chunk])
            if method == "bookkeeping":
                yield ClippedSum(clipped_sum(unet, diffusion, params, *args, dp_cfg.clip)[0])
            else:
                grads = per_sample_grads(unet, diffusion, params, *args)
                yield [grads.pop(n) for n in names]  # the consumer holds the only reference
        if extra_grads is not None and dist.main:
            yield extra_grads

    shapes = [params[n].shape for n in names]
    return noisy_clipped_gradient(micro_batches(), shapes, dp_cfg.clip, sigma, divisor, seed,
                                  backend=dp_cfg.clip_backend, device=mean.device, add_noise=dist.main,
                                  reduce=lambda ts: all_reduce_sum_(ts, dist))


def shared_poisson_sample(n, q, generator, dist, device):
    """Rank 0 draws the Poisson sample from its secret generator; every rank receives the same indices."""
    mask = torch.zeros(n, dtype=torch.uint8, device=device)
    if dist.main:
        mask[poisson_sample(n, q, generator).to(device)] = 1
    broadcast_(mask, dist)
    return torch.nonzero(mask).flatten()


def train_finetune(cfg, out, device, resume, log, write_samples, stop_at=None, dist=Dist()):
    """Stage 3. Returns the privacy report (a dict) when the run finishes."""
    d = cfg.dp
    path = stage_path(out, "finetune")
    if os.path.exists(path) and not resume:
        raise UserError(f"{path} already exists; pass --resume to continue this run or choose another --out")
    check_clip_backend(d.clip_backend, device)
    ae, unet = load_pretrained(cfg, out, device)
    params = select_parameters(unet, d.dp_blocks, d.dp_class_embed)
    n_train, share = trainable_share(unet, params)
    method = resolve_grad_method(d.grad_method, unet, params)
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}

    data = load_dataset(cfg.data.private, cfg.data, "private")
    if int(data.y.max()) >= unet.class_embed.num_embeddings:
        raise UserError(f"private labels reach {int(data.y.max())} but the class table has "
                        f"{unet.class_embed.num_embeddings} rows")
    q, steps, sigma = privacy_plan(d, len(data))
    if dist.main:
        print(f"finetune: N={len(data)} private examples, q={q:.6g}, T={steps} logical steps, C={d.clip:g}, "
              f"sigma={sigma:.4f} for ({d.epsilon:g}, {d.delta:g})-DP; trainable {n_train:,} parameters "
              f"({100 * share:.1f}% of the UNet) in blocks '{d.dp_blocks}', clipping by {method}, "
              f"{dist.world} process(es)")
    log.write(stage="finetune", event="plan", n_private=len(data), q=q, steps=steps, sigma=sigma,
              clip=d.clip, trainable=n_train, trainable_share=share)

    latents = encode_private(ae, data, device)
    labels = data.y.to(device)
    diffusion = build_diffusion(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt_cls = torch.optim.AdamW if d.optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(params.values(), lr=d.lr, weight_decay=d.weight_decay)
    sample_gen, noise_gen = secret_generators(d.noise_seed)
    loss_gen = torch.Generator().manual_seed(cfg.run.seed + 3)
    # every rank reads the ledger (a shared file system on several machines); only rank 0 writes it
    ledger = PrivacyLedger(os.path.join(out, "privacy_ledger.jsonl"), sigma, q, d.clip, writer=dist.main)
    ledger.check_mechanism()
    if resume and os.path.exists(path):
        restore(path, cfg, unet, ema, opt, loss_gen, sample_gen, noise_gen)
    elif ledger.steps:
        raise UserError(f"{ledger.path} already records {ledger.steps} steps; pass --resume or choose another --out")

    def save(done):
        if not dist.main:
            return barrier(dist)
        eps = ledger.epsilon(d.delta)
        save_checkpoint(path, dict(
            config=config_to_dict(cfg), stage="finetune", step=ledger.steps, done=done,
            unet=unet.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), autoencoder=ae.state_dict(),
            loss_generator=loss_gen.get_state(),
            # the secret generators are stored only in experiment mode: a released checkpoint must not let
            # anyone regenerate the noise or the Poisson samples
            secret_generators=[sample_gen.get_state(), noise_gen.get_state()] if d.noise_seed is not None else [],
            privacy=dict(sigma=sigma, q=q, steps_planned=steps, clip=d.clip, delta=d.delta,
                         epsilon=eps.epsilon if eps else 0.0, accountant=eps.accountant if eps else None,
                         ledger=ledger.entries)))
        barrier(dist)

    bar = tqdm(range(ledger.steps, steps), desc="finetune (DP)", initial=ledger.steps, total=steps,
               disable=not dist.main)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return None
        idx = shared_poisson_sample(len(data), q, sample_gen, dist, device)
        if dist.main:
            ledger.record(step)  # durable before the update below is applied
        seed = draw_seed(noise_gen) if dist.main else 0  # only rank 0 adds noise
        grads = private_gradient(unet, diffusion, params, latents, labels, idx, loss_gen, d, sigma,
                                 divisor=q * len(data), seed=seed, dist=dist)
        apply_update(opt, list(params.values()), grads, lr_at(step, d.lr, d.warmup))
        ema_update(ema, unet, d.dp_ema)
        done_steps = step + 1
        if dist.main and (done_steps % cfg.run.log_every == 0 or done_steps == steps):
            eps = ledger.epsilon(d.delta)
            bar.set_postfix(eps=f"{eps.epsilon:.3f}", batch=len(idx))
            log.write(stage="finetune", step=done_steps, epsilon=eps.epsilon, accountant=eps.accountant,
                      lr=opt.param_groups[0]["lr"])
        if done_steps % cfg.run.ckpt_every == 0:
            save(done=False)
    save(done=True)
    check_frozen(unet, ema, pretrained, params)
    if not dist.main:
        return None
    report = privacy_report(cfg, ledger, sigma, q, steps, len(data), n_train, share, method)
    write_report(out, report, log)
    grid = write_samples(cfg, ae, ema.eval(), os.path.join(out, "samples_finetune.png"), data.num_classes)
    print(f"finetune: done, samples in {grid}")
    return report


def restore(path, cfg, unet, ema, opt, loss_gen, sample_gen, noise_gen):
    """Continue from <out>/finetune.pt; the ledger on disk (not the checkpoint) says how many steps were spent."""
    state, stored = load_checkpoint(path)
    check_compatible(stored, cfg, "finetune", path)
    load_state_strict(unet, state["unet"], "UNet", path)
    load_state_strict(ema, state["ema"], "EMA UNet", path)
    opt.load_state_dict(state["optimizer"])
    loss_gen.set_state(state["loss_generator"])
    if state["secret_generators"]:
        sample_gen.set_state(state["secret_generators"][0])
        noise_gen.set_state(state["secret_generators"][1])


def check_frozen(unet, ema, pretrained, params):
    """Every parameter outside the selected set is bit-identical to the pretrained one (model and EMA)."""
    for model in (unet, ema):
        for name, value in model.state_dict().items():
            if name not in params and not torch.equal(value, pretrained[name]):
                raise RuntimeError(f"frozen parameter {name} changed during DP fine-tuning")


def privacy_report(cfg, ledger, sigma, q, planned, n, n_train, share, method):
    d = cfg.dp
    eps = ledger.epsilon(d.delta)
    return dict(
        epsilon=eps.epsilon, delta=d.delta, sigma=sigma, q=q, steps=ledger.steps, steps_planned=planned,
        clip=d.clip, expected_batch=d.expected_batch, n_private=n, private_set=cfg.data.private,
        accountant=("prv-accountant, upper estimate" if eps.accountant == "prv" else "RDP (PRV failed)"),
        epsilon_rdp_crosscheck=eps.epsilon_rdp, accountant_warning=eps.warning,
        neighbouring_relation=neighbouring_relation, sampling="Poisson, each example independently with rate q",
        trainable_parameters=n_train, trainable_share=share, dp_blocks=d.dp_blocks, per_sample_clipping=method,
        noise_source="operating system" if d.noise_seed is None else f"fixed seed {d.noise_seed} (experiments only)",
        not_covered=list(NOT_COVERED))


def write_report(out, report, log):
    """privacy_report.json plus the same in words, printed and stored in the metrics log."""
    atomic_write_json(os.path.join(out, "privacy_report.json"), report)
    text = (f"Privacy: the fine-tuned model is ({report['epsilon']:.3f}, {report['delta']:g})-DP with respect to "
            f"the {report['n_private']} examples of the private set '{report['private_set']}' under "
            f"{report['neighbouring_relation']}, by {report['accountant']} (RDP cross-check "
            f"{report['epsilon_rdp_crosscheck']:.3f}) of {report['steps']} steps of the Poisson-subsampled "
            f"Gaussian mechanism with q={report['q']:.6g}, sigma={report['sigma']:.4f}, clipping C={report['clip']:g}, "
            f"training {report['trainable_parameters']:,} parameters ({100 * report['trainable_share']:.1f}% of the "
            f"UNet). Noise from the {report['noise_source']}. Not covered: {'; '.join(report['not_covered'])}.")
    print(text)
    log.write(stage="finetune", event="privacy_report", text=text, report=json.loads(json.dumps(report)))
