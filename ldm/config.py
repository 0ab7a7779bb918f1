"""Configuration: one frozen dataclass per component, named presets, and the command line built from them.

Every field of every component is a command-line flag of the same name (`ae_lr` -> `--ae-lr`); a flag
overrides the chosen preset's value, or the value of a stored configuration given with `--config`. Each field
carries its one-line meaning as `metadata["help"]`, which `--help` prints. Field names are unique across
components so that a flag is never ambiguous. The resolved configuration is stored inside every checkpoint,
and as <out>/config.json, as plain dictionaries.
"""

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import typing
from dataclasses import dataclass, field, fields, replace

from ldm.errors import UserError

SAMPLERS = ("ddim", "dpm++2m")  # ldm/diffusion.py `Diffusion.sample`
DEFAULT_PRESET = "paper-mnist"

# The fields with a fixed set of values: read by `validate` (the check) and `add_config_flags` (the help).
CHOICES = {"ae_loss": ("l1", "l2"), "optimizer": ("adamw", "sgd"), "clip_backend": ("auto", "triton", "torch"),
           "grad_method": ("auto", "bookkeeping", "vmap"), "sampler": SAMPLERS, "device": ("auto", "cpu", "cuda")}
METAVARS = {int: "N", float: "X"}  # in --help; strings keep argparse's own (the flag's name in capitals)
DESCRIPTION_WIDTH = 76  # group descriptions in --help (argparse wraps flag help to the terminal itself)


def _field(default, help_text):
    """A configuration field: its default and the one-line meaning `--help` shows."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class DataConfig:
    """data sets and where they are"""
    public: str = _field("svhn", "data set of the autoencoder and pretraining stages; public, outside the guarantee")
    private: str = _field("mnist", "data set of the DP fine-tuning stage, the only one the guarantee covers")
    data_root: str = _field("./data", "folder of the real data sets (downloaded there if missing); may be read-only")
    cache_dir: str = _field("./data/cache", "folder where generated sets (synthdigits, synthsvhn) and derived caches "
                            "are written")
    image_size: int = _field(32, "side in pixels of the square images every set is resized to")
    channels: int = _field(0, "image channels: 1 or 3; 0 takes the private set's own (1 for digits, 3 for photos)")
    synth_n: int = _field(60000, "number of training images of the generated synthdigits or synthsvhn set")
    synth_seed: int = _field(0, "seed of the generated synthdigits or synthsvhn set (its test split uses another seed)")
    fake_n: int = _field(256, "number of images of each generated `fake` set (tests)")


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL autoencoder (stage 1, public set)"""
    ae_channels: int = _field(32, "base channel width of the autoencoder")
    ae_mult: tuple = _field((1, 2, 2), "channel multiplier per autoencoder level; downsampling factor "
                                       "f = 2 ** (levels - 1)")
    ae_res_blocks: int = _field(1, "residual blocks per autoencoder level")
    ae_latent_channels: int = _field(3, "channels of the latent the diffusion model works on")
    ae_loss: str = _field("l1", "reconstruction loss, mean over pixels: l1 or l2")
    ae_kl_weight: float = _field(1e-6, "weight of the KL term (summed over the latent) against the reconstruction loss")
    ae_steps: int = _field(6000, "optimiser steps of the autoencoder stage")
    ae_batch: int = _field(64, "autoencoder batch size (images per step, over all processes)")
    ae_lr: float = _field(2e-4, "autoencoder learning rate (AdamW, constant)")


@dataclass(frozen=True)
class UNetConfig:
    """latent diffusion UNet"""
    unet_channels: int = _field(64, "base channel width of the UNet")
    unet_mult: tuple = _field((1, 2), "channel multiplier per UNet level; level k works at downsampling factor "
                                      "2 ** (k - 1) of the latent")
    unet_res_blocks: int = _field(1, "residual blocks per UNet level")
    unet_attention_levels: tuple = _field((1, 2), "UNet levels (1 = full latent resolution) that get transformer "
                                                  "blocks; the middle block always has one")
    unet_heads: int = _field(4, "attention heads per transformer block")
    unet_context_dim: int = _field(64, "width of the class embedding that cross-attention reads")


@dataclass(frozen=True)
class DiffusionConfig:
    """noise schedule and sampler"""
    timesteps: int = _field(1000, "diffusion steps T of the forward process")
    beta_start: float = _field(0.0015, "beta_1 of the noise schedule (linear in sqrt(beta))")
    beta_end: float = _field(0.0155, "beta_T of the noise schedule (linear in sqrt(beta))")
    sample_steps: int = _field(200, "sampler steps (model evaluations) for the samples.png grids and sample.py")
    eta: float = _field(1.0, "DDIM eta: 0 deterministic, 1 as stochastic as DDPM (DPM-Solver++ ignores it)")
    sampler: str = _field("ddim", "sampler for grids and sample.py (ldm/diffusion.py); never used in training")


@dataclass(frozen=True)
class PretrainConfig:
    """UNet pretraining (stage 2, public set)"""
    pretrain_steps: int = _field(20000, "optimiser steps of the pretraining stage")
    pretrain_batch: int = _field(128, "pretraining batch size (latents per step, over all processes)")
    pretrain_lr: float = _field(2e-4, "pretraining learning rate (AdamW) after warm-up")
    pretrain_warmup: int = _field(500, "steps of linear learning-rate warm-up of the pretraining stage")
    pretrain_ema: float = _field(0.999, "decay per step of the pretrained UNet's EMA weights, in [0, 1)")


@dataclass(frozen=True)
class DPConfig:
    """DP fine-tuning (stage 3, private set). Read only by the private stage (finetune, its baseline
    finetune-nonprivate, and python -m dp.audit), never by the public stages."""
    epsilon: float = _field(10.0, "target epsilon of the (epsilon, delta) guarantee; sigma is calibrated to it")
    delta: float = _field(1e-5, "target delta of the guarantee; must be below 1 / N")
    clip: float = _field(1e-3, "per-example L2 clipping bound C, over all trainable parameters jointly")
    expected_batch: int = _field(2000, "expected Poisson batch size q N (examples per logical step)")
    epochs: float = _field(200.0, "passes over the private set: logical steps T = round(epochs / q), fixed upfront")
    physical_batch: int = _field(40, "micro-batch of per-sample gradients: memory only, never the guarantee")
    lr: float = _field(1e-4, "fine-tuning learning rate after warm-up")
    dp_blocks: str = _field("all", "transformer blocks to fine-tune: all, encoder, decoder, mid, levels=1,2, "
                                   "up1_0,mid, ... (dp/select.py)")
    dp_class_embed: bool = _field(True, "also fine-tune the class embedding table")
    dp_lora: int = _field(0, "LoRA rank on the chosen blocks' attention projections (dp/lora.py); 0 trains the "
                             "blocks' own weights")
    optimizer: str = _field("adamw", "fine-tuning optimiser over the noisy gradient")
    weight_decay: float = _field(0.0, "weight decay of the fine-tuning optimiser")
    warmup: int = _field(0, "logical steps of linear learning-rate warm-up of the fine-tuning")
    dp_ema: float = _field(0.999, "decay per logical step of the fine-tuned UNet's EMA weights, in [0, 1)")
    noise_seed: typing.Optional[int] = _field(None, "seed of Poisson sampling and DP noise, for experiments only; "
                                                    "unset: a secret from the OS (use for release)")
    clip_backend: str = _field("auto", "clip-and-noise implementation: auto (Triton on CUDA, else torch), "
                                       "triton or torch")
    grad_method: str = _field("auto", "how clipped per-sample gradients are summed, same result: auto "
                                      "(bookkeeping where supported), bookkeeping or vmap")
    private_size: typing.Optional[int] = _field(None, "public bound on N for q and T; unset: the private set's size, "
                                                      "treated as public")
    tune_holdout: int = _field(0, "leave the private training split's last K images out, as tuning data OUTSIDE the "
                                  "guarantee (evaluate.py)")


@dataclass(frozen=True)
class RunConfig:
    """seeds, device, logging, checkpoints"""
    seed: int = _field(0, "seed of initialisation, data order, timesteps and diffusion noise; never of the DP noise")
    device: str = _field("auto", "where to train: auto takes CUDA when there is one")
    log_every: int = _field(100, "steps (logical steps in fine-tuning) between lines of metrics.jsonl")
    ckpt_every: int = _field(500, "steps (logical steps in fine-tuning) between checkpoints")
    grid_n: int = _field(64, "images in each samples.png grid")
    dist_timeout: int = _field(600, "seconds before a collective with a dead or hung process fails (torchrun)")


@dataclass(frozen=True)
class Config:
    preset: str = DEFAULT_PRESET
    data: DataConfig = field(default_factory=DataConfig)
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunConfig = field(default_factory=RunConfig)


COMPONENTS = ("data", "ae", "unet", "diffusion", "pretrain", "dp", "run")

# The quick preset, also the base of laptop (below). Its public set is synthsvhn, the street-style stand-in for SVHN
# (ldm/synthdigits.py), since 2026-12-02, chosen for what it is before any run on it; the README's earlier rows used
# synthdigits (--public synthdigits reproduces them). Its sampler, DPM-Solver++(2M) with 8 steps, gave a better
# downstream classifier on the tuning split than DDIM with 50 steps, at a sixth of the time (results/tune_sampler.sh).
QUICK = dict(
    public="synthsvhn", private="mnist", synth_n=60000,
    ae_channels=16, ae_mult=(1, 2, 2), ae_steps=2500, ae_batch=32, ae_lr=5e-4,
    unet_channels=64, unet_mult=(1, 2), unet_heads=4, unet_context_dim=64,
    sample_steps=8, sampler="dpm++2m", pretrain_steps=3000, pretrain_batch=64, pretrain_lr=5e-4, pretrain_warmup=200,
    pretrain_ema=0.995, epsilon=10.0, delta=1e-5, clip=1e-2, expected_batch=256, epochs=1.0,
    physical_batch=128, lr=5e-4, warmup=10, dp_ema=0.95, log_every=25, ckpt_every=50,
)

# Presets: overrides of the defaults above, by field name.
PRESETS = {
    # Tiny model on `fake` data: the three stages in well under 2 minutes on 2 CPU cores. Used by tests.
    "smoke": dict(
        public="fake", private="fake", channels=1, fake_n=256,
        ae_channels=8, ae_mult=(1, 2, 2), ae_steps=60, ae_batch=16, ae_lr=1e-3,
        unet_channels=16, unet_mult=(1, 2), unet_heads=2, unet_context_dim=16,
        sample_steps=10, pretrain_steps=60, pretrain_batch=16, pretrain_lr=1e-3, pretrain_warmup=5,
        pretrain_ema=0.9, epsilon=10.0, delta=1e-5, clip=1.0, expected_batch=16, epochs=1.0,
        physical_batch=8, lr=1e-3, dp_ema=0.9, log_every=10, ckpt_every=20, grid_n=16,
    ),
    # Sized for a 2-core CPU: synthsvhn -> MNIST. Stage times are measured in the README.
    "quick": QUICK,
    # quick's public stages, its pretraining trained on from 3,000 to 6,000 steps (its autoencoder.pt serves
    # unchanged; `--stage pretrain --resume` continues its pretrain.pt), with the settings chosen on the tuning split
    # (results/tune_quick.md and tune_synthsvhn_p6k.md, never the test set): five DP epochs at the same epsilon, the
    # 6,000 pretraining steps, and lr 1e-3 with C = 0.1 (9,000 steps did not beat 6,000: tune_synthsvhn_p9k.md). It
    # holds out that split, MNIST train's last 5,000 images, so that its README figures are reproduced exactly.
    "laptop": {**QUICK, "pretrain_steps": 6000, "epochs": 5.0, "tune_holdout": 5000, "lr": 1e-3, "clip": 1e-1},
    # The original work's released configurations (Lyu et al. 2023, "Differentially Private Latent Diffusion
    # Models"), meant for GPUs.
    "paper-mnist": dict(
        public="svhn", private="mnist", channels=1,
        ae_channels=64, ae_mult=(1, 2, 3, 5), ae_latent_channels=3, ae_steps=50000, ae_batch=64,
        unet_channels=64, unet_mult=(1, 2), unet_res_blocks=1, unet_attention_levels=(1, 2),
        pretrain_steps=100000, pretrain_batch=256, epsilon=10.0, delta=1e-5, clip=1e-3,
        expected_batch=2000, epochs=200.0, physical_batch=40,
    ),
    "paper-cifar10": dict(
        public="imagenet32", private="cifar10", channels=3,
        ae_channels=128, ae_mult=(1, 2), ae_latent_channels=3, ae_steps=100000, ae_batch=64,
        unet_channels=128, unet_mult=(1, 2, 2, 4), unet_res_blocks=2, unet_attention_levels=(1, 2, 3),
        unet_heads=8, unet_context_dim=512, pretrain_steps=200000, pretrain_batch=256,
        epsilon=10.0, delta=1e-5, clip=1e-6, expected_batch=2000, epochs=30.0, physical_batch=40,
        dp_blocks="decoder",
    ),
    "paper-celeba32": dict(
        public="imagenet32", private="celeba", channels=3, beta_end=0.0195,
        ae_channels=128, ae_mult=(1, 2), ae_latent_channels=3, ae_steps=100000, ae_batch=64,
        unet_channels=192, unet_mult=(1, 2, 2, 4), unet_res_blocks=2, unet_attention_levels=(1, 2, 3),
        unet_heads=8, unet_context_dim=512, pretrain_steps=200000, pretrain_batch=256,
        epsilon=10.0, delta=1e-6, clip=1e-3, expected_batch=2048, epochs=30.0, physical_batch=32,
    ),
}


def downsampling_factor(mult):
    """The spatial factor of an encoder (or UNet) with channel multipliers `mult`: one halving per level after
    the first."""
    return 2 ** (len(mult) - 1)


def _field_owner():
    """Map every field name to the component that holds it: {'ae_lr': 'ae', ...}."""
    owner = {}
    for comp in COMPONENTS:
        for f in fields(Config.__dataclass_fields__[comp].default_factory):
            assert f.name not in owner, f"field {f.name} defined twice"
            owner[f.name] = comp
    return owner


FIELD_OWNER = _field_owner()


def make_config(preset, overrides=None):
    """The preset's configuration with `overrides` ({field name: value}) applied, validated."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return _build(preset, {**PRESETS[preset], **_given(overrides)})


def _given(overrides):
    return {k: v for k, v in (overrides or {}).items() if v is not None}


def _build(preset, values):
    """The class defaults with `values` ({field name: value}) applied, validated."""
    unknown = sorted(set(values) - set(FIELD_OWNER))
    if unknown:
        raise UserError(f"unknown configuration field(s) {', '.join(unknown)}")
    parts = {}
    for comp in COMPONENTS:
        cls = Config.__dataclass_fields__[comp].default_factory
        own = {k: v for k, v in values.items() if FIELD_OWNER[k] == comp}
        parts[comp] = replace(cls(), **own)
    cfg = Config(preset=preset, **parts)
    validate(cfg)
    return cfg


def field_values(cfg):
    """{field name: value} over all components of `cfg`."""
    return {f.name: getattr(getattr(cfg, comp), f.name) for comp in COMPONENTS for f in fields(getattr(cfg, comp))}


def load_config(path, overrides=None):
    """The resolved configuration stored in `path` (a run's config.json, written by train.py) with `overrides`
    applied, validated. A file that cannot be read, is not JSON, or does not match this version's fields is a
    UserError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            stored = json.load(fh)
    except OSError as e:
        raise UserError(f"--config {path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"--config {path} is not a JSON configuration ({e})") from None
    try:
        stored = config_from_dict(stored)
        _check_types(stored)
        stored = _build(stored.preset, field_values(stored))
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None
    return _build(stored.preset, {**field_values(stored), **_given(overrides)})


def _check_types(cfg):
    """Refuse a stored value of the wrong type (a float where a count belongs, a number for a name)."""
    for comp in COMPONENTS:
        for f in fields(getattr(cfg, comp)):
            value = getattr(getattr(cfg, comp), f.name)
            want = {float: (int, float), typing.Optional[int]: (int, type(None))}.get(f.type, f.type)
            if not isinstance(value, want) or (isinstance(value, bool) and f.type is not bool):
                raise UserError(f"field {f.name} holds {value!r}, not a value of type {_type_name(f)}")


def _type_name(f):
    return "int or null" if f.type == typing.Optional[int] else f.type.__name__


def config_to_dict(cfg):
    """Plain nested dictionaries (lists for tuples), safe to store in a checkpoint or JSON."""
    return dataclasses.asdict(cfg)


# Fields added after checkpoints were first written, with the value that reproduces what older code did.
# Only fields whose value here changes neither the model nor the privacy guarantee of an older run belong here.
ADDED_FIELDS = {"dp": {"grad_method": "vmap", "private_size": None, "tune_holdout": 0, "dp_lora": 0},
                "diffusion": {"sampler": "ddim"}}


def config_from_dict(d):
    """Inverse of `config_to_dict`; a missing or unknown field is an error, never silently defaulted
    (except the later additions of ADDED_FIELDS, which take the value older code behaved as)."""
    try:
        parts = {}
        for comp in COMPONENTS:
            cls = Config.__dataclass_fields__[comp].default_factory
            given = {**ADDED_FIELDS.get(comp, {}), **dict(d[comp])}
            names = {f.name for f in fields(cls)}
            if set(given) != names:
                diff = sorted(set(given) ^ names)
                raise UserError(f"stored configuration does not match this version (fields {', '.join(diff)})")
            for f in fields(cls):
                if isinstance(getattr(cls(), f.name), tuple):
                    given[f.name] = tuple(given[f.name])
            parts[comp] = cls(**given)
        return Config(preset=d["preset"], **parts)
    except (KeyError, TypeError) as e:
        raise UserError(f"stored configuration is incomplete or malformed ({e})") from None


def _positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


def validate(cfg):
    """Refuse values that cannot work, with a message naming the flag and the allowed range."""
    for comp in COMPONENTS:
        for f in fields(getattr(cfg, comp)):
            value = getattr(getattr(cfg, comp), f.name)
            if f.name.endswith(("_steps", "_batch", "_lr", "_channels", "_every", "_n", "_heads", "_dim")) \
                    or f.name in ("image_size", "timesteps", "sample_steps", "lr", "epochs", "clip",
                                  "expected_batch", "physical_batch", "epsilon", "delta", "dist_timeout"):
                _positive(f.name, value)
            if isinstance(value, tuple) and (not value or any((not isinstance(v, int)) or v < 1 for v in value)):
                raise UserError(f"--{f.name.replace('_', '-')} must be a comma-separated list of positive integers, got {value!r}")
    for name, allowed in CHOICES.items():
        value = getattr(getattr(cfg, FIELD_OWNER[name]), name)
        if value not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.data.channels not in (0, 1, 3):
        raise UserError(f"--channels must be 0 (automatic), 1 or 3, got {cfg.data.channels}")
    if not 0.0 < cfg.diffusion.beta_start < cfg.diffusion.beta_end < 1.0:
        raise UserError(f"need 0 < --beta-start < --beta-end < 1, got {cfg.diffusion.beta_start}, {cfg.diffusion.beta_end}")
    if cfg.diffusion.sample_steps > cfg.diffusion.timesteps:
        raise UserError(f"--sample-steps ({cfg.diffusion.sample_steps}) cannot exceed --timesteps ({cfg.diffusion.timesteps})")
    if not 0.0 <= cfg.diffusion.eta <= 1.0:
        raise UserError(f"--eta must lie in [0, 1], got {cfg.diffusion.eta}")
    f, g = downsampling_factor(cfg.ae.ae_mult), downsampling_factor(cfg.unet.unet_mult)
    if cfg.data.image_size % (f * g):
        raise UserError(f"--image-size {cfg.data.image_size} must be divisible by the autoencoder factor {f} "
                        f"times the UNet's {g}")
    bad = [lv for lv in cfg.unet.unet_attention_levels if lv > len(cfg.unet.unet_mult)]
    if bad:
        raise UserError(f"--unet-attention-levels {bad} do not exist: the UNet has levels 1..{len(cfg.unet.unet_mult)}")
    for name in ("pretrain_ema", "dp_ema"):
        value = getattr(getattr(cfg, FIELD_OWNER[name]), name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1), got {value}")
    if cfg.dp.private_size is not None and not (isinstance(cfg.dp.private_size, int) and cfg.dp.private_size >= 1):
        raise UserError(f"--private-size must be a whole number >= 1 (a public bound on N), got {cfg.dp.private_size!r}")
    if not (isinstance(cfg.dp.tune_holdout, int) and cfg.dp.tune_holdout >= 0):
        raise UserError(f"--tune-holdout must be a whole number >= 0 (images held out for tuning), "
                        f"got {cfg.dp.tune_holdout!r}")
    lora = cfg.dp.dp_lora
    if isinstance(lora, bool) or not (isinstance(lora, int) and lora >= 0):
        raise UserError(f"--dp-lora must be a whole number >= 0 (the LoRA rank; 0 trains the blocks' own weights), "
                        f"got {lora!r}")
    if cfg.dp.physical_batch > 100000:
        raise UserError(f"--physical-batch {cfg.dp.physical_batch} is unreasonably large")


def _parse_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_config_flags(parser, argv=None):
    """--preset, --config and one flag per configuration field, all with default None so that the preset's (or the
    stored configuration's) value applies; read them back with `config_from_args`.

    `argv` is the command line the parser will read (None: sys.argv[1:]); only its --preset and --config are
    looked at here, so that --help shows, for every flag, the value it takes in that configuration."""
    shown, label = _shown_config(sys.argv[1:] if argv is None else argv)
    top = parser.add_argument_group("configuration", textwrap.fill(
        "Each flag below sets one field; in parentheses: its value in the chosen preset, or (--config: ...) "
        "in the --config file.", DESCRIPTION_WIDTH))
    top.add_argument("--preset", default=None, help=f"named configuration: {', '.join(PRESETS)} "
                                                    f"(default {DEFAULT_PRESET})")
    top.add_argument("--config", default=None, metavar="PATH",
                     help="a resolved configuration to run again, such as runs/<preset>/config.json (written by "
                          "train.py); it replaces --preset (giving both is an error) and flags still override it")
    for comp in COMPONENTS:
        cls = Config.__dataclass_fields__[comp].default_factory
        group = parser.add_argument_group(comp, textwrap.fill(" ".join(cls.__doc__.split()), DESCRIPTION_WIDTH))
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            text = _flag_help(comp, f, getattr(getattr(shown, comp), f.name), label)
            if f.type is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif f.type is tuple:
                group.add_argument(flag, type=_parse_tuple, default=None, metavar="A,B,...", help=text)
            else:
                kind = int if f.type == typing.Optional[int] else f.type
                metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else METAVARS.get(kind)
                group.add_argument(flag, type=kind, default=None, metavar=metavar, help=text)


def _flag_help(comp, f, value, label):
    """The field's meaning, marked for the DP stage, with its format and its value in the shown configuration."""
    text = ("[DP stage] " if comp == "dp" else "") + f.metadata["help"]
    if f.type is tuple:
        text += "; comma-separated integers"
    return f"{text} ({label}: {_show(value)})".replace("%", "%%")


def _show(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def _shown_config(argv):
    """The configuration --help describes and its label: argv's --config, else its --preset, else DEFAULT_PRESET
    (also when those are not valid: the real parse reports them)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(argv)
        if known.config:
            return load_config(known.config), "--config"
        return make_config(known.preset or DEFAULT_PRESET), known.preset or DEFAULT_PRESET
    except (argparse.ArgumentError, UserError):
        return make_config(DEFAULT_PRESET), DEFAULT_PRESET


def config_from_args(args):
    """The run's configuration: the --config file's, else the --preset's (default DEFAULT_PRESET), with the
    configuration flags given on the command line applied."""
    if args.config is not None and args.preset is not None:
        raise UserError(f"--preset {args.preset} and --config {args.config} were both given: --config replaces the "
                        f"preset, so give only one of them")
    if args.config is not None:
        return load_config(args.config, overrides_from_args(args))
    return make_config(args.preset or DEFAULT_PRESET, overrides_from_args(args))


def overrides_from_args(args):
    """{field name: value} for the configuration flags the user actually gave."""
    return {name: getattr(args, name) for name in FIELD_OWNER if getattr(args, name, None) is not None}
