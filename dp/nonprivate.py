"""The NON-PRIVATE baseline of stage 3: fine-tune the same parameters on the private set with no clipping
and no noise. Its model is NOT differentially private and must never be released; it exists so that a
result table can show what DP costs (`train.py --stage finetune-nonprivate`). It reads the private set.

Everything except clipping and noise is the DP stage's: the same pretrained model, selected parameters
(--dp-blocks, --dp-lora), Poisson-sampled batches of expected size --expected-batch, per-example draws, number of
logical steps, divisor q N, optimiser, learning rate, warm-up and EMA: the very `dp_step` of dp/step.py,
called with a Mechanism whose clip is None and sigma 0. Its randomness is seeded by --seed (nothing to
hide). The checkpoint is written to its own file, carries `differentially_private: False` and no privacy
ledger or report, so that it cannot be taken for the output of the DP stage.
"""

import os

from tqdm import tqdm

from dp.finetune import check_frozen, check_labels, load_pretrained, lora_text, private_task
from dp.lora import merged_copy, merged_state
from dp.poisson import num_steps, sampling_rate
from dp.randomness import seeded_secret
from dp.select import selection_size
from dp.step import Mechanism, dp_step, make_optimizer
from ldm.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from ldm.config import config_to_dict
from ldm.data import load_private, num_classes
from ldm.diffusion import ema_update
from ldm.errors import UserError
from ldm.run_folder import check_compatible, refuse_overwrite, stage_path
from ldm.sampling import write_samples
from ldm.schedule import lr_at

STAGE = "finetune-nonprivate"
WARNING = "NOT differentially private: a baseline for comparison only, never release this model or its samples"


def train_finetune_nonprivate(cfg, out, device, resume, log, dist, stop_at=None):
    """Non-private fine-tuning of the DP stage's parameters. Returns the checkpoint's path (None if stopped)."""
    if dist.world > 1:
        raise UserError(f"--stage {STAGE} runs in one process; start it without torchrun")
    dp_cfg = cfg.dp
    path = stage_path(out, STAGE)
    refuse_overwrite(path, resume)
    ae, unet = load_pretrained(cfg, out, device)
    pretrained = {k: v.clone() for k, v in unet.state_dict().items()}
    data = load_private(cfg)
    check_labels(data, num_classes(cfg.data), cfg.data.private)
    q = sampling_rate(dp_cfg.expected_batch, len(data))
    steps = num_steps(dp_cfg.epochs, q)
    task = private_task(cfg, ae, unet, data, device)
    n_train, share = selection_size(unet, task.params)
    print(f"{STAGE}: {WARNING}. N={len(data)}, q={q:.6g}, T={steps} logical steps, trainable {n_train:,} "
          f"parameters ({100 * share:.1f}% of the UNet) in blocks '{dp_cfg.dp_blocks}'{lora_text(dp_cfg)}")
    log.write(stage=STAGE, event="plan", differentially_private=False, q=q, steps=steps, trainable=n_train)
    mech = Mechanism(q, clip=None, sigma=0.0, divisor=q * len(data))  # no clipping, no noise: NOT private
    secret = seeded_secret(cfg.run.seed, f"--seed {cfg.run.seed} (not private)")
    ema = merged_copy(unet)  # the plain architecture, adapters merged (dp/lora.py)
    opt = make_optimizer(dp_cfg, task.params)
    start = restore(path, cfg, unet, ema, opt) if resume and os.path.exists(path) else 0

    def save(step, done):
        save_checkpoint(path, dict(
            config=config_to_dict(cfg), stage=STAGE, step=step, done=done, differentially_private=False,
            warning=WARNING, unet=unet.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
            autoencoder=ae.state_dict()))

    for step in tqdm(range(start, steps), desc=f"{STAGE} (NOT DP)", initial=start, total=steps):
        if stop_at is not None and step >= stop_at:
            return None
        dp_step(task, mech, secret, step, opt, lr_at(step, dp_cfg.lr, dp_cfg.warmup))
        ema_update(ema, merged_state(unet), dp_cfg.dp_ema)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == steps:
            log.write(stage=STAGE, step=step + 1, lr=opt.param_groups[0]["lr"])
        if (step + 1) % cfg.run.ckpt_every == 0:
            save(step + 1, done=False)
    save(steps, done=True)
    check_frozen(unet, ema, pretrained, task.params)
    grid = write_samples(cfg, ae, ema.eval(), os.path.join(out, "samples_finetune_nonprivate.png"), data.num_classes,
                         dict(stage=STAGE, differentially_private=False, warning=WARNING))
    print(f"{STAGE}: done ({WARNING}); checkpoint {path}, samples in {grid}")
    return path


def restore(path, cfg, unet, ema, opt):
    """Continue from the baseline's own checkpoint; returns the step to continue at."""
    state, stored = load_checkpoint(path)
    check_compatible(stored, cfg, "finetune", path)
    if state.get("stage") != STAGE:
        raise UserError(f"{path} holds stage {state.get('stage')!r}, expected {STAGE!r}")
    load_state_strict(unet, state["unet"], "UNet", path)
    load_state_strict(ema, state["ema"], "EMA UNet", path)
    opt.load_state_dict(state["optimizer"])
    return state["step"]
