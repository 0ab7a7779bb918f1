"""Sample from a trained (pretrained or DP fine-tuned) latent diffusion model.

    python sample.py --ckpt runs/quick/finetune.pt --n 64 --out grid.png       # a PNG grid
    python sample.py --ckpt runs/quick/finetune.pt --n 60000 --out synth.npz   # a labelled data set

The .npz holds uint8 images `x` (N, H, W) for one channel or (N, H, W, C) otherwise, int64 labels `y`,
class-balanced over all classes of the checkpoint's data set unless --labels chooses some. Sampling
from a DP fine-tuned checkpoint is post-processing: it costs no privacy.
"""

import argparse
import os
import sys

import numpy as np
import torch

from ldm.checkpoint import atomic_write_bytes, load_checkpoint, load_state_strict
from ldm.data import REGISTRY
from ldm.errors import UserError
from ldm.runtime import build_autoencoder, build_diffusion, build_unet, latent_shape, pick_device
from ldm.sampling import generate, save_grid


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretrain.pt or finetune.pt of a run")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output file: .png (grid) or .npz (data set)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's --sample-steps)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the run's --eta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--labels", default=None, help="comma-separated classes to sample, in turn (default: all)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def load_model(path, device):
    """(config, frozen autoencoder, EMA UNet) from a pretrain or finetune checkpoint, loaded strictly."""
    state, cfg = load_checkpoint(path)
    if state.get("stage") not in ("pretrain", "finetune", "finetune-nonprivate"):
        raise UserError(f"{path} holds stage {state.get('stage')!r}; sampling needs a pretrain or finetune checkpoint")
    if state.get("differentially_private") is False:
        print(f"warning: {path}: {state['warning']}", file=sys.stderr)
    ae = build_autoencoder(cfg)
    load_state_strict(ae, state["autoencoder"], "autoencoder", path)
    unet = build_unet(cfg)
    load_state_strict(unet, state["ema"], "EMA UNet", path)
    return cfg, state, ae.to(device).eval(), unet.to(device).eval()


def label_sequence(args, state, cfg):
    """Class-balanced labels 0..K-1 in turn, K = classes of the set the checkpoint was last trained on."""
    name = cfg.data.public if state["stage"] == "pretrain" else cfg.data.private
    k = REGISTRY[name].num_classes
    classes = list(range(k))
    if args.labels:
        try:
            classes = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
        bad = [c for c in classes if not 0 <= c < k]
        if bad or not classes:
            raise UserError(f"--labels {args.labels!r}: classes must lie in 0..{k - 1} for {name}")
    return torch.tensor(classes)[torch.arange(args.n) % len(classes)]


def run(argv=None):
    args = parse_args(argv)
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {args.out!r}")
    for name in ("n", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {args.out}: folder {folder} does not exist or is not writable")
    device = pick_device(args.device)
    cfg, state, ae, unet = load_model(args.ckpt, device)
    steps = args.steps or cfg.diffusion.sample_steps
    if steps > cfg.diffusion.timesteps:
        raise UserError(f"--steps {steps} cannot exceed the model's {cfg.diffusion.timesteps} timesteps")
    eta = cfg.diffusion.eta if args.eta is None else args.eta
    labels = label_sequence(args, state, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    images = generate(ae, unet, build_diffusion(cfg), labels, latent_shape(cfg), steps, eta, gen, args.batch_size)
    if ext == ".png":
        save_grid(images, args.out)
    else:
        x = images.permute(0, 2, 3, 1).numpy()
        x = x[..., 0] if x.shape[-1] == 1 else x
        atomic_write_bytes(args.out, lambda f: np.savez(f, x=x, y=labels.numpy().astype(np.int64)))
    print(f"wrote {len(images)} samples to {args.out} ({steps} DDIM steps, eta {eta}, seed {args.seed})")


def main(argv=None):
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
