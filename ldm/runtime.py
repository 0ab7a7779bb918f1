"""Run folder, device, metrics log, model construction and compatibility checks shared by the stages."""

import json
import os
import time

import torch
from tqdm import tqdm

from ldm.autoencoder import Autoencoder
from ldm.config import COMPONENTS, config_to_dict
from ldm.data import experiment_channels, num_classes, to_unit_range
from ldm.diffusion import Diffusion
from ldm.errors import UserError
from ldm.unet import UNet

STAGES = ("autoencoder", "pretrain", "finetune")
# Which parts of the configuration each stage's checkpoint depends on. `private` and `data_root` are
# left out on purpose: one pretrained model may be fine-tuned on several private sets, data may move.
STAGE_COMPONENTS = {
    "autoencoder": ("data", "ae"),
    "pretrain": ("data", "ae", "unet", "diffusion", "pretrain"),
    "finetune": ("data", "ae", "unet", "diffusion", "pretrain", "dp"),
    "finetune-nonprivate": ("data", "ae", "unet", "diffusion", "pretrain", "dp"),
}
IGNORED_FIELDS = {"private", "data_root", "clip_backend", "grad_method"}


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def prepare_out(out):
    """Create the run folder and check that it can be written, before any work starts."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output folder {out} cannot be written ({e.strerror or e}); choose another --out") from None


def stage_path(out, stage):
    return os.path.join(out, f"{stage}.pt")


def check_compatible(stored, cfg, stage, path):
    """The stored configuration of `stage`'s checkpoint must equal the current one where the stage depends on it."""
    a, b = config_to_dict(stored), config_to_dict(cfg)
    diffs = [f"--{k.replace('_', '-')} {a[c][k]!r} (stored) vs {b[c][k]!r} (now)"
             for c in STAGE_COMPONENTS[stage] for k in a[c] if k not in IGNORED_FIELDS and a[c][k] != b[c][k]]
    if diffs:
        raise UserError(f"{path} was made with a different configuration: {'; '.join(diffs[:4])}; "
                        f"use the same flags or a new --out")


def build_autoencoder(cfg):
    return Autoencoder.from_config(cfg.ae, experiment_channels(cfg.data))


def build_unet(cfg):
    return UNet.from_config(cfg.unet, cfg.ae.ae_latent_channels, num_classes(cfg.data))


def build_diffusion(cfg):
    return Diffusion.from_config(cfg.diffusion)


def latent_shape(cfg):
    f = 2 ** (len(cfg.ae.ae_mult) - 1)
    return (cfg.ae.ae_latent_channels, cfg.data.image_size // f, cfg.data.image_size // f)


@torch.no_grad()
def encode_latents(ae, data, device, desc, batch=500):
    """Scaled posterior mean and std of every image of `data` under the frozen autoencoder: two (N, z, h, w)
    tensors on `device`. A latent sample is mean + std * noise, one noise draw per example and step."""
    means, stds = [], []
    for i in tqdm(range(0, len(data), batch), desc=desc, unit="batch", leave=False):
        post = ae.encode(to_unit_range(data.x[i:i + batch]).to(device))
        means.append(post.mean * ae.scale_factor)
        stds.append(post.std * ae.scale_factor)
    return torch.cat(means), torch.cat(stds)


class MetricsLog:
    """Append-only JSON-lines log: one object per logged event, flushed at once."""

    def __init__(self, path):
        self.path = path  # None: a process that does not write (ranks other than 0)

    def write(self, **record):
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def lr_at(step, base_lr, warmup):
    """Linear warm-up over `warmup` steps (counted in optimiser steps), then constant."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def config_summary(cfg):
    return {c: config_to_dict(cfg)[c] for c in COMPONENTS}
