"""The NON-PRIVATE baseline of stage 3: fine-tune the same parameters on the private set with no clipping
and no noise. Its model is NOT differentially private and must never be released; it exists so that a
result table can show what DP costs (`train.py --stage finetune-nonprivate`).

Everything except the gradient is the DP stage's: the same pretrained model, selected parameters
(--dp-blocks), Poisson-sampled batches of expected size --expected-batch, number of logical steps,
optimiser, learning rate, warm-up and EMA. The gradient is the plain mean of the sampled examples' loss
gradients, accumulated over micro-batches of --physical-batch. The checkpoint is written to its own
file, carries `differentially_private: False` and no privacy ledger or report, so that it cannot be
taken for the output of the DP stage.
"""

import copy
import os

import torch
from tqdm import tqdm

from dp.finetune import check_frozen, encode_private, load_pretrained
from dp.poisson import num_steps, poisson_sample, sampling_rate
from dp.select import select_parameters, trainable_share
from ldm.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_dataset
from ldm.diffusion import ema_update
from ldm.errors import UserError
from ldm.runtime import build_diffusion, check_compatible, lr_at, stage_path

STAGE = "finetune-nonprivate"
WARNING = "NOT differentially private: a baseline for comparison only, never release this model or its samples"


def mean_gradient(unet, diffusion, params, z0, labels, t, noise, physical_batch):
    """Mean over the examples of the diffusion-loss gradient w.r.t. `params` (zeros for an empty batch)."""
    for p in params.values():
        p.grad = None
    for chunk in torch.arange(len(z0)).split(physical_batch) if len(z0) else ():
        loss = diffusion.loss_per_example(unet, z0[chunk], labels[chunk], t[chunk], noise[chunk]).sum()
        (loss / len(z0)).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]


def train_finetune_nonprivate(cfg, out, device, resume, log, write_samples, dist, stop_at=None):
    """Non-private fine-tuning of the DP stage's parameters. Returns the checkpoint's path (None if stopped)."""
    if dist.world > 1:
        raise UserError(f"--stage {STAGE} runs in one process; start it without torchrun")
    d = cfg.dp
    path = stage_path(out, STAGE)
    if os.path.exists(path) and not resume:
        raise UserError(f"{path} already exists; pass --resume to continue this run or choose another --out")
    ae, unet = load_pretrained(cfg, out, device)
    for p in unet.parameters():
        p.requires_grad_(False)
    params = select_parameters(unet, d.dp_blocks, d.dp_class_embed)
    for p in params.values():
        p.requires_grad_(True)
    n_train, share = trainable_share(unet, params)
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}

    data = load_dataset(cfg.data.private, cfg.data, "private")
    if len(data) == 0:
        raise UserError(f"the private set {cfg.data.private!r} is empty")
    q = sampling_rate(d.expected_batch, len(data))
    steps = num_steps(d.epochs, q)
    print(f"{STAGE}: {WARNING}. N={len(data)}, q={q:.6g}, T={steps} logical steps, trainable {n_train:,} "
          f"parameters ({100 * share:.1f}% of the UNet) in blocks '{d.dp_blocks}'")
    log.write(stage=STAGE, event="plan", differentially_private=False, n_private=len(data), q=q, steps=steps,
              trainable=n_train, trainable_share=share)

    mean, std = encode_private(ae, data, device)
    labels = data.y.to(device)
    diffusion = build_diffusion(cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt_cls = torch.optim.AdamW if d.optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(params.values(), lr=d.lr, weight_decay=d.weight_decay)
    sample_gen = torch.Generator().manual_seed(cfg.run.seed + 5)  # nothing to hide: seeded by the run
    loss_gen = torch.Generator().manual_seed(cfg.run.seed + 3)
    start = 0
    if resume and os.path.exists(path):
        state, stored = load_checkpoint(path)
        check_compatible(stored, cfg, "finetune", path)
        if state.get("stage") != STAGE:
            raise UserError(f"{path} holds stage {state.get('stage')!r}, expected {STAGE!r}")
        load_state_strict(unet, state["unet"], "UNet", path)
        load_state_strict(ema, state["ema"], "EMA UNet", path)
        opt.load_state_dict(state["optimizer"])
        sample_gen.set_state(state["sample_generator"])
        loss_gen.set_state(state["loss_generator"])
        start = state["step"]

    def save(step, done):
        save_checkpoint(path, dict(
            config=config_to_dict(cfg), stage=STAGE, step=step, done=done, differentially_private=False,
            warning=WARNING, unet=unet.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
            autoencoder=ae.state_dict(), sample_generator=sample_gen.get_state(), loss_generator=loss_gen.get_state()))

    for step in tqdm(range(start, steps), desc=f"{STAGE} (NOT DP)", initial=start, total=steps):
        if stop_at is not None and step >= stop_at:
            return None
        idx = poisson_sample(len(data), q, sample_gen).to(device)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=loss_gen).to(device)
        t, eps = diffusion.draw(z0, loss_gen)
        grads = mean_gradient(unet, diffusion, params, z0, labels[idx], t, eps, d.physical_batch)
        for p, g in zip(params.values(), grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = lr_at(step, d.lr, d.warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, unet, d.dp_ema)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == steps:
            log.write(stage=STAGE, step=step + 1, lr=opt.param_groups[0]["lr"], batch=len(idx))
        if (step + 1) % cfg.run.ckpt_every == 0:
            save(step + 1, done=False)
    save(steps, done=True)
    check_frozen(unet, ema, pretrained, params)
    grid = write_samples(cfg, ae, ema.eval(), os.path.join(out, "samples_finetune_nonprivate.png"), data.num_classes)
    print(f"{STAGE}: done ({WARNING}); checkpoint {path}, samples in {grid}")
    return path
