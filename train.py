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
Only `finetune` (dp/finetune.py) and `finetune-nonprivate` (dp/nonprivate.py) read the private set here.
This file is the command line only: the stages are ldm/autoencoder_stage.py, ldm/pretrain_stage.py,
dp/finetune.py and dp/nonprivate.py.
"""

import argparse
import os
import shutil
import sys

from dp.finetune import train_finetune
from dp.nonprivate import STAGE as STAGE_NONPRIVATE, train_finetune_nonprivate
from dp.select import select_trainable
from ldm.autoencoder_stage import train_autoencoder
from ldm.build import build_unet
from ldm.checkpoint import atomic_write_json
from ldm.config import add_config_flags, config_from_args, config_to_dict
from ldm.data import check_pair
from ldm.distributed import barrier, init_distributed, pick_device, shutdown
from ldm.errors import UserError
from ldm.metrics_log import MetricsLog
from ldm.pretrain_stage import train_pretrain
from ldm.run_folder import STAGES, prepare_out


EXIT_STATUS = """exit status:
  0    every stage asked for finished
  2    bad input: a UserError, printed as one line starting with "error:" (argparse usage errors too)
  3    distributed run (torchrun): another process failed or did not answer within --dist-timeout
  130  interrupted (Ctrl-C); the last checkpoint is kept: run the same command again with --resume
  any other status (1 from Python) with a traceback is a bug"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=(*STAGES, "all", STAGE_NONPRIVATE))
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    add_config_flags(p, argv)
    return p.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)
    check_pair(cfg.data)
    if args.stage in ("finetune", "all", STAGE_NONPRIVATE):
        select_trainable(build_unet(cfg), cfg)  # a bad --dp-blocks or --dp-lora stops the run before any work
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
            train_finetune_nonprivate(cfg, out, device, args.resume, log, dist=dist)
        else:
            train_finetune(cfg, out, device, args.resume, log, dist=dist)


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
