"""Train a differentially private latent diffusion model, stage by stage.

    python train.py --public svhn --private mnist            # all three stages, paper-mnist preset
    python train.py --preset smoke --out /tmp/smoke          # tiny run, under 2 minutes on a CPU

Stages (`--stage`, default `all`):
  autoencoder  KL autoencoder on the PUBLIC set            -> <out>/autoencoder.pt, reconstructions.png
  pretrain     latent diffusion UNet on the PUBLIC set      -> <out>/pretrain.pt, samples.png
  finetune     DP-SGD on the PRIVATE set, attention only    -> <out>/finetune.pt, privacy_report.json
Not part of `all`:
  finetune-nonprivate  the same parameters, batches and optimiser with NO clipping or noise: a baseline
               that is NOT differentially private (dp/nonprivate.py) -> <out>/finetune-nonprivate.pt
Only `finetune` (dp/finetune.py) and `finetune-nonprivate` ever read the private set.
"""

import argparse
import copy
import os
import shutil
import sys

import torch
from tqdm import tqdm

from dp.finetune import train_finetune
from dp.nonprivate import STAGE as STAGE_NONPRIVATE, train_finetune_nonprivate
from dp.select import parse_blocks
from ldm.checkpoint import atomic_write_json, load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import PRESETS, add_config_flags, config_to_dict, make_config, overrides_from_args
from ldm.data import check_pair, load_dataset, to_unit_range
from ldm.diffusion import ema_update
from ldm.distributed import Dist, all_reduce_sum_, barrier, init_distributed, shard, shutdown
from ldm.errors import UserError
from ldm.runtime import (STAGES, MetricsLog, build_autoencoder, build_diffusion, build_unet, check_compatible,
                         encode_latents, latent_shape, lr_at, pick_device, prepare_out, stage_path)
from ldm.sampling import generate, save_grid


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper-mnist", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--stage", default="all", choices=(*STAGES, "all", STAGE_NONPRIVATE))
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    add_config_flags(p)
    return p.parse_args(argv)


def load_stage(out, stage, cfg, device):
    """The checkpoint of an earlier or interrupted stage, checked against the current configuration."""
    path = stage_path(out, stage)
    state, stored = load_checkpoint(path)
    if state.get("stage") != stage:
        raise UserError(f"{path} holds stage {state.get('stage')!r}, expected {stage!r}")
    check_compatible(stored, cfg, stage, path)
    return state, path


def frozen_autoencoder(out, cfg, device):
    """The trained autoencoder of this run, frozen (eval mode, no gradients)."""
    state, path = load_stage(out, "autoencoder", cfg, device)
    if not state["done"]:
        raise UserError(f"{path} is not finished (step {state['step']}); run --stage autoencoder --resume first")
    ae = build_autoencoder(cfg)
    load_state_strict(ae, state["autoencoder"], "autoencoder", path)
    return ae.to(device).eval().requires_grad_(False)


def start_or_resume(out, stage, cfg, device, resume):
    """(checkpoint or None). Refuse to overwrite a stage's checkpoint without --resume."""
    path = stage_path(out, stage)
    if not os.path.exists(path):
        return None
    if not resume:
        raise UserError(f"{path} already exists; pass --resume to continue this run or choose another --out")
    return load_stage(out, stage, cfg, device)[0]


def train_autoencoder(cfg, out, device, resume, log, stop_at=None, dist=Dist()):
    """Stage 1: the KL autoencoder on public images only; measures the latent scale factor at the end."""
    c = cfg.ae
    ckpt = start_or_resume(out, "autoencoder", cfg, device, resume)
    if ckpt and ckpt["done"]:
        print(f"autoencoder: already finished in {stage_path(out, 'autoencoder')}")
        return
    data = load_dataset(cfg.data.public, cfg.data, "public")
    torch.manual_seed(cfg.run.seed)  # initialisation
    ae = build_autoencoder(cfg).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=c.ae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    step = 0
    if ckpt:
        load_state_strict(ae, ckpt["autoencoder"], "autoencoder", stage_path(out, "autoencoder"))
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        step = ckpt["step"]

    def save(done):
        if dist.main:
            save_checkpoint(stage_path(out, "autoencoder"), dict(
                config=config_to_dict(cfg), stage="autoencoder", step=step, done=done,
                autoencoder=ae.state_dict(), optimizer=opt.state_dict(), generator=gen.get_state()))
        barrier(dist)

    bar = tqdm(range(step, c.ae_steps), desc="autoencoder", initial=step, total=c.ae_steps, disable=not dist.main)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return
        # the global batch is drawn identically on every rank; each rank works on its shard of it
        idx = torch.randint(0, len(data), (c.ae_batch,), generator=gen)
        noise = torch.randn((c.ae_batch, *latent_shape(cfg)), generator=gen)
        s = shard(c.ae_batch, dist)
        loss, rec, kl = ae.loss(to_unit_range(data.x[idx[s]]).to(device), c.ae_loss, c.ae_kl_weight,
                                noise[s].to(device))
        opt.zero_grad(set_to_none=True)
        (loss.sum() / c.ae_batch).backward()
        all_reduce_sum_([p.grad for p in ae.parameters() if p.grad is not None], dist)
        opt.step()
        step += 1
        if step % cfg.run.log_every == 0 or step == c.ae_steps:
            bar.set_postfix(rec=f"{rec.mean().item():.4f}")
            log.write(stage="autoencoder", step=step, loss=loss.mean().item(), rec=rec.mean().item(),
                      kl=kl.mean().item())
        if step % cfg.run.ckpt_every == 0:
            save(done=False)
    ae.eval()
    probe = torch.randperm(len(data), generator=gen)[:5000]
    scale = ae.measure_scale_factor(to_unit_range(data.x[i]).to(device) for i in probe.split(500))
    save(done=True)
    if not dist.main:
        return
    x = to_unit_range(data.x[probe[:32]]).to(device)
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mean).clamp(-1, 1)
    both = torch.stack([x, rec], 1).flatten(0, 1)
    save_grid(((both + 1) * 127.5).round().to(torch.uint8).cpu(), os.path.join(out, "reconstructions.png"))
    log.write(stage="autoencoder", step=step, scale_factor=scale, done=True)
    print(f"autoencoder: done, latent scale factor {scale:.4f}, reconstructions in {out}/reconstructions.png")


def train_pretrain(cfg, out, device, resume, log, stop_at=None, dist=Dist()):
    """Stage 2: the class-conditional latent diffusion UNet on public images only."""
    c = cfg.pretrain
    ckpt = start_or_resume(out, "pretrain", cfg, device, resume)
    if ckpt and ckpt["done"]:
        print(f"pretrain: already finished in {stage_path(out, 'pretrain')}")
        return
    ae = frozen_autoencoder(out, cfg, device)
    data = load_dataset(cfg.data.public, cfg.data, "public")
    mean, std = encode_latents(ae, data, device, "encoding public set")
    labels = data.y.to(device)
    torch.manual_seed(cfg.run.seed)  # initialisation
    unet = build_unet(cfg).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    diffusion = build_diffusion(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=c.pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    step = 0
    if ckpt:
        path = stage_path(out, "pretrain")
        load_state_strict(unet, ckpt["unet"], "UNet", path)
        load_state_strict(ema, ckpt["ema"], "EMA UNet", path)
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        step = ckpt["step"]

    def save(done):
        if dist.main:
            save_checkpoint(stage_path(out, "pretrain"), dict(
                config=config_to_dict(cfg), stage="pretrain", step=step, done=done, unet=unet.state_dict(),
                ema=ema.state_dict(), optimizer=opt.state_dict(), generator=gen.get_state(),
                autoencoder=ae.state_dict()))
        barrier(dist)

    bar = tqdm(range(step, c.pretrain_steps), desc="pretrain", initial=step, total=c.pretrain_steps,
               disable=not dist.main)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return
        # the global batch and its draws are identical on every rank; each rank works on its shard
        idx = torch.randint(0, len(data), (c.pretrain_batch,), generator=gen)
        noise = torch.randn(mean[idx].shape, generator=gen).to(device)
        z0 = mean[idx] + std[idx] * noise  # scaled latents: one posterior sample per example
        t, eps = diffusion.draw(z0, gen)
        s = shard(c.pretrain_batch, dist)
        loss = diffusion.loss_per_example(unet, z0[s], labels[idx[s]], t[s], eps[s])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c.pretrain_lr, c.pretrain_warmup)
        opt.zero_grad(set_to_none=True)
        (loss.sum() / c.pretrain_batch).backward()
        all_reduce_sum_([p.grad for p in unet.parameters() if p.grad is not None], dist)
        opt.step()
        ema_update(ema, unet, c.pretrain_ema)
        step += 1
        if step % cfg.run.log_every == 0 or step == c.pretrain_steps:
            bar.set_postfix(loss=f"{loss.mean().item():.4f}")
            log.write(stage="pretrain", step=step, loss=loss.mean().item(), lr=opt.param_groups[0]["lr"])
        if step % cfg.run.ckpt_every == 0:
            save(done=False)
    save(done=True)
    if not dist.main:
        return
    grid = write_samples(cfg, ae, ema.eval(), os.path.join(out, "samples.png"), data.num_classes)
    log.write(stage="pretrain", step=step, done=True, samples=grid)
    print(f"pretrain: done, samples in {grid}")


def write_samples(cfg, ae, unet, path, classes, metadata=None):
    """A class-ordered grid of `grid_n` samples (DDIM, `sample_steps`, `eta`) from `unet`, seeded by the run;
    `metadata` (provenance: stage, DP or not, epsilon) goes into the PNG file itself."""
    labels = torch.arange(cfg.run.grid_n) % min(classes, 10)
    gen = torch.Generator().manual_seed(cfg.run.seed + 2)
    images = generate(ae, unet, build_diffusion(cfg), labels, latent_shape(cfg), cfg.diffusion.sample_steps,
                      cfg.diffusion.eta, gen)
    return save_grid(images, path, metadata)


def run(argv=None):
    args = parse_args(argv)
    cfg = make_config(args.preset, overrides_from_args(args))
    check_pair(cfg.data)
    if args.stage in ("finetune", "all", STAGE_NONPRIVATE):
        parse_blocks(cfg.dp.dp_blocks, build_unet(cfg))  # a bad --dp-blocks stops the run before any work
    out = args.out or os.path.join("runs", cfg.preset)
    existed = os.path.exists(out)
    dist, device = init_distributed(pick_device(cfg.run.device), cfg.run.dist_timeout)
    try:
        if dist.main:
            prepare_out(out)
        barrier(dist)
        run_stages(cfg, args, out, dist, device)
    except UserError:
        if dist.main and not existed and os.path.isdir(out) and not [f for f in os.listdir(out) if f.endswith(".pt")]:
            shutil.rmtree(out, ignore_errors=True)  # a run that failed before any checkpoint leaves nothing
        raise
    finally:
        shutdown(dist)


def run_stages(cfg, args, out, dist, device):
    if dist.main:
        atomic_write_json(os.path.join(out, "config.json"), config_to_dict(cfg))
    log = MetricsLog(os.path.join(out, "metrics.jsonl") if dist.main else None)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if dist.main:
        print(f"run folder {out}, device {device}, {dist.world} process(es), preset {cfg.preset}, "
              f"stages {', '.join(stages)}")
    for stage in stages:
        if stage == "autoencoder":
            train_autoencoder(cfg, out, device, args.resume, log, dist=dist)
        elif stage == "pretrain":
            train_pretrain(cfg, out, device, args.resume, log, dist=dist)
        elif stage == STAGE_NONPRIVATE:
            train_finetune_nonprivate(cfg, out, device, args.resume, log, write_samples=write_samples, dist=dist)
        else:
            train_finetune(cfg, out, device, args.resume, log, write_samples=write_samples, dist=dist)


def main(argv=None):
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f"rank {rank}: " if rank is not None else ""
    try:
        run(argv)
    except UserError as e:
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept: continue with the same command and --resume", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if rank is None:
            raise
        detail = " ".join(str(e).split())[:200]
        print(f"error: {where}another process of the distributed run failed or stopped answering within "
              f"--dist-timeout; stopping ({detail})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
