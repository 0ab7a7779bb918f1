"""Sample from a trained (pretrained or DP fine-tuned) latent diffusion model.

    python sample.py --ckpt runs/quick/finetune.pt --n 64 --out grid.png       # a PNG grid
    python sample.py --ckpt runs/quick/finetune.pt --n 60000 --out synth.npz   # a labelled data set
    python sample.py --ckpt runs/quick/finetune.pt --n 60000 --out synth/      # the same as PNG files in folders

The .npz holds uint8 images `x` (N, H, W) for one channel or (N, H, W, C) otherwise, int64 labels `y`,
class-balanced over all classes of the checkpoint's data set unless --labels chooses some. Sampling
from a DP fine-tuned checkpoint is post-processing: it costs no privacy.

Every output records where it came from (`provenance`): the .npz in a 0-d unicode entry `metadata`, the PNG
in an iTXt chunk `metadata`, both one JSON object, and the same object in a card beside it
(synth.npz -> synth.card.json). Each is written atomically; an old card is removed before its data file
is replaced and the new card is written after it, so a kill leaves no partial file and no card that describes
other samples (the data file always carries its own copy).

A folder (--out ending in '/', or naming an existing folder) gets torchvision's ImageFolder layout,
DIR/<class>/<index>.png, with DIR/card.json; see `write_folder` for how it is made atomic.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.build import build_diffusion, latent_shape
from ldm.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from ldm.config import SAMPLERS
from ldm.data import REGISTRY
from ldm.distributed import pick_device
from ldm.errors import UserError
from ldm.run_folder import trained_autoencoder, trained_unet
from ldm.sampling import METADATA_KEY, generate, save_grid

CREATED_BY = "dp-ldm sample.py"
PUBLIC_ONLY = "public data only: no private data was used"
POST_PROCESSING = ("sampling reads the model, never the data: it is post-processing and costs no privacy beyond "
                   "what the model's training spent")
REPORT_KEYS = ("epsilon", "delta", "neighbouring_relation", "accountant", "private_set", "steps")
FOLDER_CARD = "card.json"  # DIR/card.json of a folder output
FSYNC_THREADS = 8  # parallel fsyncs share journal commits: about 0.15 ms a file instead of 3 on ext4


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretrain.pt or finetune.pt of a run")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True,
                   help="output: .png (grid), .npz (data set), or a folder (a path ending in '/' or naming an "
                        "existing folder): PNGs in ImageFolder layout DIR/<class>/<index>.png plus DIR/card.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out folder that sample.py wrote (once the new one is complete)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="ddim or dpm++2m (DPM-Solver++(2M), deterministic); default: the run's --sampler")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's --sample-steps)")
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
    if state.get("done") is not True:  # a run cut short: its samples are of the model at that step (labelled with it)
        print(f"warning: {path} is not finished (step {state['step']}); its samples are of that step's model. "
              f"Finish it with train.py --stage {state['stage']} --resume", file=sys.stderr)
    return cfg, state, trained_autoencoder(state, cfg, path, device), trained_unet(state, cfg, path, device).eval()


def class_count(state, cfg):
    """(name, K): the set the checkpoint was last trained on and its number of classes."""
    name = cfg.data.public if state["stage"] == "pretrain" else cfg.data.private
    return name, REGISTRY[name].num_classes


def sample_classes(args, state, cfg):
    """Classes to sample in turn: 0..K-1 (K = classes of the set the checkpoint was last trained on) or --labels."""
    name, k = class_count(state, cfg)
    if not args.labels:
        return list(range(k))
    try:
        classes = [int(v) for v in args.labels.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    bad = [c for c in classes if not 0 <= c < k]
    if bad or not classes:
        raise UserError(f"--labels {args.labels!r}: classes must lie in 0..{k - 1} for {name}")
    return classes


def privacy_facts(path, state, cfg):
    """What the checkpoint itself records about privacy, as metadata fields; nothing is inferred.

    pretrain: public data only (differentially_private None). finetune-nonprivate: False, with its warning.
    finetune: True with the numbers of the `privacy_report` it carries (the same dict as privacy_report.json);
    a fine-tuning checkpoint without `differentially_private: True` and that report is refused, not guessed.
    """
    stage = state["stage"]
    none = dict(epsilon=None, delta=None, neighbouring_relation=None, accountant=None, privacy_report=None)
    if stage == "pretrain":
        return dict(none, differentially_private=None, privacy=PUBLIC_ONLY, private_set=None, warning=None)
    if stage == "finetune-nonprivate":
        if state.get("differentially_private") is not False or not state.get("warning"):
            raise UserError(f"{path}: a finetune-nonprivate checkpoint must carry differentially_private: False and "
                            f"its warning; this one does not, so its samples cannot be labelled")
        return dict(none, differentially_private=False, private_set=cfg.data.private, warning=state["warning"],
                    privacy=f"trained on the private set '{cfg.data.private}' with no clipping and no noise: "
                            f"no privacy guarantee")
    report = state.get("privacy_report")
    if state.get("differentially_private") is not True or not isinstance(report, dict):
        raise UserError(f"{path} is a fine-tuning checkpoint without differentially_private: True and a "
                        f"privacy_report: it predates provenance records, so its samples cannot be labelled "
                        f"differentially private; fine-tune again into a new --out with this version")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise UserError(f"{path}: its privacy_report lacks {', '.join(missing)}; it cannot label its samples")
    if report["steps"] != state["step"]:
        raise UserError(f"{path}: its privacy_report covers {report['steps']} steps but the model has taken "
                        f"{state['step']}; the report does not describe this model")
    return dict(
        differentially_private=True, epsilon=report["epsilon"], delta=report["delta"],
        neighbouring_relation=report["neighbouring_relation"], accountant=report["accountant"],
        private_set=report["private_set"], privacy_report=report, warning=None,
        privacy=f"({report['epsilon']:.4g}, {report['delta']:g})-DP with respect to the private set "
                f"'{report['private_set']}' under {report['neighbouring_relation']}")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(args, state, cfg, out_name, sampling):
    """The metadata object stored in the .npz / PNG and its card. Holds file names only, never a path."""
    return dict(
        created_by=CREATED_BY, file=out_name, stage=state["stage"],
        **privacy_facts(args.ckpt, state, cfg),
        post_processing=POST_PROCESSING, public_set=cfg.data.public, preset=cfg.preset,
        checkpoint=os.path.basename(args.ckpt), checkpoint_step=state["step"],
        checkpoint_finished=state.get("done") is True, checkpoint_sha256=sha256_of(args.ckpt),
        sampling=sampling)


def card_path(out):
    """synth.npz -> synth.card.json, grid.png -> grid.card.json (beside the data file)."""
    return os.path.splitext(out)[0] + ".card.json"


def out_kind(out):
    """'folder' when --out ends in '/' or names an existing folder, else its extension '.png' or '.npz'."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return "folder"
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, or name a folder (end it with '/'), got {out!r}")
    return ext


def check_folder(out, overwrite):
    """The absolute folder --out names, refused before any sampling unless it can be (re)placed.

    A missing or empty folder is fine; a non-empty one needs --overwrite and must hold a card.json written by
    sample.py, so that --overwrite never deletes a folder of other files (`--out ./ --overwrite`).
    """
    folder = os.path.abspath(out)
    parent, name = os.path.split(folder)
    if not name:
        raise UserError(f"--out {out!r}: the root folder cannot be an output folder; name a new folder")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: folder {parent} does not exist or is not writable")
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise UserError(f"--out {out!r} names a folder, but {folder} is a file or a link; choose another name")
    if os.path.isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise UserError(f"--out folder {out} is not empty; pass --overwrite to replace it (it is replaced only "
                            f"once the new folder is complete) or choose a new folder")
        if not written_by_sample(folder):
            raise UserError(f"--overwrite refuses to replace {out}: it holds no {FOLDER_CARD} written by sample.py, "
                            f"so it is not a sample folder; remove it yourself or choose a new folder")
    return folder


def written_by_sample(folder):
    """Whether `folder` holds a card.json that sample.py wrote (the only kind of folder --overwrite replaces)."""
    try:
        with open(os.path.join(folder, FOLDER_CARD)) as f:
            return json.load(f).get("created_by") == CREATED_BY
    except (OSError, ValueError, AttributeError):
        return False


def write_png(path, picture, info):
    """One image file, created new (never replaces one); fsynced later by `fsync_paths`."""
    with open(path, "xb") as f:
        picture.save(f, format="png", pnginfo=info)


def fsync_paths(paths):
    """os.fsync every file or folder in `paths` (in threads: ext4 then commits many in one journal write)."""
    def fsync(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    with ThreadPoolExecutor(FSYNC_THREADS) as pool:
        list(pool.map(fsync, paths))


def fill_folder(root, images, labels, meta, num_classes):
    """images: uint8 (N, C, H, W), labels: (N,) -> root/<class>/<index>.png and root/card.json, all fsynced.

    Class folders are zero-padded to the width of K - 1 (K = `num_classes`) and indices to that of N - 1, so
    names sort as numbers do and ImageFolder's class index equals the label when every class is sampled. Each
    PNG carries the provenance object in its compressed iTXt chunk `metadata`, as a .png output does.
    """
    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(meta), zip=True)
    x = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    x = x[..., 0] if x.shape[-1] == 1 else x  # grayscale PNGs for one channel
    class_width, index_width = len(str(num_classes - 1)), len(str(max(len(x) - 1, 0)))
    folders = {}
    paths = []
    for i, (image, label) in enumerate(zip(x, labels.tolist())):
        if label not in folders:
            folders[label] = os.path.join(root, f"{label:0{class_width}d}")
            os.mkdir(folders[label])
        paths.append(os.path.join(folders[label], f"{i:0{index_width}d}.png"))
        write_png(paths[-1], Image.fromarray(image), info)
    atomic_write_json(os.path.join(root, FOLDER_CARD), meta)
    fsync_paths(paths + list(folders.values()) + [root])


def write_folder(folder, images, labels, meta, num_classes, overwrite):
    """Build the folder output in a hidden sibling `.NAME.tmp-PID`, fsync it, then rename it to `folder`.

    A stopped run (any exception, Ctrl-C included) leaves no `folder` and no temporary folder; only a hard kill
    can leave the hidden sibling. An old non-empty `folder` (--overwrite, checked by `check_folder`) is moved
    aside to `.NAME.old-PID` only after the new one is complete, the new one renamed in, the old one deleted.
    """
    parent, name = os.path.split(folder)
    tmp, old = (os.path.join(parent, f".{name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    os.mkdir(tmp)  # fails if a killed run with this process id left it: nothing of ours to clean up then
    try:
        fill_folder(tmp, images, labels, meta, num_classes)
        if overwrite and os.path.isdir(folder) and os.listdir(folder):
            os.rename(folder, old)
        os.replace(tmp, folder)  # onto a missing or empty folder (a non-empty one raises: never merged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(folder):
            os.rename(old, folder)  # the replacement failed: put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_paths([parent])


def write_file(out, ext, images, labels, meta):
    """The .png grid or .npz data set and its card beside it; returns the card's path."""
    card = card_path(out)
    if os.path.exists(card):
        os.remove(card)  # a card never describes other samples than those beside it, even after a kill below
    if ext == ".png":
        save_grid(images, out, metadata=meta)
    else:
        x = images.permute(0, 2, 3, 1).numpy()
        x = x[..., 0] if x.shape[-1] == 1 else x
        arrays = {"x": x, "y": labels.numpy().astype(np.int64), METADATA_KEY: np.array(json.dumps(meta))}
        atomic_write_bytes(out, lambda f: np.savez(f, **arrays))
    atomic_write_json(card, meta)
    return card


def run(argv=None):
    args = parse_args(argv)
    kind = out_kind(args.out)
    for name in ("n", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if kind == "folder":
        folder = check_folder(args.out, args.overwrite)
    else:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {args.out}: folder {parent} does not exist or is not writable")
    device = pick_device(args.device)
    cfg, state, ae, unet = load_model(args.ckpt, device)
    steps = args.steps or cfg.diffusion.sample_steps
    if steps > cfg.diffusion.timesteps:
        raise UserError(f"--steps {steps} cannot exceed the model's {cfg.diffusion.timesteps} timesteps")
    eta = cfg.diffusion.eta if args.eta is None else args.eta
    classes = sample_classes(args, state, cfg)
    labels = torch.tensor(classes)[torch.arange(args.n) % len(classes)]  # image i has label classes[i % K]
    sampler = args.sampler or cfg.diffusion.sampler
    sampling = dict(sampler=sampler, steps=steps, eta=eta if sampler == "ddim" else None, seed=args.seed, n=args.n,
                    labels=classes, batch_size=args.batch_size, device=device.type)
    out_name = os.path.basename(folder) if kind == "folder" else os.path.basename(args.out)
    meta = provenance(args, state, cfg, out_name, sampling)  # refuses before any sampling
    gen = torch.Generator().manual_seed(args.seed)
    images = generate(ae, unet, build_diffusion(cfg), labels, latent_shape(cfg), steps, eta, gen, args.batch_size,
                      sampler=sampler)
    if kind == "folder":
        write_folder(folder, images, labels, meta, class_count(state, cfg)[1], args.overwrite)
        shown, card = os.path.join(args.out, "<class>", "<index>.png"), os.path.join(args.out, FOLDER_CARD)
    else:
        shown, card = args.out, write_file(args.out, kind, images, labels, meta)
    how = f"{steps} {sampler} steps" + (f", eta {eta}" if sampler == "ddim" else "")
    print(f"wrote {len(images)} samples to {shown} and its card {card} ({how}, seed {args.seed}); "
          f"differentially private: {meta['differentially_private']}")


def main(argv=None):
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
