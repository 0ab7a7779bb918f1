"""Stage 1: the KL autoencoder on the PUBLIC set; never reads the private set.

    <out>/autoencoder.pt (weights, optimiser, generator state, and the latent scale factor once done)
    <out>/reconstructions.png (32 public images above their reconstructions)

Every random draw comes from one generator seeded by --seed, stored in the checkpoint, so a resumed run
continues the same sequence. With several processes the global batch is drawn identically on every rank and
each rank works on its shard; the gradients are summed over ranks.
"""

import dataclasses
import os

import torch
from tqdm import tqdm

from ldm.build import build_autoencoder, latent_shape
from ldm.checkpoint import load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_dataset, to_unit_range
from ldm.distributed import Dist, all_reduce_sum_, barrier, shard
from ldm.pace import Pace
from ldm.run_folder import resume_state, stage_path
from ldm.sampling import save_grid

STAGE = "autoencoder"


@dataclasses.dataclass
class AutoencoderRun:
    """What the loop of `train_autoencoder` needs, built by `start_autoencoder`."""

    cfg: object
    out: str
    data: object
    ae: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    step: int
    dist: Dist


def start_autoencoder(cfg, out, device, resume, dist):
    """A fresh or resumed run; None when the checkpoint in `out` is already finished."""
    ckpt = resume_state(out, STAGE, cfg, resume)
    if ckpt and ckpt["done"]:
        print(f"autoencoder: already finished in {stage_path(out, STAGE)}")
        return None
    torch.manual_seed(cfg.run.seed)  # initialisation
    ae = build_autoencoder(cfg).to(device)
    run = AutoencoderRun(cfg, out, load_dataset(cfg.data.public, cfg.data, "public"), ae,
                         torch.optim.AdamW(ae.parameters(), lr=cfg.ae.ae_lr, weight_decay=0.0),
                         torch.Generator().manual_seed(cfg.run.seed), 0, dist)
    if ckpt:
        load_state_strict(ae, ckpt["autoencoder"], "autoencoder", stage_path(out, STAGE))
        run.opt.load_state_dict(ckpt["optimizer"])
        run.gen.set_state(ckpt["generator"])
        run.step = ckpt["step"]
    return run


def autoencoder_step(run):
    """One optimiser step on a batch of public images; returns the batch's mean (loss, reconstruction, KL)."""
    ae_cfg, device = run.cfg.ae, next(run.ae.parameters()).device
    idx = torch.randint(0, len(run.data), (ae_cfg.ae_batch,), generator=run.gen)
    noise = torch.randn((ae_cfg.ae_batch, *latent_shape(run.cfg)), generator=run.gen)
    s = shard(ae_cfg.ae_batch, run.dist)
    loss, rec, kl = run.ae.loss(to_unit_range(run.data.x[idx[s]]).to(device), ae_cfg.ae_loss, ae_cfg.ae_kl_weight,
                                noise[s].to(device))
    run.opt.zero_grad(set_to_none=True)
    (loss.sum() / ae_cfg.ae_batch).backward()
    all_reduce_sum_([p.grad for p in run.ae.parameters() if p.grad is not None], run.dist)
    run.opt.step()
    run.step += 1
    return loss.mean().item(), rec.mean().item(), kl.mean().item()


def save(run, done):
    if run.dist.main:
        save_checkpoint(stage_path(run.out, STAGE), dict(
            config=config_to_dict(run.cfg), stage=STAGE, step=run.step, done=done,
            autoencoder=run.ae.state_dict(), optimizer=run.opt.state_dict(), generator=run.gen.get_state()))
    barrier(run.dist)


def train_autoencoder(cfg, out, device, resume, log, stop_at=None, dist=Dist()):
    """Stage 1, from scratch or resumed; `stop_at` stops before that step (tests of resuming)."""
    run = start_autoencoder(cfg, out, device, resume, dist)
    if run is None:
        return
    total = cfg.ae.ae_steps
    bar = tqdm(range(run.step, total), desc=STAGE, initial=run.step, total=total, disable=not dist.main)
    pace = Pace(cfg, device, STAGE, total - run.step, dist.main)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            return
        loss, rec, kl = autoencoder_step(run)
        pace.step()
        if run.step % cfg.run.log_every == 0 or run.step == total:
            bar.set_postfix(rec=f"{rec:.4f}")
            log.write(stage=STAGE, step=run.step, loss=loss, rec=rec, kl=kl)
        if run.step % cfg.run.ckpt_every == 0:
            save(run, done=False)
    finish(run, log)


def finish(run, log):
    """Measure the latent scale factor on public images, save the finished checkpoint, write the grid."""
    run.ae.eval()
    device = next(run.ae.parameters()).device
    probe = torch.randperm(len(run.data), generator=run.gen)[:5000]
    scale = run.ae.measure_scale_factor(to_unit_range(run.data.x[i]).to(device) for i in probe.split(500))
    save(run, done=True)
    if not run.dist.main:
        return
    x = to_unit_range(run.data.x[probe[:32]]).to(device)
    with torch.no_grad():
        rec = run.ae.decode(run.ae.encode(x).mean).clamp(-1, 1)
    both = torch.stack([x, rec], 1).flatten(0, 1)
    path = os.path.join(run.out, "reconstructions.png")
    save_grid(((both + 1) * 127.5).round().to(torch.uint8).cpu(), path)
    log.write(stage=STAGE, step=run.step, scale_factor=scale, done=True)
    print(f"autoencoder: done, latent scale factor {scale:.4f}, reconstructions in {path}")
