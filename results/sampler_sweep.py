"""Sampler sweep on one trained checkpoint: images per second and quality, without any real data.

    .venv/bin/python results/sampler_sweep.py --ckpt runs/quick/finetune.pt --out results/sampler_sweep.json

For each (sampler, steps) it samples the same labels from the same seed and reports:
  images_per_s  wall-clock throughput of sample.py's `generate` (batch --batch, this machine's threads);
  fd_to_reference  the Frechet distance in pixel space (the images mean-pooled by POOL: 16 x 16 = 256 features
        for 32 x 32 images) between its images and a reference set drawn by the model's own most careful
        sampler (DDIM, --reference-steps, eta 1: the original work's setting). The first row is a second,
        independent reference set: its distance is the noise floor at this n.
No real image is read: the setting is chosen on the model's own distribution, never on the MNIST test set.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.build import build_diffusion, latent_shape  # noqa: E402
from ldm.checkpoint import load_checkpoint  # noqa: E402
from ldm.run_folder import trained_autoencoder, trained_unet  # noqa: E402
from ldm.sampling import generate  # noqa: E402
from metrics.frechet import feature_stats, frechet_distance  # noqa: E402

POOL = 2  # pixel features: mean-pool by POOL, flatten


def features(images):
    x = images.float() / 127.5 - 1
    return F.avg_pool2d(x, POOL).flatten(1)


def fd(a, b):
    return float(frechet_distance(*feature_stats([features(a)]), *feature_stats([features(b)])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--settings", default="ddim:10,ddim:20,ddim:50,dpm++2m:5,dpm++2m:8,dpm++2m:10,dpm++2m:15,dpm++2m:20")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    state, cfg = load_checkpoint(args.ckpt)
    ae = trained_autoencoder(state, cfg, args.ckpt, torch.device("cpu"))
    unet = trained_unet(state, cfg, args.ckpt, torch.device("cpu")).eval()
    diffusion, shape = build_diffusion(cfg), latent_shape(cfg)
    labels = torch.arange(args.n) % 10

    def draw(sampler, steps, seed, eta=1.0):
        t0 = time.time()
        images = generate(ae, unet, diffusion, labels, shape, steps, eta, torch.Generator().manual_seed(seed),
                          args.batch, progress=False, sampler=sampler)
        return images, args.n / (time.time() - t0)

    reference, ref_rate = draw("ddim", args.reference_steps, 1)
    second, _ = draw("ddim", args.reference_steps, 2)
    rows = [dict(sampler="ddim", steps=args.reference_steps, eta=1.0, images_per_s=ref_rate,
                 fd_to_reference=fd(second, reference), note="an independent reference set: the noise floor")]
    for item in args.settings.split(","):
        sampler, steps = item.split(":")
        images, rate = draw(sampler, int(steps), 3)
        rows.append(dict(sampler=sampler, steps=int(steps), eta=1.0 if sampler == "ddim" else None,
                         images_per_s=rate, fd_to_reference=fd(images, reference)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = dict(ckpt=os.path.basename(args.ckpt), n=args.n, batch=args.batch, threads=torch.get_num_threads(),
                  reference=f"ddim {args.reference_steps} steps, eta 1", pixel_pool=POOL, rows=rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
