"""The run folder and its stage checkpoints: where each stage writes, when a checkpoint may be reused, and the
trained models read back from one.

    <out>/autoencoder.pt  pretrain.pt  finetune.pt  finetune-nonprivate.pt   (stage checkpoints)
    <out>/config.json  metrics.jsonl  privacy_ledger.jsonl  privacy_report.json  *.png
"""

import os

from ldm.build import build_autoencoder, build_unet
from ldm.checkpoint import load_checkpoint, load_state_strict
from ldm.config import config_to_dict
from ldm.errors import UserError

STAGES = ("autoencoder", "pretrain", "finetune")
# Which parts of the configuration each stage's checkpoint depends on. `private` and `data_root` are
# left out on purpose: one pretrained model may be fine-tuned on several private sets, data may move.
STAGE_COMPONENTS = {
    "autoencoder": ("data", "ae"),
    "pretrain": ("data", "ae", "unet", "diffusion", "pretrain"),
    "finetune": ("data", "ae", "unet", "diffusion", "pretrain", "dp"),
    "finetune-nonprivate": ("data", "ae", "unet", "diffusion", "pretrain", "dp"),
}
# not compared: where data lives, how the same result is computed, and how grids are sampled (never training)
IGNORED_FIELDS = {"private", "data_root", "clip_backend", "grad_method", "sampler", "sample_steps", "eta"}
# The step count that --resume may change, raising it on a finished stage to train on: (component, field). Only
# pretraining's: its learning rate is constant after warm-up (ldm/schedule.py) and the checkpoint holds the
# optimiser, EMA and data-order generator, so going on from step S to S' gives what a fresh run of S' steps gives,
# bit for bit. Never the autoencoder's (its latent scale is fixed when it finishes) nor the private stage's (its T is
# fixed upfront, sigma calibrated to it).
EXTENDABLE = {"pretrain": ("pretrain", "pretrain_steps")}


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


def refuse_overwrite(path, resume):
    """A stage never overwrites its checkpoint unless asked to continue it (--resume)."""
    if os.path.exists(path) and not resume:
        raise UserError(f"{path} already exists; pass --resume to continue this run or choose another --out")


def check_compatible(stored, cfg, stage, path, also_ignored=()):
    """The stored configuration of `stage`'s checkpoint must equal the current one where the stage depends on it."""
    a, b = config_to_dict(stored), config_to_dict(cfg)
    ignored = IGNORED_FIELDS.union(also_ignored)
    diffs = [f"--{k.replace('_', '-')} {a[c][k]!r} (stored) vs {b[c][k]!r} (now)"
             for c in STAGE_COMPONENTS[stage] for k in a[c] if k not in ignored and a[c][k] != b[c][k]]
    if diffs:
        raise UserError(f"{path} was made with a different configuration: {'; '.join(diffs[:4])}; "
                        f"use the same flags or a new --out")


def load_stage(out, stage, cfg, finished=False, also_ignored=()):
    """(state, path) of `stage`'s checkpoint in `out`, checked: that stage, made with a compatible configuration
    (but for the fields `also_ignored`) and, with `finished`, run to its end."""
    path = stage_path(out, stage)
    state, stored = load_checkpoint(path)
    if state.get("stage") != stage:
        raise UserError(f"{path} holds stage {state.get('stage')!r}, expected {stage!r}")
    check_compatible(stored, cfg, stage, path, also_ignored)
    if finished and not state["done"]:
        raise UserError(f"{path} is not finished (step {state['step']}); run --stage {stage} --resume first")
    return state, path


def resume_state(out, stage, cfg, resume):
    """The checkpoint to continue `stage` from, or None for a fresh start; refuses to overwrite without --resume.
    A stage of EXTENDABLE may be resumed with its step count changed, down to the step it reached: a finished
    checkpoint resumed with more steps is then not finished."""
    path = stage_path(out, stage)
    refuse_overwrite(path, resume)
    if not os.path.exists(path):
        return None
    if stage not in EXTENDABLE:
        return load_stage(out, stage, cfg)[0]
    component, field_name = EXTENDABLE[stage]
    state = load_stage(out, stage, cfg, also_ignored={field_name})[0]
    total = getattr(getattr(cfg, component), field_name)
    if total < state["step"]:
        raise UserError(f"{path} has run {state['step']} steps; --{field_name.replace('_', '-')} {total} is below "
                        f"that: allowed is at least {state['step']} (or a new --out)")
    return dict(state, done=state["done"] and state["step"] == total)


def trained_autoencoder(state, cfg, path, device):
    """The autoencoder of a checkpoint, frozen (eval mode, no gradients)."""
    ae = build_autoencoder(cfg)
    load_state_strict(ae, state["autoencoder"], "autoencoder", path)
    return ae.to(device).eval().requires_grad_(False)


def trained_unet(state, cfg, path, device):
    """The EMA UNet of a checkpoint (the weights every later stage and the sampler use)."""
    unet = build_unet(cfg)
    load_state_strict(unet, state["ema"], "EMA UNet", path)
    return unet.to(device)
