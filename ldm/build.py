"""Models and shapes from a resolved configuration: the autoencoder, the UNet, the diffusion schedule."""

from ldm.autoencoder import Autoencoder
from ldm.config import downsampling_factor
from ldm.data import experiment_channels, num_classes
from ldm.diffusion import Diffusion
from ldm.unet import UNet


def build_autoencoder(cfg):
    return Autoencoder.from_config(cfg.ae, experiment_channels(cfg.data))


def build_unet(cfg):
    return UNet.from_config(cfg.unet, cfg.ae.ae_latent_channels, num_classes(cfg.data))


def build_diffusion(cfg):
    return Diffusion.from_config(cfg.diffusion)


def latent_shape(cfg):
    """(z, h, w) of one image's latent."""
    side = cfg.data.image_size // downsampling_factor(cfg.ae.ae_mult)
    return (cfg.ae.ae_latent_channels, side, side)
