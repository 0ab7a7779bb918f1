"""Configuration: one frozen dataclass per component, named presets, and the command line built from them.

Every field of every component is a command-line flag of the same name (`ae_lr` -> `--ae-lr`); a flag
overrides the chosen preset's value. Field names are unique across components so that a flag is never
ambiguous. The resolved configuration is stored inside every checkpoint as plain dictionaries.
"""

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields, replace

from ldm.errors import UserError

SAMPLERS = ("ddim", "dpm++2m")  # ldm/diffusion.py `Diffusion.sample`


@dataclass(frozen=True)
class DataConfig:
    public: str = "svhn"  # data set for the autoencoder and the pretraining stage
    private: str = "mnist"  # data set for the DP fine-tuning stage (the only one the guarantee covers)
    data_root: str = "./data"  # where real data sets are (or are downloaded to); may be read-only
    cache_dir: str = "./data/cache"  # where generated sets (synthdigits) and derived caches are written
    image_size: int = 32
    channels: int = 0  # 0: the private set's native channel count (1 for digits, 3 for natural images)
    synth_n: int = 60000  # size of the generated synthdigits set
    synth_seed: int = 0
    fake_n: int = 256  # size of the generated `fake` set


@dataclass(frozen=True)
class AutoencoderConfig:
    ae_channels: int = 32
    ae_mult: tuple = (1, 2, 2)  # downsampling factor f = 2 ** (len(ae_mult) - 1)
    ae_res_blocks: int = 1
    ae_latent_channels: int = 3
    ae_loss: str = "l1"  # reconstruction loss: l1 or l2
    ae_kl_weight: float = 1e-6
    ae_steps: int = 6000
    ae_batch: int = 64
    ae_lr: float = 2e-4


@dataclass(frozen=True)
class UNetConfig:
    unet_channels: int = 64
    unet_mult: tuple = (1, 2)
    unet_res_blocks: int = 1
    unet_attention_levels: tuple = (1, 2)  # level k works at downsampling factor 2 ** (k - 1) of the latent
    unet_heads: int = 4
    unet_context_dim: int = 64  # width of the class embedding fed to cross-attention


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    sample_steps: int = 200  # sampler steps (model evaluations) for sample grids and sample.py
    eta: float = 1.0  # DDIM eta: 0 deterministic, 1 as stochastic as DDPM (DPM-Solver++ is deterministic)
    sampler: str = "ddim"  # ddim or dpm++2m (ldm/diffusion.py); sampling only, never training


@dataclass(frozen=True)
class PretrainConfig:
    pretrain_steps: int = 20000
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-4
    pretrain_warmup: int = 500
    pretrain_ema: float = 0.999


@dataclass(frozen=True)
class DPConfig:
    epsilon: float = 10.0
    delta: float = 1e-5
    clip: float = 1e-3  # per-example L2 clipping bound C over all trainable parameters jointly
    expected_batch: int = 2000  # expected Poisson batch size q * N
    epochs: float = 200.0  # logical steps T = round(epochs / q), fixed before training
    physical_batch: int = 40  # micro-batch for per-sample gradients; never changes the guarantee
    lr: float = 1e-4  # fine-tuning learning rate
    dp_blocks: str = "all"  # which transformer blocks are trained: see dp/select.py
    dp_class_embed: bool = True  # also train the class embedding table
    optimizer: str = "adamw"  # adamw or sgd
    weight_decay: float = 0.0
    warmup: int = 0  # learning-rate warm-up in logical steps
    dp_ema: float = 0.999
    noise_seed: typing.Optional[int] = None  # None: sampling and noise seeded from the OS (use for release)
    clip_backend: str = "auto"  # auto, triton or torch
    grad_method: str = "auto"  # auto, bookkeeping or vmap: how clipped per-sample gradients are summed (dp/)
    private_size: typing.Optional[int] = None  # public N for q and T; None: the private set's size, treated as public


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0  # seeds initialisation, data order, timesteps and diffusion noise (never the DP noise)
    device: str = "auto"  # auto, cpu or cuda
    log_every: int = 100
    ckpt_every: int = 500
    grid_n: int = 64  # images in each samples.png
    dist_timeout: int = 600  # seconds before a collective with a dead or hung process fails (torchrun)


@dataclass(frozen=True)
class Config:
    preset: str = "paper-mnist"
    data: DataConfig = field(default_factory=DataConfig)
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunConfig = field(default_factory=RunConfig)


COMPONENTS = ("data", "ae", "unet", "diffusion", "pretrain", "dp", "run")

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
    # Sized for a 2-core CPU: synthdigits -> MNIST. Stage times are measured in the README.
    "quick": dict(
        public="synthdigits", private="mnist", synth_n=60000,
        ae_channels=16, ae_mult=(1, 2, 2), ae_steps=2500, ae_batch=32, ae_lr=5e-4,
        unet_channels=64, unet_mult=(1, 2), unet_heads=4, unet_context_dim=64,
        sample_steps=50, pretrain_steps=3000, pretrain_batch=64, pretrain_lr=5e-4, pretrain_warmup=200,
        pretrain_ema=0.995, epsilon=10.0, delta=1e-5, clip=1e-2, expected_batch=256, epochs=1.0,
        physical_batch=128, lr=5e-4, warmup=10, dp_ema=0.95, log_every=25, ckpt_every=50,
    ),
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
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
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


def config_to_dict(cfg):
    """Plain nested dictionaries (lists for tuples), safe to store in a checkpoint or JSON."""
    return dataclasses.asdict(cfg)


# Fields added after checkpoints were first written, with the value that reproduces what older code did.
# Only fields that change neither the model nor the privacy guarantee belong here.
ADDED_FIELDS = {"dp": {"grad_method": "vmap", "private_size": None}, "diffusion": {"sampler": "ddim"}}


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
    choices = {"ae_loss": ("l1", "l2"), "optimizer": ("adamw", "sgd"), "clip_backend": ("auto", "triton", "torch"),
               "grad_method": ("auto", "bookkeeping", "vmap"), "sampler": SAMPLERS,
               "device": ("auto", "cpu", "cuda")}
    for name, allowed in choices.items():
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
    if cfg.dp.physical_batch > 100000:
        raise UserError(f"--physical-batch {cfg.dp.physical_batch} is unreasonably large")


def _parse_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_config_flags(parser):
    """One flag per configuration field; defaults are None so that the preset's value applies."""
    for comp in COMPONENTS:
        group = parser.add_argument_group(comp)
        cls = Config.__dataclass_fields__[comp].default_factory
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = getattr(cls(), f.name)
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            elif isinstance(default, tuple):
                group.add_argument(flag, type=_parse_tuple, default=None, metavar="A,B,...")
            elif f.name in ("noise_seed", "private_size"):
                group.add_argument(flag, type=int, default=None)
            else:
                group.add_argument(flag, type=type(default), default=None)


def overrides_from_args(args):
    """{field name: value} for the configuration flags the user actually gave."""
    return {name: getattr(args, name) for name in FIELD_OWNER if getattr(args, name, None) is not None}
