"""Stage 2: the class-conditional latent diffusion UNet on the PUBLIC set; never reads the private set.

    <out>/pretrain.pt (UNet, its EMA, optimiser, generator state, a copy of the frozen autoencoder)
    <out>/samples.png (a class-ordered grid of DDIM samples from the EMA UNet)

The frozen autoencoder of stage 1 encodes the public set once; every step takes one posterior sample per
example. Every random draw comes from one generator seeded by --seed + 1, stored in the checkpoint. With several
processes the global batch and its draws are identical on every rank and each rank works on its shard.
"""

import copy
import dataclasses
import os

import torch
from tqdm import tqdm

from ldm.build import build_diffusion, build_unet
from ldm.checkpoint import load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_dataset
from ldm.diffusion import ema_update
from ldm.distributed import Dist, all_reduce_sum_, barrier, shard
from ldm.latents import encode_latents
from ldm.pace import Pace
from ldm.run_folder import load_stage, resume_state, stage_path, trained_autoencoder
from ldm.sampling import write_samples
from ldm.schedule import lr_at

STAGE = "pretrain"


@dataclasses.dataclass
class PretrainRun:
    """What the loop of `train_pretrain` needs, built by `start_pretrain`."""

    cfg: object
    out: str
    ae: torch.nn.Module
    latents: tuple  # (mean, std) of the public set, each (N, z, h, w)
    labels: torch.Tensor
    classes: int
    unet: torch.nn.Module
    ema: torch.nn.Module
    diffusion: object
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int
    dist: Dist


def start_pretrain(cfg, out, device, resume, dist):
    """A fresh or resumed run on the finished autoencoder; None when the checkpoint is already finished."""
    ckpt = resume_state(out, STAGE, cfg, resume)
    if ckpt and ckpt["done"]:
        print(f"pretrain: already finished in {stage_path(out, STAGE)}")
        return None
    state, path = load_stage(out, "autoencoder", cfg, finished=True)
    ae = trained_autoencoder(state, cfg, path, device)
    data = load_dataset(cfg.data.public, cfg.data, "public")
    latents = encode_latents(ae, data, device, "encoding public set")
    torch.manual_seed(cfg.run.seed)  # initialisation
    unet = build_unet(cfg).to(device)
    run = PretrainRun(cfg, out, ae, latents, data.y.to(device), data.num_classes, unet,
                      copy.deepcopy(unet).requires_grad_(False), build_diffusion(cfg),
                      torch.optim.AdamW(unet.parameters(), lr=cfg.pretrain.pretrain_lr, weight_decay=0.0),
                      torch.Generator().manual_seed(cfg.run.seed + 1), 0, dist)
    if ckpt:
        path = stage_path(out, STAGE)
        load_state_strict(unet, ckpt["unet"], "UNet", path)
        load_state_strict(run.ema, ckpt["ema"], "EMA UNet", path)
        run.opt.load_state_dict(ckpt["optimizer"])
        run.gen.set_state(ckpt["generator"])
        run.step = ckpt["step"]
    return run


def pretrain_step(run):
    """One optimiser step and EMA update on a batch of public latents; returns the batch's mean loss."""
    pre_cfg, (mean, std) = run.cfg.pretrain, run.latents
    idx = torch.randint(0, len(run.labels), (pre_cfg.pretrain_batch,), generator=run.gen)
    noise = torch.randn(mean[idx].shape, generator=run.gen).to(mean.device)
    z0 = mean[idx] + std[idx] * noise  # scaled latents: one posterior sample per example
    t, eps = run.diffusion.draw(z0, run.gen)
    s = shard(pre_cfg.pretrain_batch, run.dist)
    loss = run.diffusion.loss_per_example(run.unet, z0[s], run.labels[idx[s]], t[s], eps[s])
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, pre_cfg.pretrain_lr, pre_cfg.pretrain_warmup)
    run.opt.zero_grad(set_to_none=True)
    (loss.sum() / pre_cfg.pretrain_batch).backward()
    all_reduce_sum_([p.grad for p in run.unet.parameters() if p.grad is not None], run.dist)
    run.opt.step()
    ema_update(run.ema, run.unet, pre_cfg.pretrain_ema)
    run.step += 1
    return loss.mean().item()


def save(run, done):
    if run.dist.main:
        save_checkpoint(stage_path(run.out, STAGE), dict(
            config=config_to_dict(run.cfg), stage=STAGE, step=run.step, done=done, unet=run.unet.state_dict(),
            ema=run.ema.state_dict(), optimizer=run.opt.state_dict(), generator=run.gen.get_state(),
            autoencoder=run.ae.state_dict()))
    barrier(run.dist)


def train_pretrain(cfg, out, device, resume, log, stop_at=None, dist=Dist()):
    """Stage 2, from scratch or resumed; `stop_at` stops before that step (tests of resuming)."""
    run = start_pretrain(cfg, out, device, resume, dist)
    if run is None:
        return
    total = cfg.pretrain.pretrain_steps
    bar = tqdm(range(run.step, total), desc=STAGE, initial=run.step, total=total, disable=not dist.main)
    pace = Pace(cfg, device, STAGE, total - run.step, dist.main)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return
        loss = pretrain_step(run)
        pace.step()
        if run.step % cfg.run.log_every == 0 or run.step == total:
            bar.set_postfix(loss=f"{loss:.4f}")
            log.write(stage=STAGE, step=run.step, loss=loss, lr=run.opt.param_groups[0]["lr"])
        if run.step % cfg.run.ckpt_every == 0:
            save(run, done=False)
    save(run, done=True)
    if dist.main:
        grid = write_samples(cfg, run.ae, run.ema.eval(), os.path.join(out, "samples.png"), run.classes)
        log.write(stage=STAGE, step=run.step, done=True, samples=grid)
        print(f"pretrain: done, samples in {grid}")
