"""Checkpoints: written atomically, loaded strictly, holding only plain data (no pickled code).

A checkpoint is a dict of tensors, numbers, strings, lists and dicts: the resolved config, step counters,
model/EMA/optimiser state dicts, RNG states and, for the private stage, the privacy ledger and epsilon
spent. It is written to a temporary file in the same folder, flushed to disk, then renamed over the old
one, so a kill at any moment leaves either the old or the new checkpoint, never half of one.
"""

import json
import os

import torch

from ldm.config import config_from_dict
from ldm.errors import UserError

FORMAT = "dp-ldm-checkpoint-v1"


def atomic_write_bytes(path, write):
    """Call write(file object) on a temp file beside `path`, fsync, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path, payload):
    """Write `payload` (plain data and tensors) atomically to `path`."""
    payload = dict(payload, format=FORMAT)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint`; any problem is a UserError naming the file.

    Returns (payload, config). Uses weights_only loading: a checkpoint cannot run code.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file must not give a traceback
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this project ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a {FORMAT} file")
    return payload, config_from_dict(payload["config"])


def load_state_strict(module, state, what, path):
    """module.load_state_dict(state, strict=True), with a missing/extra/mis-shaped weight as a UserError."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {path}: the {what} weights do not match its configuration ({detail})") from None
